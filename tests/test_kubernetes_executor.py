"""The Kubernetes executor against kmock (a Kubernetes API server on loopback) through the official client.

The executor's client is synchronous and kmock serves from the test's event loop, so every executor call runs in
a thread. Every body the executor sends must validate with kubernetes-validate (strict) for Kubernetes 1.31, the
oldest version claimed, and the newest the package ships.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import subprocess
import sys

import kmock
import kubernetes_validate
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubernetes import client

from clobjob.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, BadInput
from clobjob.executors.kubernetes import (
    KubernetesExecutor,
    KubernetesNotConfigured,
    KubernetesRefused,
    KubernetesUnavailable,
    kubectl_logs,
    parse_indexes,
    rerun_job_name,
)

NS = "backfill"
RELEASE = "polymarket"
RUN = f"{RELEASE}-3"
JOB = f"{RELEASE}-clobjob-worker-3"
VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
JOBS = "batch/v1/jobs"
PODS = "v1/pods"


class SelectingEmulator(kmock.KubernetesEmulator):
    """kmock's stateful emulator, with the label selectors (``k=v,k2=v2``) of the API server's lists."""

    async def _serve_list(self, request: kmock.Request) -> dict:
        answer = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            wanted = dict(term.split("=", 1) for term in selector.split(","))
            answer["items"] = [item for item in answer["items"]
                               if wanted.items() <= (item.get("metadata", {}).get("labels") or {}).items()]
        return answer


pytestmark = pytest.mark.kmock(cls=SelectingEmulator)


def chart_job(run_id: str = RUN, name: str = JOB, *, shards: int = 8, status: dict | None = None) -> dict:
    """The chart's worker Job of a run as the API server returns it (defaults and server-set fields included)."""
    uid = "9d2c6a1e-5b7f-4e0a-8c1d-3f4e5a6b7c8d"
    chart_labels = {
        "app.kubernetes.io/name": "clobjob", "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "worker", "app.kubernetes.io/managed-by": "Helm",
        "app.kubernetes.io/version": "0.1.0", "helm.sh/chart": "clobjob-0.1.0", "clobjob.io/run-id": run_id,
    }
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {
            "name": name, "namespace": NS, "uid": uid, "resourceVersion": "48213", "generation": 1,
            "creationTimestamp": "2026-12-01T10:00:00Z", "labels": dict(chart_labels),
            "annotations": {"meta.helm.sh/release-name": RELEASE, "meta.helm.sh/release-namespace": NS},
            "managedFields": [{"manager": "helm", "operation": "Update", "apiVersion": "batch/v1",
                               "time": "2026-12-01T10:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}],
        },
        "spec": {
            "completionMode": "Indexed", "completions": shards, "parallelism": 4,
            "backoffLimit": 2147483647, "backoffLimitPerIndex": 2, "maxFailedIndexes": 4,
            "podReplacementPolicy": "Failed", "ttlSecondsAfterFinished": 604800, "suspend": False,
            "manualSelector": False,
            "selector": {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}},
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": "worker", "operator": "In", "values": [2]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            "template": {
                "metadata": {
                    "labels": {**chart_labels, "controller-uid": uid, "batch.kubernetes.io/controller-uid": uid,
                               "job-name": name, "batch.kubernetes.io/job-name": name},
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9464",
                                    "checksum/config": "4f1d0c8e"},
                },
                "spec": {
                    "restartPolicy": "Never", "serviceAccountName": f"{RELEASE}-clobjob",
                    "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 120,
                    "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler",
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                        "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
                    "nodeSelector": {"workload": "batch"},
                    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "batch",
                                     "effect": "NoSchedule"}],
                    "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 50, "preference": {"matchExpressions": [
                            {"key": "node.kubernetes.io/lifecycle", "operator": "In", "values": ["spot"]}]}}]}},
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
                    "containers": [{
                        "name": "worker", "image": "ghcr.io/example/clobjob:0.1.0", "imagePullPolicy": "IfNotPresent",
                        "args": ["worker", "--run-id", run_id],
                        "envFrom": [{"configMapRef": {"name": f"{RELEASE}-clobjob"}}],
                        "env": [
                            {"name": "CLOBJOB_CLICKHOUSE_PASSWORD", "valueFrom": {"secretKeyRef": {
                                "name": "clickhouse-credentials", "key": "password"}}},
                            {"name": "CLOBJOB_SUBGRAPH_API_KEY", "valueFrom": {"secretKeyRef": {
                                "name": "goldsky", "key": "api-key", "optional": True}}},
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1",
                                                                             "fieldPath": "metadata.name"}}},
                            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"apiVersion": "v1",
                                                                                  "fieldPath": "metadata.namespace"}}},
                            {"name": "CLOBJOB_RUN_ID", "valueFrom": {"fieldRef": {
                                "apiVersion": "v1", "fieldPath": "metadata.labels['clobjob.io/run-id']"}}},
                        ],
                        "ports": [{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}],
                        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"},
                                      "limits": {"cpu": "1", "memory": "512Mi"}},
                        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "privileged": False, "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                        "terminationMessagePath": "/dev/termination-log",
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                    }],
                },
            },
        },
        "status": status or {"startTime": "2026-12-01T10:00:01Z", "active": 4, "ready": 4},
    }


