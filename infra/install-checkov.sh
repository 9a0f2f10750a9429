#!/usr/bin/env bash
# Installs checkov into its own virtual environment and links it into a bin folder.
# checkov 3.3.30 pins boto3==1.35.49 and packaging<24, which conflict with this project's boto3==1.44.8 and
# pytest 9 (packaging>=24), so it cannot share the project's venv: it gets one of its own.
set -euo pipefail
bin=${1:?usage: install-checkov.sh BIN_DIR PYTHON}
python=${2:?usage: install-checkov.sh BIN_DIR PYTHON}
version=${CHECKOV_VERSION:-3.3.30}
tools="$(cd "$bin/.." && pwd)/tools/checkov"
"$python" -m venv "$tools"
"$tools/bin/python" -m pip install --quiet "checkov==$version"
ln -sf "$tools/bin/checkov" "$bin/checkov"
"$bin/checkov" --version
