"""The Helm chart (charts/clobjob) and the kustomize base (k8s/): rendered by the real engines, valid for every
claimed Kubernetes version, shaped as the executor and the worker expect — and the rendered pods run the product."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import helm_python as helm
import pytest
import yaml

from clobjob.config import Settings
from clobjob.sim import Dataset, SimConfig, SimServer, export
from clobjob.store import open_store
from tests.chart import (
    CHART,
    KUBE_VERSIONS,
    ROOT,
    GuardedEngineServer,
    Kubelet,
    existing_after_install,
    existing_before,
    fails_job,
    image_entrypoint,
    job_pod,
    kubectl_run_pods,
    notes,
    objects,
    one,
    pod_of,
    render,
    validate,
)
from tests.truth import COMPARED, expected_rows, stored_rows

pytestmark = pytest.mark.timeout(240)

CH = {"clickhouse": {"url": "http://clobjob@clickhouse.data:8123", "password": "pw-0f3a"}}
OVERRIDES = {
    "defaults": CH,
    "shards": CH | {"shards": 64, "parallelism": 16, "backoffLimitPerIndex": 1, "maxFailedIndexes": 5},
    "existing secrets": {"clickhouse": {"existingSecret": "ch", "existingSecretKeys": {"url": "dsn", "password": "pw"}},
                         "subgraph": {"existingSecret": "goldsky", "existingSecretKey": "token"},
                         "rpc": {"existingSecret": "alchemy", "existingSecretKey": "url"}},
    "inline secrets": CH | {"subgraph": {"url": "https://api.goldsky.com/x/gn", "apiKey": "k-1"},
                            "rpc": {"url": "https://polygon.example/v2/key-2"}, "source": "all"},
    "resources and scheduling": CH | {
        "resources": {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "nodeSelector": {"pool": "batch"}, "tolerations": [{"key": "batch", "operator": "Exists"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["batch"]}]}]}}},
        "imagePullSecrets": [{"name": "registry"}], "settings": {"MAX_RPS": 50, "BATCH_ROWS": "10000"}},
    "targets and universe file": CH | {"targets": "0x" + "ab" * 32 + "\n",
                                       "universe": {"source": "file", "file": '{"conditionId": "0x1"}\n'}},
    "gamma universe": CH | {"universe": {"source": "gamma"}},
    "metrics": CH | {"metrics": {"enabled": True, "port": 9200}, "podAnnotations": {"team": "data"}},
    "rehearsal": {"sim": {"enabled": True, "markets": 500, "rateLimit": 20},
                  "clickhouse": {"deploy": True, "password": "rehearse"}},
    "long release name": CH | {"fullnameOverride": "x" * 40},
}


def rendered(values, **kw):
    return objects(render(values, **kw))


def container(obj, name):
    spec = obj["spec"]["template"]["spec"] if obj["kind"] != "Pod" else obj["spec"]
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name)


def secret_refs(c):
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}


@pytest.mark.parametrize("case", list(OVERRIDES))
def test_renders_lints_strict_and_validates_for_every_claimed_kubernetes(case):
    values = OVERRIDES[case]
    for version in KUBE_VERSIONS:
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{version}.0")
        assert not report["errors"] and all(m["severity"] < 2 for m in report["messages"]), report
    objs = rendered(values)
    validate(objs)
    assert len({(o["kind"], o["metadata"]["name"]) for o in objs}) == len(objs)
    for obj in objs:
        assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]
    manifests = render(values)
    for name, pod in kubectl_run_pods(notes(manifests)):
        validate([pod])
        assert len(name) <= 63


def test_worker_job_is_the_indexed_job_the_executor_and_worker_rely_on():
    objs = rendered(OVERRIDES["shards"], release="bf", revision=3)
    job = one(objs, "Job", "worker")
    assert job["metadata"]["name"] == "bf-clobjob-worker-3"
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 64, 16)
    assert (spec["backoffLimitPerIndex"], spec["maxFailedIndexes"], spec["podReplacementPolicy"]) == (1, 5, "Failed")
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "FailJob", "onExitCodes": {"containerName": "worker", "operator": "In", "values": [2]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
    labels = {"app.kubernetes.io/name": "clobjob", "app.kubernetes.io/instance": "bf",
              "app.kubernetes.io/component": "worker", "app.kubernetes.io/managed-by": "Helm",
              "helm.sh/chart": "clobjob-0.1.0", "clobjob.io/run-id": "bf-3"}
    assert labels.items() <= job["metadata"]["labels"].items()
    assert labels.items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "bf-clobjob"
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert {"runAsNonRoot": True, "runAsUser": 10001}.items() <= pod["securityContext"].items()
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (worker,) = pod["containers"]
    assert worker["name"] == "worker" and "command" not in worker
    assert worker["args"] == ["worker", "--run-id", "bf-3"]
    hardened = worker["securityContext"]
    assert hardened["readOnlyRootFilesystem"] and not hardened["allowPrivilegeEscalation"]
    assert hardened["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in worker["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]


def test_long_release_names_keep_the_revision_in_the_job_name():
    job = one(rendered(CH, release="r" * 53, revision=12345), "Job", "worker")
    assert len(job["metadata"]["name"]) <= 63 and job["metadata"]["name"].endswith("-worker-12345")


def test_secrets_come_by_reference_and_never_sit_in_the_configmap():
    objs = rendered(OVERRIDES["inline secrets"])
    worker = container(one(objs, "Job", "worker"), "worker")
    assert secret_refs(worker) == {"CLOBJOB_CLICKHOUSE_URL": ("bf-clobjob", "clickhouse-url"),
                                   "CLOBJOB_CLICKHOUSE_PASSWORD": ("bf-clobjob", "clickhouse-password"),
                                   "CLOBJOB_SUBGRAPH_API_KEY": ("bf-clobjob", "subgraph-api-key"),
                                   "CLOBJOB_RPC_URL": ("bf-clobjob", "rpc-url")}
    secret = next(o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == "bf-clobjob")
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "clickhouse-url": "http://clobjob@clickhouse.data:8123", "clickhouse-password": "pw-0f3a",
        "subgraph-api-key": "k-1", "rpc-url": "https://polygon.example/v2/key-2"}
    configmaps = json.dumps([o for o in objs if o["kind"] == "ConfigMap"])
    for secret_value in ("pw-0f3a", "k-1", "key-2"):
        assert secret_value not in configmaps
    settings = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "bf-clobjob")["data"]
    assert settings["CLOBJOB_SUBGRAPH_URL"] == "https://api.goldsky.com/x/gn"
    assert settings["CLOBJOB_LOG_FORMAT"] == "json" and settings["CLOBJOB_HOME"] == "/tmp/clobjob"
    assert settings["CLOBJOB_SOURCE"] == "all"


def test_existing_secrets_are_referenced_and_no_chart_secret_is_made():
    objs = rendered(OVERRIDES["existing secrets"])
    assert not [o for o in objs if o["kind"] == "Secret"]
    plan, worker = one(objs, "Job", "plan"), one(objs, "Job", "worker")
    for c in (container(plan, "universe"), container(plan, "plan"), container(worker, "worker")):
        assert secret_refs(c) == {"CLOBJOB_CLICKHOUSE_URL": ("ch", "dsn"), "CLOBJOB_CLICKHOUSE_PASSWORD": ("ch", "pw"),
                                  "CLOBJOB_SUBGRAPH_API_KEY": ("goldsky", "token"),
                                  "CLOBJOB_RPC_URL": ("alchemy", "url")}


def test_plan_hook_runs_one_clobjob_command_per_container_with_its_files_mounted():
    objs = rendered(OVERRIDES["targets and universe file"], revision=2)
    plan = one(objs, "Job", "plan")
    annotations = plan["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    universe, main = container(plan, "universe"), container(plan, "plan")
    assert universe["args"] == ["markets", "load", "/etc/clobjob/universe/markets.jsonl"]
    assert main["args"] == ["plan", "--shards", "8", "--run-id", "bf-2",
                            "--markets", "/etc/clobjob/targets/markets.txt"]
    # everything the hook uses exists before it: hooks of lower weight
    before = {(o["kind"], o["metadata"]["name"]) for o in existing_before(objs, plan)}
    assert {("ConfigMap", "bf-clobjob-plan"), ("Secret", "bf-clobjob-plan"),
            ("ConfigMap", "bf-clobjob-plan-files")} <= before
    files = next(o for o in objs if o["metadata"]["name"] == "bf-clobjob-plan-files")["data"]
    assert files == {"markets.jsonl": '{"conditionId": "0x1"}\n', "markets.txt": "0x" + "ab" * 32 + "\n"}
    assert container(one(rendered(OVERRIDES["gamma universe"]), "Job", "plan"), "universe")["args"] == [
        "markets", "sync", "--gamma"]
    assert container(one(rendered(CH), "Job", "plan"), "universe")["args"] == [
        "markets", "sync", "--add-subgraph-markets"]


def test_metrics_add_the_port_the_variable_and_scrape_annotations():
    worker_job = one(rendered(OVERRIDES["metrics"]), "Job", "worker")
    template = worker_job["spec"]["template"]
    assert template["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "9200",
                                                   "prometheus.io/path": "/metrics", "team": "data"}
    worker = container(worker_job, "worker")
    assert worker["ports"] == [{"name": "metrics", "containerPort": 9200, "protocol": "TCP"}]
    assert {"name": "CLOBJOB_METRICS_PORT", "value": "9200"} in worker["env"]
    assert "annotations" not in one(rendered(CH), "Job", "worker")["spec"]["template"]["metadata"]


def test_rehearsal_points_the_workers_at_the_simulator_and_the_deployed_clickhouse():
    objs = rendered(OVERRIDES["rehearsal"])
    sim = one(objs, "Deployment", "sim")
    assert container(sim, "sim")["args"][:6] == ["sim", "serve", "--host", "0.0.0.0", "--port", "8787"]
    assert "--rate-limit" in container(sim, "sim")["args"]
    clickhouse = one(objs, "Deployment", "clickhouse")
    assert container(clickhouse, "clickhouse")["image"].startswith("clickhouse/clickhouse-server:")
    assert {"name": "data", "emptyDir": {}} in clickhouse["spec"]["template"]["spec"]["volumes"]
    settings = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "bf-clobjob")["data"]
    assert settings["CLOBJOB_SUBGRAPH_URL"] == "http://bf-clobjob-sim:8787/subgraphs/orderbook-subgraph/gn"
    secret = next(o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == "bf-clobjob")["data"]
    assert base64.b64decode(secret["clickhouse-url"]).decode() == "http://clobjob@bf-clobjob-clickhouse:8123"
    # the plan hook needs both: they come up before it
    plan = one(objs, "Job", "plan")
    before = {o["metadata"]["name"] for o in existing_before(objs, plan) if o["kind"] in ("Deployment", "Service")}
    assert before == {"bf-clobjob-sim", "bf-clobjob-clickhouse"}


def test_rbac_grants_only_what_rerun_and_status_need():
    objs = rendered(CH)
    assert one(objs, "Role")["rules"] == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}]
    binding = one(objs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "bf-clobjob", "namespace": "data"}]


def test_notes_give_the_exact_commands():
    text = notes(render(CH, release="bf", revision=2))
    job = "bf-clobjob-worker-2"
    assert f"kubectl -n data logs -l job-name={job},batch.kubernetes.io/job-completion-index=0" in text
    assert f"kubectl -n data logs -l job-name={job} --prefix --max-log-requests=8" in text
    assert "helm test bf -n data --logs" in text and "helm uninstall bf -n data" in text
    pods = dict(kubectl_run_pods(text))
    assert pods["bf-clobjob-status"]["spec"]["containers"][0]["args"] == ["status", "--run-id", "bf-2"]
    rerun = pods["bf-clobjob-rerun"]["spec"]
    assert rerun["containers"][0]["args"] == ["rerun", "--run-id", "bf-2", "--failed"]
    assert rerun["serviceAccountName"] == "bf-clobjob" and rerun["automountServiceAccountToken"] is True


@pytest.mark.parametrize("values, message", [
    ({"shards": 0}, "at '/shards': minimum: got 0, want 1"),
    ({"shards": 2.5}, "at '/shards'"),
    ({"parallelism": 0}, "at '/parallelism': minimum: got 0, want 1"),
    ({"clickhouse": {"url": "notaurl"}}, "at '/clickhouse/url': 'notaurl' does not match pattern"),
    ({"subgraph": {"url": "ftp://x"}}, "at '/subgraph/url': 'ftp://x' does not match pattern"),
    ({"source": "gamma"}, "at '/source'"),
    ({"universe": {"source": "web"}}, "at '/universe/source'"),
    ({"image": {"tag": 1.5}}, "at '/image/tag': got number, want string"),
    ({"terminationGracePeriodSeconds": 5}, "at '/terminationGracePeriodSeconds': minimum: got 5, want 30"),
    ({"shard": 3}, "additional properties 'shard' not allowed"),
    ({"settings": {"max_rps": 5}}, "invalid propertyName 'max_rps'"),
])
def test_schema_rejects_bad_values_naming_them(values, message):
    with pytest.raises(helm.HelmValuesError) as rejected:
        render(CH | values)
    assert message in str(rejected.value)


@pytest.mark.parametrize("values, message", [
    ({}, "clickhouse.url is required"),
    ({"clickhouse": {"deploy": True}}, "clickhouse.deploy needs clickhouse.password"),
    (CH | {"universe": {"source": "file"}}, "universe.source=file needs --set-file universe.file="),
    (CH | {"settings": {"RPC_URL": "https://x"}},
     "settings.RPC_URL: the chart sets CLOBJOB_RPC_URL itself; use rpc.url"),
])
def test_missing_required_values_fail_with_what_to_set(values, message):
    with pytest.raises(helm.HelmError, match=message.replace(".", r"\.")):
        render(values)


# --- kustomize ---------------------------------------------------------------------------------------------


def kustomize(path: str) -> list[dict]:
    done = subprocess.run(["kubectl", "kustomize", str(ROOT / path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.mark.parametrize("path", ["k8s/base", "k8s/overlays/example"])
def test_kustomize_output_validates(path):
    objs = kustomize(path)
    validate(objs)
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted(["ConfigMap", "Job", "Job", "Role", "RoleBinding", "Secret", "ServiceAccount"])


def test_kustomize_base_is_what_the_chart_renders():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_k8s.py"), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_example_overlay_keeps_plan_and_workers_in_step():
    objs = kustomize("k8s/overlays/example")
    plan = next(o for o in objs if o["kind"] == "Job" and o["metadata"]["name"] == "clobjob-plan")
    worker = next(o for o in objs if o["kind"] == "Job" and o["metadata"]["name"] == "clobjob-worker-1")
    assert worker["spec"]["suspend"] is True  # no hooks: started once the plan completed
    assert container(plan, "plan")["args"] == ["plan", "--shards", "16", "--run-id", "clobjob-1"]
    assert (worker["spec"]["completions"], worker["spec"]["parallelism"]) == (16, 8)
    assert container(worker, "worker")["args"] == ["worker", "--run-id", "clobjob-1"]
    for c in (container(plan, "universe"), container(plan, "plan"), container(worker, "worker")):
        assert secret_refs(c) == {"CLOBJOB_CLICKHOUSE_URL": ("clobjob", "clickhouse-url"),
                                  "CLOBJOB_CLICKHOUSE_PASSWORD": ("clickhouse", "password")}
        assert c["envFrom"] == [{"configMapRef": {"name": "clobjob"}}]
    binding = next(o for o in objs if o["kind"] == "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "clobjob", "namespace": "clobjob"}]


def test_kustomize_objects_match_the_chart():
    """The same worker pod as the chart renders (names aside): one source of behaviour for both installs."""
    objs = kustomize("k8s/overlays/example")
    worker = next(o for o in objs if o["kind"] == "Job" and o["metadata"]["name"] == "clobjob-worker-1")
    chart = one(rendered(CH, release="clobjob", revision=1), "Job", "worker")
    for key in ("completionMode", "podReplacementPolicy", "podFailurePolicy"):
        assert worker["spec"][key] == chart["spec"][key]
    ours, theirs = container(worker, "worker"), container(chart, "worker")
    assert ours["args"][:2] == theirs["args"][:2] == ["worker", "--run-id"]
    assert ours["securityContext"] == theirs["securityContext"]
    assert set(secret_refs(ours)) == set(secret_refs(theirs))
    assert worker["spec"]["template"]["spec"]["securityContext"] == chart["spec"]["template"]["spec"]["securityContext"]
    role = next(o for o in objs if o["kind"] == "Role")
    assert role["rules"] == one(rendered(CH), "Role")["rules"]


# --- the rendered chart runs the product -------------------------------------------------------------------


@dataclass
class Backend:
    """The services a release talks to, on loopback: the simulator as its subgraph, `db serve` behind a password
    as its ClickHouse server."""

    sim_url: str
    engine_url: str
    password: str
    database: str = field(default_factory=lambda: f"t_{uuid.uuid4().hex[:12]}")

    def values(self, **more) -> dict:
        clickhouse = {"url": self.engine_url.replace("//", "//clobjob@"), "password": self.password,
                      "database": self.database}
        return {"clickhouse": clickhouse, "subgraph": {"url": self.sim_url},
                "settings": {"FLUSH_INTERVAL_S": "0.5", "HEARTBEAT_INTERVAL_S": "1"}} | more

    def settings(self) -> Settings:
        return Settings(clickhouse_url=self.engine_url.replace("//", f"//clobjob:{self.password}@"),
                        clickhouse_database=self.database)

    def stored(self, tmp_path) -> dict:
        return stored_rows({"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
                            **self.settings().as_env(), "CLOBJOB_HOME": str(tmp_path / "home")})


@contextmanager
def backend(chdb_dir, dataset: Dataset, seed: int):
    password = "pw-" + uuid.uuid4().hex[:8]
    with GuardedEngineServer(str(chdb_dir), "clobjob", password).run_in_thread() as engine, \
            SimServer(dataset, SimConfig(seed=seed, rate_limit_rps=40.0, burst=10)).run_in_thread() as sim:
        yield Backend(sim.url, engine.url, password)


def helm_install(values: dict, services: Backend, tmp_path, victim: int | None = None):
    """`helm install` as processes: the plan hook's containers with what exists before it, then the worker
    Job's indexes with what exists after the install. Returns the rendering and the kubelet of the release."""
    manifests = render(values, release="bf", revision=1)
    objs = objects(manifests)
    plan = one(objs, "Job", "plan")
    results = Kubelet(existing_before(objs, plan), tmp_path, image_entrypoint()).run_pod(job_pod(plan))
    assert [(name, code) for name, code, _ in results] == [("universe", 0), ("plan", 0)], results
    assert not [name for name, _, output in results if services.password in output]
    assert "run bf-1: " in results[-1][2]
    kubelet = Kubelet(existing_after_install(objs), tmp_path, image_entrypoint())
    with open_store(services.settings(), migrate=False) as store:
        def checkpointed(shard: int) -> int:
            return store.db.scalar("SELECT sum(fills) FROM {db}.backfill_progress FINAL "
                                   "WHERE run_id = 'bf-1' AND shard = {shard:UInt32}", {"shard": shard})
        killed = run_indexed_job(kubelet, one(objs, "Job", "worker"), victim, checkpointed, services.password)
    assert killed == (victim is not None)
    return manifests, objs, kubelet