def pod(job: str, index: int, attempt: int, phase: str, exit_code: int | None = None, reason: str = "", *,
        index_label: bool = True) -> dict:
    """A pod of an Indexed Job as the API server lists it (without the index label before Kubernetes 1.28)."""
    state = ({"terminated": {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                             "startedAt": "2026-12-01T10:00:05Z", "finishedAt": "2026-12-01T10:20:00Z"}}
             if exit_code is not None else {"running": {"startedAt": "2026-12-01T10:00:05Z"}})
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{job}-{index}-{attempt:05x}", "namespace": NS,
                     "creationTimestamp": f"2026-12-01T10:{attempt:02d}:00Z",
                     "labels": {"job-name": job, "batch.kubernetes.io/job-name": job,
                                **({"batch.kubernetes.io/job-completion-index": str(index)} if index_label else {})},
                     "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
        "spec": {"containers": [{"name": "worker", "image": "ghcr.io/example/clobjob:0.1.0"}]},
        "status": {"phase": phase, "containerStatuses": [{
            "name": "worker", "image": "ghcr.io/example/clobjob:0.1.0", "imageID": "", "ready": phase == "Running",
            "restartCount": 0, "state": state}]},
    }


@pytest.fixture
def k8s(kmock):
    """The emulated API server: the resources it serves, empty."""
    kmock.resources[JOBS] = kmock.ResourceInfo(namespaced=True, kind="Job", verbs={"get", "list", "create"})
    kmock.resources[PODS] = kmock.ResourceInfo(namespaced=True, kind="Pod", verbs={"get", "list"})
    return kmock


def connect(url: object, **options) -> KubernetesExecutor:
    configuration = client.Configuration()
    configuration.host = str(url).rstrip("/")
    return KubernetesExecutor(NS, client.ApiClient(configuration), backoff_s=0.01, **options)


@pytest.fixture
def executor(k8s) -> KubernetesExecutor:
    return connect(k8s.url)


def sent(k8s) -> list[dict]:
    """Every body the executor sent (POST, PUT, PATCH), each checked against the Kubernetes API schemas."""
    bodies = [r.data for r in k8s if str(r.method.value).upper() in ("POST", "PUT", "PATCH")]
    for body in bodies:
        for version in VERSIONS:
            kubernetes_validate.validate(body, version, strict=True)
    return bodies


def without(mapping: dict, *keys: str) -> dict:
    return {k: v for k, v in mapping.items() if k not in keys}


# -- launching a rerun ---------------------------------------------------------------------------------------------


