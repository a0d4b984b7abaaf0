"""The chart's follow CronJob: rendered by the real Helm engine, strict for every claimed Kubernetes version, its
values checked by the schema — and its pod, run as the kubelet would run it, keeps ClickHouse current round after
round, a round beside another run doing nothing."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone

import helm_python as helm
import pytest

from clobjob.models import EXCHANGES, Heartbeat, Run, RunKind, RunParams, WorkUnit
from clobjob.sim import Dataset, SimConfig, SimServer
from clobjob.sim.data import HEAD_BLOCK, HEAD_TS
from clobjob.sim.rpc import Chain, RpcConfig, RpcNode
from clobjob.sources.markets import market_from_gamma
from clobjob.store import open_store
from tests.chart import (
    CHART,
    KUBE_VERSIONS,
    GuardedEngineServer,
    Kubelet,
    existing_after_install,
    image_entrypoint,
    job_pod,
    notes,
    objects,
    one,
    render,
    validate,
)
from tests.test_chart import CH, Backend

pytestmark = pytest.mark.timeout(240)

FOLLOW = CH | {"source": "all", "rpc": {"url": "https://polygon.example/v2/key-2"}, "follow": {"enabled": True}}
V2 = [address for address, version in EXCHANGES.items() if version == 2]
LAG = 10


def cronjob(values: dict) -> dict:
    return one(objects(render(values)), "CronJob", "follow")


def args_of(obj: dict) -> list[str]:
    (container,) = obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return container["args"]


@pytest.mark.parametrize("values", [FOLLOW, FOLLOW | {"follow": {
    "enabled": True, "schedule": "@hourly", "timeZone": "Europe/Paris", "shards": 4, "gamma": True,
    "activeDeadlineSeconds": 3000, "historyLimit": 1}, "podLabels": {"team": "data"}}])
def test_the_cronjob_lints_strict_and_validates_for_every_claimed_kubernetes(values):
    for version in KUBE_VERSIONS:
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{version}.0")
        assert not report["errors"] and all(m["severity"] < 2 for m in report["messages"]), report
    objs = objects(render(values))
    validate(objs)
    assert one(objs, "CronJob", "follow")["metadata"]["name"] == "bf-clobjob-follow"


def test_one_incremental_round_per_schedule_never_two_at_once():
    job = cronjob(FOLLOW)
    spec = job["spec"]
    assert (spec["schedule"], spec["concurrencyPolicy"], spec["startingDeadlineSeconds"]) == (
        "*/10 * * * *", "Forbid", 300)
    assert (spec["successfulJobsHistoryLimit"], spec["failedJobsHistoryLimit"]) == (3, 3)
    template = spec["jobTemplate"]["spec"]
    assert template["backoffLimit"] == 0 and "activeDeadlineSeconds" not in template
    assert template["podFailurePolicy"]["rules"][0] == {
        "action": "FailJob", "onExitCodes": {"containerName": "follow", "operator": "In", "values": [2]}}
    assert args_of(job) == ["backfill", "--source", "rpc", "--if-idle", "--shards", "1"]
    pod = template["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "secretKeyRef" in e.get(
        "valueFrom", {})}
    assert refs["CLOBJOB_RPC_URL"] == {"name": "bf-clobjob", "key": "rpc-url"}
    assert container["envFrom"] == [{"configMapRef": {"name": "bf-clobjob"}}]  # the release's, not a hook's
    assert container["securityContext"]["readOnlyRootFilesystem"]


def test_gamma_markets_first_when_the_universe_comes_from_gamma_or_when_asked():
    assert "--gamma" in args_of(cronjob(FOLLOW | {"universe": {"source": "gamma"}}))
    assert "--gamma" not in args_of(cronjob(FOLLOW | {"universe": {"source": "gamma"},
                                                      "follow": {"enabled": True, "gamma": False}}))
    assert "--gamma" in args_of(cronjob(FOLLOW | {"follow": {"enabled": True, "gamma": True}}))


def test_no_cronjob_unless_enabled_and_the_notes_name_it_when_it_is():
    assert not [o for o in objects(render(CH)) if o["kind"] == "CronJob"]
    assert "cronjob" not in notes(render(CH))
    assert "kubectl -n data get cronjob bf-clobjob-follow" in notes(render(FOLLOW))


@pytest.mark.parametrize("values, message", [
    ({"follow": {"enabled": True, "schedule": "every 10 minutes"}}, "at '/follow/schedule'"),
    ({"follow": {"enabled": True, "shards": 0}}, "at '/follow/shards': minimum: got 0, want 1"),
    ({"follow": {"enabled": True, "startingDeadlineSeconds": 5}}, "at '/follow/startingDeadlineSeconds'"),
    ({"follow": {"enabled": "yes"}}, "at '/follow/enabled'"),
    ({"follow": {"enabled": True, "interval": 60}}, "additional properties 'interval' not allowed"),
])
def test_schema_rejects_bad_follow_values_naming_them(values, message):
    with pytest.raises(helm.HelmValuesError) as rejected:
        render(FOLLOW | values)
    assert message in str(rejected.value)


def test_following_without_an_rpc_endpoint_fails_with_what_to_set():
    with pytest.raises(helm.HelmError, match=r"follow\.enabled reads new blocks from the chain: set rpc\.url"):
        render(CH | {"follow": {"enabled": True}})


def test_the_cronjob_pod_keeps_clickhouse_current_and_waits_beside_another_run(chdb_dir, tmp_path):
    """Rounds as the CronJob controller starts them (a Job from the jobTemplate, its pod run by the kubelet): each
    fetches the blocks from where the chain is read to the safe head; a round while another run is in progress
    does nothing and exits 0; after two rounds and a grown chain the v2 fills are exactly the chain's."""
    dataset = Dataset.generate(markets=40, seed=23)
    start = HEAD_BLOCK + (int(time.time()) - HEAD_TS) // 2 - 2_000
    chain = Chain(dataset, start_block=start, blocks=1_200, matches_per_block=0.6, seed=7)
    node = RpcNode(chain, RpcConfig.for_profile("alchemy", seed=3, head=start + 500))
    password = "pw-" + uuid.uuid4().hex[:8]
    with GuardedEngineServer(str(chdb_dir), "clobjob", password).run_in_thread() as engine, \
            SimServer(dataset, SimConfig.for_profile("clean"), rpc=node).run_in_thread() as sim:
        services = Backend(sim.url, engine.url, password)
        values = services.values(source="rpc", rpc={"url": sim.rpc_url}, follow={"enabled": True})
        values["settings"] |= {"RPC_LAG_BLOCKS": str(LAG), "RPC_CONTRACTS": ",".join(f"{a}@{start}" for a in V2)}
        objs = objects(render(values))
        kubelet = Kubelet(existing_after_install(objs), tmp_path, image_entrypoint())
        job = {"metadata": {"name": "bf-clobjob-follow-29000001", "namespace": "data"},
               "spec": one(objs, "CronJob", "follow")["spec"]["jobTemplate"]["spec"]}
        with open_store(services.settings()) as store:
            store.upsert_markets([market_from_gamma(m, i) for i, m in enumerate(dataset.markets, start=1)])

        def round_(attempt: int) -> str:
            (_, code, output), = kubelet.run_pod(job_pod(job, attempt=attempt), timeout=180)
            assert code == 0 and password not in output, output[-3000:]
            return output

        round_(0)
        with open_store(services.settings()) as store:  # the install's own run, with a live heartbeat
            store.create_run(Run(run_id="bf-1", shards=1, source="rpc", params=RunParams(kind=RunKind.PLAN)),
                             [WorkUnit(run_id="bf-1", unit_id=0, shard=0, source="rpc", block_from=0, block_to=1)])
            store.save_heartbeat(Heartbeat(run_id="bf-1", shard=0, pod="bf-clobjob-worker-1-0",
                                           at=datetime.now(timezone.utc), state="running"))
            runs = len(store.runs())
        node.configure(head=chain.end_block + LAG)
        assert "run bf-1 is in progress" in round_(1)
        with open_store(services.settings()) as store:
            assert len(store.runs()) == runs  # nothing planned beside it
            store.delete_run("bf-1")
        round_(2)
        with open_store(services.settings()) as store:
            rows = store.db.rows("SELECT id, block_number FROM {db}.clob_fills FINAL WHERE source = 'rpc'")
            raw = store.db.scalar("SELECT count() FROM {db}.clob_fills FINAL")
            latest = store.runs()[0]
            assert min(u.block_from for u in store.units(latest.run_id)) == start + 500 - LAG + 1  # from the last done
    universe = {t: m["conditionId"] for m in dataset.markets for t in json.loads(m["clobTokenIds"])}
    truth = {row[0]: row[4] for row in chain.truth(universe)}
    assert dict(rows) == truth and raw == len(truth) and truth