def test_the_rendered_chart_runs_the_product(chdb_dir, tmp_path):
    """helm install, as processes: the plan hook's containers, then every index of the worker Job (at most
    `parallelism` at once, one pod SIGKILLed mid-run and replaced as the Job controller would), then the helm
    test pod and the status/rerun commands of NOTES.txt — each container with the environment, mounts and
    args the kubelet would give it. The fills stored are exactly the simulator's."""
    dataset = Dataset.generate(markets=300, seed=14)
    with backend(chdb_dir, dataset, seed=14) as services:
        values = services.values(shards=4, parallelism=2, universe={"source": "subgraph"})
        manifests, objs, kubelet = helm_install(values, services, tmp_path, victim=1)

        (test_pod,) = [o for o in objs if o["kind"] == "Pod"]
        assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        (_, code, output), = kubelet.run_pod(pod_of(test_pod))
        assert code == 0 and services.password not in output, output

        for pod_name, pod in kubectl_run_pods(notes(manifests)):
            (_, code, output), = kubelet.run_pod(pod_of(pod))
            assert code == 0, (pod_name, output)
            assert services.password not in output
            if pod_name.endswith("-status"):
                assert "bf-1" in output and "done" in output
        found = services.stored(tmp_path)
    assert found["dups"] == 0 and found["rows"] == expected_rows(dataset)