async def test_rerun_job_copies_the_chart_template_and_changes_only_run_shards_and_lineage(k8s, executor):
    original = chart_job()
    k8s.objects[JOBS, NS, JOB] = original
    view = await asyncio.to_thread(executor.launch_rerun, f"{RUN}-r1", [RUN], shards=3, parallelism=2)

    [body] = sent(k8s)
    assert view.name == body["metadata"]["name"] == f"{JOB}-r1" and view.namespace == NS
    assert (view.run_id, view.parent_run_id, view.completions, view.parallelism) == (f"{RUN}-r1", RUN, 3, 2)
    assert k8s.objects[JOBS, NS, f"{JOB}-r1"]  # created in the API server

    labels = {**without(original["metadata"]["labels"]), "clobjob.io/run-id": f"{RUN}-r1"}
    assert body["metadata"] == {
        "name": f"{JOB}-r1", "namespace": NS, "labels": labels,
        "annotations": {**original["metadata"]["annotations"], "clobjob.io/parent-run-id": RUN}}

    template = copy.deepcopy(original["spec"]["template"])
    template["metadata"]["labels"] = {
        **without(template["metadata"]["labels"], "controller-uid", "batch.kubernetes.io/controller-uid",
                  "job-name", "batch.kubernetes.io/job-name"),
        "clobjob.io/run-id": f"{RUN}-r1"}
    template["metadata"]["annotations"]["clobjob.io/parent-run-id"] = RUN
    template["spec"]["containers"][0]["args"] = ["worker", "--run-id", f"{RUN}-r1"]
    assert body["spec"]["template"] == template  # image, env, secrets, resources, security, scheduling inherited
    assert without(body["spec"], "template") == {
        **without(original["spec"], "template", "selector", "manualSelector"),
        "completions": 3, "parallelism": 2, "maxFailedIndexes": 3}  # at most completions, as the API requires
    assert "status" not in body


async def test_launching_the_same_rerun_again_returns_its_job(k8s, executor):
    k8s.objects[JOBS, NS, JOB] = chart_job()
    first = await asyncio.to_thread(executor.launch_rerun, f"{RUN}-r1", [RUN], shards=2)
    again = await asyncio.to_thread(executor.launch_rerun, f"{RUN}-r1", [RUN], shards=2)

    assert again.name == first.name and again.run_id == f"{RUN}-r1" and again.completions == 2
    assert len(sent(k8s)) == 2  # the second create was answered 409 Conflict, then the Job was read
    assert [name for _, _, name in k8s.objects] == [JOB, f"{JOB}-r1"]


async def test_a_job_of_that_name_for_another_run_is_not_taken_for_the_rerun(k8s, executor):
    k8s.objects[JOBS, NS, JOB] = chart_job()
    k8s.objects[JOBS, NS, f"{JOB}-r1"] = chart_job("someone-else", f"{JOB}-r1")
    with pytest.raises(KubernetesRefused, match=f"Job {NS}/{JOB}-r1 already exists for run 'someone-else'"):
        await asyncio.to_thread(executor.launch_rerun, f"{RUN}-r1", [RUN], shards=2)


