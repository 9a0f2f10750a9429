#!/usr/bin/env bash
# `make cluster-down`: delete the kind cluster made by `make cluster-up` (everything in it goes: runs, MinIO data).
set -euo pipefail
CLUSTER=${KIND_CLUSTER:-distill}
command -v kind >/dev/null || { echo "cluster-down: kind not found" >&2; exit 1; }
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  kind delete cluster --name "$CLUSTER"
else
  echo "cluster-down: no kind cluster named $CLUSTER"
fi
