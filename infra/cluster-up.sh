#!/usr/bin/env bash
# `make cluster-up`: a kind cluster with Argo Workflows, MinIO and the distill chart, ready for `make submit`.
#
#   1. create the kind cluster `distill` (infra/kind-config.yaml), unless it exists
#   2. namespaces argo, minio, distill (distill enforces the `restricted` Pod Security Standard)
#   3. Secrets from the environment (values never echoed, never written to a file):
#        DISTILL_S3_ACCESS_KEY, DISTILL_S3_SECRET_KEY  MinIO root credentials = the pipeline's S3 keys
#                                                      (generated when unset; read them back with kubectl)
#        TINKER_API_KEY                                optional: Secret distill-tinker (Tinker backend)
#        HF_TOKEN                                      optional: Secret distill-hub (Hub push; dry run without)
#        WEBHOOK_SECRET                                optional: argo-workflows-webhook-clients, the shared
#                                                      secret of the git host's push webhook
#   4. helm install Argo Workflows (infra/argo-values.yaml) and MinIO (infra/minio-values.yaml, creates the bucket)
#   5. helm install the distill chart (helm/distill, ci/minio-values.yaml)
#
# Idempotent: run it again to update. Tools: kind, kubectl, helm (4), and docker or podman for kind.
# Overridable: KIND_CLUSTER, HELM, KUBECTL, ARGO_CHART_VERSION, MINIO_CHART_VERSION, BUCKET, PSA_LEVEL.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-distill}
HELM=${HELM:-helm}
KUBECTL=${KUBECTL:-kubectl}
ARGO_CHART_VERSION=${ARGO_CHART_VERSION:-2.0.1}    # argo-helm argo-workflows chart; app v4.1.x
MINIO_CHART_VERSION=${MINIO_CHART_VERSION:-5.4.0}  # charts.min.io minio chart
BUCKET=${BUCKET:-distill}
PSA_LEVEL=${PSA_LEVEL:-restricted}
NS=distill

say() { printf '==> %s\n' "$*"; }
die() { printf 'cluster-up: %s\n' "$*" >&2; exit 1; }

for tool in kind "$KUBECTL" "$HELM"; do
  command -v "$tool" >/dev/null || die "$tool not found (kind: https://kind.sigs.k8s.io; helm and kubectl: make setup)"
done
command -v docker >/dev/null || command -v podman >/dev/null || die "kind needs docker or podman"

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  say "kind cluster $CLUSTER exists"
else
  say "creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --config infra/kind-config.yaml --wait 120s
fi
CONTEXT="kind-$CLUSTER"
k() { "$KUBECTL" --context "$CONTEXT" "$@"; }
h() { "$HELM" --kube-context "$CONTEXT" "$@"; }

say "namespaces"
for ns in argo minio "$NS"; do
  k create namespace "$ns" --dry-run=client -o yaml | k apply -f - >/dev/null
done
k label namespace "$NS" --overwrite "pod-security.kubernetes.io/enforce=$PSA_LEVEL" \
  pod-security.kubernetes.io/warn=restricted pod-security.kubernetes.io/audit=restricted >/dev/null

# a Secret from literal key=value pairs, applied idempotently; values travel on stdin, never on a command line
secret() {  # secret NAMESPACE NAME KEY ENVVAR [KEY ENVVAR ...]
  local ns=$1 name=$2; shift 2
  python3 - "$ns" "$name" "$@" <<'PY' | k apply -f - >/dev/null
import base64, json, os, sys
ns, name, pairs = sys.argv[1], sys.argv[2], sys.argv[3:]
data = {key: base64.b64encode(os.environ[var].encode()).decode() for key, var in zip(pairs[::2], pairs[1::2])}
print(json.dumps({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                  "metadata": {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/part-of": "distill"}},
                  "data": data}))
PY
}

say "secrets (from the environment)"
existing_key() {  # the value already in the cluster, so a re-run keeps MinIO's credentials
  k -n minio get secret minio-root -o "jsonpath={.data.$1}" 2>/dev/null | base64 -d 2>/dev/null || true
}
random_key() { python3 -c 'import secrets; print(secrets.token_urlsafe(24))'; }
DISTILL_S3_ACCESS_KEY=${DISTILL_S3_ACCESS_KEY:-$(existing_key rootUser)}
DISTILL_S3_ACCESS_KEY=${DISTILL_S3_ACCESS_KEY:-distill-$(python3 -c 'import secrets; print(secrets.token_hex(4))')}
DISTILL_S3_SECRET_KEY=${DISTILL_S3_SECRET_KEY:-$(existing_key rootPassword)}
DISTILL_S3_SECRET_KEY=${DISTILL_S3_SECRET_KEY:-$(random_key)}
export DISTILL_S3_ACCESS_KEY DISTILL_S3_SECRET_KEY
secret minio minio-root rootUser DISTILL_S3_ACCESS_KEY rootPassword DISTILL_S3_SECRET_KEY
secret "$NS" distill-s3 access-key DISTILL_S3_ACCESS_KEY secret-key DISTILL_S3_SECRET_KEY
if [[ -n "${TINKER_API_KEY:-}" ]]; then secret "$NS" distill-tinker api-key TINKER_API_KEY; else
  say "TINKER_API_KEY not set: no distill-tinker Secret (the local engine runs instead)"; fi
if [[ -n "${HF_TOKEN:-}" ]]; then secret "$NS" distill-hub token HF_TOKEN; else
  say "HF_TOKEN not set: no distill-hub Secret (publish is a dry run)"; fi
if [[ -n "${WEBHOOK_SECRET:-}" ]]; then
  WEBHOOK_CLIENT=$(printf 'type: github\nsecret: %s\n' "$WEBHOOK_SECRET")
  export WEBHOOK_CLIENT
  secret "$NS" argo-workflows-webhook-clients github.com WEBHOOK_CLIENT
else
  say "WEBHOOK_SECRET not set: git webhooks are not accepted (infra/send-card-event.sh still works)"
fi

say "Argo Workflows (chart $ARGO_CHART_VERSION) and MinIO (chart $MINIO_CHART_VERSION)"
h repo add argo https://argoproj.github.io/argo-helm --force-update >/dev/null
h repo add minio https://charts.min.io/ --force-update >/dev/null
h repo update argo minio >/dev/null
h upgrade --install argo-workflows argo/argo-workflows --version "$ARGO_CHART_VERSION" \
  --namespace argo -f infra/argo-values.yaml --wait --timeout 10m
h upgrade --install minio minio/minio --version "$MINIO_CHART_VERSION" \
  --namespace minio -f infra/minio-values.yaml --set "buckets[0].name=$BUCKET" --wait --timeout 10m

say "distill chart"
h upgrade --install distill helm/distill --namespace "$NS" -f helm/distill/ci/minio-values.yaml \
  --set "s3.bucket=$BUCKET" --wait --timeout 5m

cat <<MSG

Cluster $CLUSTER is up.
  Argo UI      http://localhost:2746   (token: kubectl --context $CONTEXT -n $NS create token distill-submit)
  MinIO        http://localhost:9001   (user: kubectl --context $CONTEXT -n minio get secret minio-root -o jsonpath='{.data.rootUser}' | base64 -d)
Next:
  make images kind-load                   # build the phase images and load them into kind
  export ARGO_SERVER=http://localhost:2746 ARGO_NAMESPACE=$NS
  export ARGO_TOKEN="Bearer \$(kubectl --context $CONTEXT -n $NS create token distill-submit)"
  make submit PROFILE=ci WATCH=1
MSG