async def test_a_rerun_of_a_rerun_copies_the_nearest_job_left_in_its_lineage(k8s, executor):
    k8s.objects[JOBS, NS, JOB] = chart_job()  # the parent rerun's Job is gone (ttlSecondsAfterFinished)
    view = await asyncio.to_thread(executor.launch_rerun, f"{RUN}-r1-r1", [f"{RUN}-r1", RUN], shards=1)
    assert (view.name, view.run_id, view.parent_run_id) == (f"{JOB}-r1-r1", f"{RUN}-r1-r1", f"{RUN}-r1")

    r2 = chart_job(f"{RUN}-r2", f"{JOB}-r2")  # the parent rerun's Job is left, made from a newer chart
    r2["spec"]["template"]["spec"]["containers"][0]["image"] = "ghcr.io/example/clobjob:0.1.1"
    k8s.objects[JOBS, NS, f"{JOB}-r2"] = r2
    view = await asyncio.to_thread(executor.launch_rerun, f"{RUN}-r2-r1", [f"{RUN}-r2", RUN], shards=1)
    [*_, body] = sent(k8s)
    assert view.name == f"{JOB}-r2-r1"
    assert body["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/example/clobjob:0.1.1"
    assert body["spec"]["template"]["spec"]["containers"][0]["args"] == ["worker", "--run-id", f"{RUN}-r2-r1"]
    assert body["spec"]["template"]["metadata"]["labels"]["clobjob.io/run-id"] == f"{RUN}-r2-r1"
    assert "job-name" not in body["spec"]["template"]["metadata"]["labels"]


async def test_a_rerun_without_any_job_in_its_lineage_is_refused_clearly(k8s, executor):
    k8s.objects[JOBS, NS, "other-job"] = chart_job("other-run", "other-job")  # another run's Job is no source
    with pytest.raises(KubernetesRefused) as caught:
        await asyncio.to_thread(executor.launch_rerun, f"{RUN}-r1", [RUN], shards=2)
    assert f"no worker Job of run {RUN} in namespace {NS}" in str(caught.value)
    assert caught.value.exit_code == EXIT_BAD_INPUT and not sent(k8s)


async def test_a_job_without_the_worker_run_id_argument_is_no_source(k8s, executor):
    job = chart_job()
    job["spec"]["template"]["spec"]["containers"][0]["args"] = ["worker"]
    k8s.objects[JOBS, NS, JOB] = job
    with pytest.raises(KubernetesRefused, match=f"Job {NS}/{JOB} has no container 'worker' with a --run-id"):
        await asyncio.to_thread(executor.launch_rerun, f"{RUN}-r1", [RUN], shards=2)


async def test_a_template_field_the_client_does_not_know_is_refused_before_sending(k8s, executor):
    job = chart_job()
    job["spec"]["template"]["spec"]["containers"][0]["fieldOfKubernetes99"] = True  # a newer cluster's field
    k8s.objects[JOBS, NS, JOB] = job
    with pytest.raises(KubernetesRefused, match=f"could not create Job {NS}/{JOB}-r1: the kubernetes client refused"):
        await asyncio.to_thread(executor.launch_rerun, f"{RUN}-r1", [RUN], shards=2)
    assert not sent(k8s)


async def test_bad_rerun_arguments_are_refused_before_any_request(k8s, executor):
    for kwargs, message in [({"shards": 0}, "shards must be 1..100000"), ({"shards": 2, "parallelism": 0},
                                                                             "parallelism must be at least 1")]:
        with pytest.raises(BadInput, match=message):
            await asyncio.to_thread(executor.launch_rerun, f"{RUN}-r1", [RUN], **kwargs)
    with pytest.raises(BadInput, match="cannot be a Kubernetes label value"):
        await asyncio.to_thread(executor.launch_rerun, "x" * 64, [RUN], shards=1)
    with pytest.raises(BadInput, match="lineage must name its parent run first, and not itself"):
        await asyncio.to_thread(executor.launch_rerun, RUN, [RUN], shards=1)
    assert len(k8s) == 0


async def test_permission_denied_names_the_namespace_and_the_object(k8s, executor):
    k8s.objects[JOBS, NS, JOB] = chart_job()
    k8s[kmock.action.CREATE, kmock.resource(JOBS)] << kmock.KubernetesError(
        status=403, reason="Forbidden", message=f'jobs.batch is forbidden: User "system:serviceaccount:{NS}:'
        f'default" cannot create resource "jobs" in API group "batch" in the namespace "{NS}"')
    with pytest.raises(KubernetesRefused) as caught:
        await asyncio.to_thread(executor.launch_rerun, f"{RUN}-r1", [RUN], shards=2)
    assert str(caught.value).startswith(f"Kubernetes refused to create Job {NS}/{JOB}-r1: 403 Forbidden: jobs.batch "
                                        "is forbidden")
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert len(k8s[kmock.action.CREATE]) == 1 and sent(k8s)  # not retried

    k8s[kmock.action.LIST, kmock.resource(JOBS)] << kmock.KubernetesError(status=403, reason="Forbidden")
    with pytest.raises(KubernetesRefused, match=f"Kubernetes refused to list Jobs in namespace {NS} .*: 403"):
        await asyncio.to_thread(executor.job_status, RUN)


# -- status ---------------------------------------------------------------------------------------------------------


async def test_status_with_partly_failed_indexes(k8s, executor):
    status = {"startTime": "2026-12-01T10:00:01Z", "active": 1, "ready": 1, "succeeded": 3, "failed": 3,
              "completedIndexes": "0,2-3", "failedIndexes": "1",
              "conditions": [{"type": "SuccessCriteriaMet", "status": "False"}]}
    k8s.objects[JOBS, NS, JOB] = chart_job(shards=5, status=status)
    k8s.objects[JOBS, NS, "polymarket-clobjob-worker-2"] = chart_job(f"{RELEASE}-2", "polymarket-clobjob-worker-2")
    pods = [pod(JOB, 0, 1, "Succeeded", 0), pod(JOB, 1, 1, "Failed", 1), pod(JOB, 1, 2, "Failed", 137, "OOMKilled"),
            pod(JOB, 1, 3, "Failed", 1), pod(JOB, 2, 1, "Succeeded", 0),
            pod(JOB, 3, 1, "Succeeded", 0, index_label=False),
            pod(JOB, 4, 4, "Running"), pod("polymarket-clobjob-worker-2", 4, 1, "Failed", 2)]
    for p in pods:
        k8s.objects[PODS, NS, p["metadata"]["name"]] = p

    view = await asyncio.to_thread(executor.job_status, RUN)
    assert (view.name, view.run_id, view.completions, view.parallelism) == (JOB, RUN, 5, 4)
    assert view.completed_indexes == (0, 2, 3) and view.failed_indexes == (1,)
    assert (view.active, view.ready, view.succeeded, view.failed) == (1, 1, 3, 3)
    assert not view.finished and view.failure_reason is None and view.condition("SuccessCriteriaMet") is None
    assert view.phases == {0: "Succeeded", 1: "Failed", 2: "Succeeded", 3: "Succeeded", 4: "Running"}
    assert [p.exit_code for p in view.index_pods(1)] == [1, 137, 1] and view.index_pods(1)[1].reason == "OOMKilled"

    outcome = view.outcome()
    assert outcome.completed == [0, 2, 3] and outcome.failed == [1]
    assert outcome.indexes[1].exit_code == EXIT_FAILED and outcome.indexes[1].runs == 3
    assert outcome.indexes[4].exit_code is None  # still running
    assert view.logs_command(1) == (f"kubectl logs -n {NS} -l job-name={JOB},"
                                    "batch.kubernetes.io/job-completion-index=1")


async def test_a_job_failed_by_its_pod_failure_policy_is_bad_input(k8s, executor):
    status = {"failed": 2, "succeeded": 1, "completedIndexes": "0", "conditions": [
        {"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy",
         "message": "Container worker for pod backfill/x-2 failed with exit code 2 matching FailJob rule at index 0"},
        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "..."}]}
    k8s.objects[JOBS, NS, JOB] = chart_job(shards=3, status=status)
    for p in [pod(JOB, 0, 1, "Succeeded", 0), pod(JOB, 1, 1, "Failed", 143), pod(JOB, 2, 1, "Failed", 2)]:
        k8s.objects[PODS, NS, p["metadata"]["name"]] = p

    view = await asyncio.to_thread(executor.job_status, RUN)
    assert view.finished and view.failure_reason == "PodFailurePolicy"
    outcome = view.outcome()
    assert [outcome.indexes[i].exit_code for i in range(3)] == [EXIT_OK, EXIT_BAD_INPUT, EXIT_BAD_INPUT]
    assert outcome.exit_code == EXIT_BAD_INPUT