def test_a_universe_file_and_targets_reach_the_plan_through_their_mounted_configmaps(chdb_dir, tmp_path):
    """--set-file universe.file and targets: the hook loads the file and plans only the targets; exactly the
    targets' fills are stored."""
    dataset = Dataset.generate(markets=60, seed=15)
    markets_file, _ = export(tmp_path / "export", markets=60, seed=15)
    targets = [m["conditionId"] for m in dataset.markets[::3]]
    with backend(chdb_dir, dataset, seed=15) as services:
        values = services.values(shards=2, parallelism=2, targets="\n".join(targets) + "\n",
                                 universe={"source": "file", "file": markets_file.read_text()})
        helm_install(values, services, tmp_path)
        found = services.stored(tmp_path)
    condition = COMPARED.index("condition_id")
    expected = {k: row for k, row in expected_rows(dataset).items() if row[condition] in set(targets)}
    assert expected and found["dups"] == 0 and found["rows"] == expected


def run_indexed_job(kubelet: Kubelet, job: dict, victim: int | None, checkpointed, secret: str) -> int:
    """The Job controller for an Indexed Job: every index to completion, at most `parallelism` pods at once, a
    failed pod replaced until `backoffLimitPerIndex`; a podFailurePolicy FailJob exit fails the test. The pod
    of index ``victim`` is SIGKILLed once, mid-run: after its first checkpoint (``checkpointed(shard)`` > 0
    fills), before it exits. No pod's output holds ``secret``. Returns how many pods were killed."""
    spec = job["spec"]
    killed = 0

    def work(index: int) -> None:
        nonlocal killed
        for attempt in range(spec["backoffLimitPerIndex"] + 1):
            pod = job_pod(job, index, attempt)
            (worker,) = pod.spec["containers"]
            process = kubelet.start(pod, worker, stdout=subprocess.DEVNULL)
            if index == victim and attempt == 0:
                while process.poll() is None and not checkpointed(index):
                    time.sleep(0.05)
                assert process.poll() is None, "the victim finished before it could be killed: slow the simulator"
                process.send_signal(signal.SIGKILL)
                killed += 1
            _, err = process.communicate(timeout=180)
            assert secret not in err
            code = 128 - process.returncode if process.returncode < 0 else process.returncode  # 137 like a pod
            assert not fails_job(job, "worker", code), f"index {index} failed the Job (exit {code}): {err[-2000:]}"
            if code == 0:
                return
        raise AssertionError(f"index {index} failed {spec['backoffLimitPerIndex'] + 1} times: {err[-2000:]}")

    with ThreadPoolExecutor(max_workers=spec["parallelism"]) as pool:
        list(pool.map(work, range(spec["completions"])))
    return killed
