#!/usr/bin/env bash
# Rehearse the Helm chart on a local kind cluster, end to end: build the image, load it into kind, install the
# chart with the rehearsal options (the project's simulator as the subgraph, a single-node ClickHouse), wait for
# the plan hook and every shard, print the run's status, run `helm test` (clobjob verify).
#
# Needs docker, kind, kubectl and helm on PATH; not run in CI (no Docker engine there). From the repository root:
#
#   tests/e2e/kind.sh                 # cluster "clobjob", release "rehearsal" in namespace "clobjob"
#   MARKETS=5000 SHARDS=8 tests/e2e/kind.sh
#   DELETE=1 tests/e2e/kind.sh        # delete the kind cluster at the end
#
# Settings (environment): CLUSTER, RELEASE, NAMESPACE, IMAGE (clobjob:e2e), MARKETS (2000), SHARDS (4),
# PARALLELISM (= SHARDS), CLICKHOUSE_IMAGE (the chart's clickhouse.deployImage), TIMEOUT (15m).
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${CLUSTER:-clobjob}
RELEASE=${RELEASE:-rehearsal}
NAMESPACE=${NAMESPACE:-clobjob}
IMAGE=${IMAGE:-clobjob:e2e}
MARKETS=${MARKETS:-2000}
SHARDS=${SHARDS:-4}
PARALLELISM=${PARALLELISM:-$SHARDS}
CLICKHOUSE_IMAGE=${CLICKHOUSE_IMAGE:-clickhouse/clickhouse-server:25.8}
TIMEOUT=${TIMEOUT:-15m}

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "kind.sh needs $tool on PATH" >&2; exit 2; }
done

step() { printf '\n== %s\n' "$*"; }

step "kind cluster $CLUSTER"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
kubectl config use-context "kind-$CLUSTER" >/dev/null

step "image $IMAGE (and $CLICKHOUSE_IMAGE) into the cluster"
docker build -t "$IMAGE" .
docker pull -q "$CLICKHOUSE_IMAGE" >/dev/null
kind load docker-image "$IMAGE" "$CLICKHOUSE_IMAGE" --name "$CLUSTER"

step "helm install $RELEASE: plan hook, then $SHARDS shards ($PARALLELISM at once)"
password=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
helm upgrade --install "$RELEASE" charts/clobjob -n "$NAMESPACE" --create-namespace \
  --set image.repository="${IMAGE%:*}" --set-string image.tag="${IMAGE##*:}" --set image.pullPolicy=Never \
  --set sim.enabled=true --set sim.markets="$MARKETS" \
  --set clickhouse.deploy=true --set clickhouse.password="$password" \
  --set clickhouse.deployImage.repository="${CLICKHOUSE_IMAGE%:*}" --set-string clickhouse.deployImage.tag="${CLICKHOUSE_IMAGE##*:}" \
  --set shards="$SHARDS" --set parallelism="$PARALLELISM" \
  --wait --wait-for-jobs --timeout "$TIMEOUT"

notes=$(helm get notes "$RELEASE" -n "$NAMESPACE")
job=$(sed -n 's/.*kubectl -n [^ ]* get job \([^ ]*\) -w.*/\1/p' <<<"$notes")

step "Job $job"
kubectl -n "$NAMESPACE" get job "$job" -o wide
kubectl -n "$NAMESPACE" get pods -l job-name="$job" -L batch.kubernetes.io/job-completion-index

step "shard 0, last lines"
kubectl -n "$NAMESPACE" logs -l job-name="$job",batch.kubernetes.io/job-completion-index=0 --tail=5

step "status (the command NOTES.txt prints)"
eval "$(grep -m1 -- '-status --rm' <<<"$notes")"

step "helm test (clobjob verify)"
helm test "$RELEASE" -n "$NAMESPACE" --logs

if [[ -n "${DELETE:-}" ]]; then
  step "deleting kind cluster $CLUSTER"
  kind delete cluster --name "$CLUSTER"
fi