async def test_a_job_failed_by_too_many_failed_indexes_failed_its_unfinished_indexes(k8s, executor):
    status = {"failed": 3, "failedIndexes": "1", "conditions": [
        {"type": "Failed", "status": "True", "reason": "MaxFailedIndexesExceeded", "message": "..."}]}
    k8s.objects[JOBS, NS, JOB] = chart_job(shards=3, status=status)
    for p in [pod(JOB, 0, 1, "Failed", 143), pod(JOB, 1, 1, "Failed", 137, "OOMKilled")]:
        k8s.objects[PODS, NS, p["metadata"]["name"]] = p

    outcome = (await asyncio.to_thread(executor.job_status, RUN)).outcome()
    assert [outcome.indexes[i].exit_code for i in range(3)] == [EXIT_FAILED, 137, EXIT_FAILED]
    assert outcome.exit_code == EXIT_FAILED and outcome.indexes[2].runs == 0


async def test_a_run_without_a_job_has_no_status(k8s, executor):
    assert await asyncio.to_thread(executor.job_status, "run-20261201-100000") is None


async def test_server_errors_are_retried_until_the_server_answers(k8s, executor):
    k8s.objects[JOBS, NS, JOB] = chart_job()
    failures = [kmock.KubernetesError(status=503, reason="Service Unavailable"),
                kmock.KubernetesError(status=429, reason="Too Many Requests")]

    def flaky():
        if failures:
            raise failures.pop(0)
        raise NotImplementedError  # no reaction: the emulator answers

    k8s[kmock.action.LIST, kmock.resource(JOBS)] << flaky
    view = await asyncio.to_thread(executor.job_status, RUN)
    assert view.name == JOB and len(k8s[kmock.action.LIST, kmock.resource(JOBS)]) == 3


