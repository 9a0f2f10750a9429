#!/usr/bin/env bash
# Simulates the git host's push webhook for a change of the character card, so event-driven retraining can be
# tried on kind without a public URL: posts a GitHub-style push event to the Argo Server's events API,
#   POST $ARGO_SERVER/api/v1/events/<namespace>/github
# as the webhook client's ServiceAccount. The WorkflowEventBinding (helm/distill, events.enabled) matches it and
# submits a run whose run id is the commit. Usage: infra/send-card-event.sh [COMMIT] [CARD_PATH]
set -euo pipefail
cd "$(dirname "$0")/.."
ARGO_SERVER=${ARGO_SERVER:-http://localhost:2746}
NS=${ARGO_NAMESPACE:-distill}
KUBECTL=${KUBECTL:-kubectl}
commit=${1:-$(git rev-parse HEAD)}
card=${2:-jobs/assets/cards/beethoven.yaml}
token=$("$KUBECTL" -n "$NS" create token github.com)
payload=$(python3 -c 'import json, sys; print(json.dumps({"ref": "refs/heads/main", "after": sys.argv[1],
  "deleted": False, "commits": [{"id": sys.argv[1], "added": [], "modified": [sys.argv[2]], "removed": []}]}))' \
  "$commit" "$card")
curl --fail-with-body -sS -X POST "${ARGO_SERVER%/}/api/v1/events/$NS/github" \
  -H "Authorization: Bearer $token" -H "Content-Type: application/json" -H "X-GitHub-Event: push" \
  --data "$payload"
echo
echo "sent: push of $commit changing $card; the run appears in the Argo UI under run id $commit"