async def test_an_api_server_that_keeps_failing_or_cannot_be_reached_is_unavailable(k8s, executor):
    k8s[kmock.action.LIST, kmock.resource(JOBS)] << kmock.KubernetesError(status=500, reason="Internal Server Error")
    with pytest.raises(KubernetesUnavailable, match="could not list Jobs in namespace backfill .* after 3 attempts: "
                                                    "500"):
        await asyncio.to_thread(connect(k8s.url, attempts=3).job_status, RUN)
    assert len(k8s) == 3

    gone = connect("http://127.0.0.1:9", attempts=2)  # nothing listens on the discard port
    with pytest.raises(KubernetesUnavailable) as caught:
        await asyncio.to_thread(gone.job_status, RUN)
    assert caught.value.exit_code == EXIT_FAILED


async def test_the_kube_config_gives_the_server_and_the_namespace(k8s, tmp_path, monkeypatch):
    k8s.objects[JOBS, "team-a", JOB] = {**chart_job(), "metadata": {**chart_job()["metadata"], "namespace": "team-a"}}
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "kind",
        "clusters": [{"name": "kind", "cluster": {"server": str(k8s.url).rstrip("/")}}],
        "users": [{"name": "me", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "kind", "context": {"cluster": "kind", "user": "me", "namespace": "team-a"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    executor = await asyncio.to_thread(KubernetesExecutor)
    assert executor.namespace == "team-a"
    assert (await asyncio.to_thread(executor.job_status, RUN)).namespace == "team-a"
    assert k8s[0].headers["Authorization"] == "Bearer t0ken"


def test_no_cluster_and_no_kube_config_is_a_configuration_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubernetesNotConfigured, match="no Kubernetes configuration"):
        KubernetesExecutor()


# -- names, index lists, commands -----------------------------------------------------------------------------------

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True)


@given(names, st.lists(st.integers(1, 999), min_size=1, max_size=4))
def test_a_rerun_job_name_is_a_dns_label_derived_from_the_source_name(source, reruns):
    run_id = RUN + "".join(f"-r{n}" for n in reruns)
    name = rerun_job_name(source, RUN, run_id)
    assert DNS_LABEL.fullmatch(name) and name == rerun_job_name(source, RUN, run_id)
    assert name.endswith(f"-r{reruns[-1]}")
    if len(source) + len(run_id) - len(RUN) <= 63:
        assert name == source + run_id[len(RUN):]
    other = rerun_job_name(source, RUN, run_id + "-r1")
    assert other != name and DNS_LABEL.fullmatch(other)


def test_a_long_job_name_is_shortened_with_a_digest():
    long = "a-very-long-release-name-for-the-polymarket-backfill-clobjob-w3"  # 63 characters
    assert len(long) == 63
    first, second = rerun_job_name(long, RUN, f"{RUN}-r1"), rerun_job_name(long, RUN, f"{RUN}-r2")
    assert len(first) == len(second) == 63 and first != second
    assert first.startswith("a-very-long-release-name") and first.endswith("-r1") and second.endswith("-r2")


@given(st.sets(st.integers(0, 300), max_size=40))
def test_index_lists_parse_as_kubernetes_writes_them(indexes):
    ordered, parts = sorted(indexes), []
    for i in ordered:  # Kubernetes' form: increasing, consecutive indexes as one interval
        if parts and parts[-1][1] == i - 1:
            parts[-1][1] = i
        else:
            parts.append([i, i])
    text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)
    assert parse_indexes(text) == tuple(ordered)


@pytest.mark.parametrize("text", ["1,,2", "3-1", "2,1", "1-3,3", "a", "1-", " 1", "1;2"])
def test_malformed_index_lists_are_rejected_with_the_value(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_indexes(text)


def test_logs_commands_for_one_shard_and_for_all():
    assert kubectl_logs(NS, JOB, 3) == (f"kubectl logs -n {NS} -l job-name={JOB},"
                                        "batch.kubernetes.io/job-completion-index=3")
    assert kubectl_logs(NS, JOB, shards=8) == f"kubectl logs -n {NS} -l job-name={JOB} --prefix --max-log-requests=8"


def test_the_module_imports_without_the_kubernetes_client():
    code = ("import sys; sys.modules['kubernetes'] = None; import clobjob.executors.kubernetes as k; "
            "print(k.parse_indexes('0,2-3'))\n"
            "try:\n    k.KubernetesExecutor()\nexcept k.KubernetesNotConfigured as exc:\n    print(exc)")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    needs = "the Kubernetes executor needs the kubernetes client: pip install 'clobjob[kubernetes]'"
    assert done.stdout.splitlines() == ["(0, 2, 3)", needs]


# -- clobjob rerun and status on Kubernetes -------------------------------------------------------------------------


def kube_config(k8s, tmp_path, monkeypatch) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "kind",
        "clusters": [{"name": "kind", "cluster": {"server": str(k8s.url).rstrip("/")}}],
        "users": [{"name": "me", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "kind", "context": {"cluster": "kind", "user": "me", "namespace": NS}}]}))
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


async def test_rerun_of_failed_shards_launches_a_job_and_status_shows_it_beside_clickhouse(
        k8s, store, settings, tmp_path, monkeypatch):
    from clobjob import launch, monitor
    from clobjob.models import Checkpoint, Run, RunKind, RunParams, UnitState, WorkUnit

    units = [WorkUnit(run_id=RUN, unit_id=u, shard=u % 2, token_ids=(str(100 + u),), expected_requests=2)
             for u in range(4)]
    store.create_run(Run(run_id=RUN, shards=2, source="subgraph", params=RunParams(kind=RunKind.PLAN)), units)
    store.save_checkpoints([Checkpoint(run_id=RUN, shard=u.shard, unit_id=u.unit_id,
                                       state=UnitState.FAILED if u.shard == 1 else UnitState.DONE,
                                       cursor="", last_error="TransientSourceError: HTTP 503") for u in units])
    k8s.objects[JOBS, NS, JOB] = chart_job(shards=2, status={"completedIndexes": "0", "failedIndexes": "1",
                                                              "failed": 3, "succeeded": 1})
    k8s.objects[PODS, NS, f"{JOB}-1-a"] = pod(JOB, 1, 1, "Failed", 1)
    kube_config(k8s, tmp_path, monkeypatch)
    said: list[str] = []

    code = await asyncio.to_thread(launch.rerun_run, settings, run_id=RUN, failed_only=True, shards=None,
                                   new_shards=None, parallelism=None, on="kubernetes", say=said.append)
    assert code == 0
    (created,) = [body for body in sent(k8s) if body["kind"] == "Job"]
    assert created["metadata"]["labels"]["clobjob.io/run-id"] == f"{RUN}-r1"
    assert created["spec"]["completions"] == 1
    assert created["spec"]["template"]["spec"]["containers"][0]["args"] == ["worker", "--run-id", f"{RUN}-r1"]
    assert store.run(f"{RUN}-r1").parent_run_id == RUN
    assert any(f"kubectl logs -n {NS} -l job-name={created['metadata']['name']}" in line for line in said)

    status = await asyncio.to_thread(launch.status, settings, RUN, on="kubernetes")
    assert status["state"] == "failed" and status["job"]["name"] == JOB
    assert tuple(status["job"]["failed_indexes"]) == (1,)
    shown = monitor.render_status(status)
    assert f"logs of shard 1: kubectl logs -n {NS} -l job-name={JOB},batch.kubernetes.io/job-completion-index=1" \
        in shown
    json.dumps(status)  # the --json output stays JSON
