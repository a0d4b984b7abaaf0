"""Run a backfill's shards as a Kubernetes Indexed Job: find a run's Job, launch a rerun's Job, read a Job's status.

A run's worker Job is made by the Helm chart (``helm install`` / ``upgrade``); it carries the labels
``app.kubernetes.io/name: clobjob``, ``app.kubernetes.io/component: worker`` and ``clobjob.io/run-id: <run>``,
and its container ``worker`` runs ``worker --run-id <run>`` on the shard ``JOB_COMPLETION_INDEX``.

A rerun's Job is a copy of the nearest Job of its lineage (the parent run's, else the grandparent's…), so the
chart stays the one source of the pod spec: image, environment, secrets, resources, security context and
scheduling are inherited. Only these change: the ``--run-id`` argument and the ``clobjob.io/run-id`` label
(on the Job and its pods), the annotation ``clobjob.io/parent-run-id``, ``completions`` (the rerun's shards),
``parallelism``, and ``maxFailedIndexes`` (at most ``completions``, as the API requires). Fields the API server
sets (uid, resourceVersion, selector, the controller-uid and job-name labels, status…) are dropped.

Objects are read and sent as the API's JSON, so no field of the chart's template is lost in a model. Every call
goes through one method per verb (``create_job``, ``read_job``, ``list_jobs``, ``list_pods``): an answer no
retry can fix (400, 401, 403, 404 on a collection, 422) raises ``KubernetesRefused`` (exit 2) naming the
namespace and object; 429, 5xx and connection errors are retried with full-jitter backoff, then raise
``KubernetesUnavailable`` (exit 1). The ``kubernetes`` client is imported only when an executor is made
(``pip install 'clobjob[kubernetes]'``).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import json
import os
import random
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clobjob.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SIGTERM,
    BadInput,
    ClobjobError,
)
from clobjob.executors.base import IndexOutcome, JobOutcome
from clobjob.models import Run

NAME_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"
RUN_ID_LABEL = "clobjob.io/run-id"
PARENT_ANNOTATION = "clobjob.io/parent-run-id"
INDEX_KEY = "batch.kubernetes.io/job-completion-index"  # label (GA 1.32, beta since 1.28) and annotation
WORKER_CONTAINER = "worker"
WORKER_SELECTOR = f"{NAME_LABEL}=clobjob,{COMPONENT_LABEL}=worker"
SERVER_LABELS = ("controller-uid", "batch.kubernetes.io/controller-uid", "job-name", "batch.kubernetes.io/job-name")
SERVER_METADATA = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields", "ownerReferences",
                   "selfLink", "deletionTimestamp", "deletionGracePeriodSeconds", "finalizers")
STALE_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
MAX_NAME = 63  # a Job's name becomes the job-name label of its pods: a DNS-1123 label
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
INDEX_LIST = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


class KubernetesRefused(BadInput):
    """The API server refused a request in a way no retry fixes (forbidden, not found, invalid)."""


class KubernetesUnavailable(ClobjobError):
    """The API server could not be reached or kept failing (5xx, 429, connection): retry later."""


class KubernetesNotConfigured(BadInput):
    """No Kubernetes client or configuration: neither in a cluster nor a usable kube config."""


def parse_indexes(text: str | None) -> tuple[int, ...]:
    """The indexes of Kubernetes' interval syntax (``status.completedIndexes``): ``"1,3-5,7"`` → (1, 3, 4, 5, 7)."""
    if not text:
        return ()
    if not INDEX_LIST.fullmatch(text):
        raise ValueError(f"{text!r} is not a list of indexes like '1,3-5,7'")
    indexes: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        low, high = int(first), int(last or first)
        if low > high or (indexes and low <= indexes[-1]):
            raise ValueError(f"{text!r} is not a list of increasing indexes like '1,3-5,7'")
        indexes.extend(range(low, high + 1))
    return tuple(indexes)


def kubectl_logs(namespace: str, job: str, index: int | None = None, *, shards: int = 5) -> str:
    """The ``kubectl logs`` command for one shard of a Job, or for all its shards (each line prefixed by its pod)."""
    if index is not None:
        return shlex.join(["kubectl", "logs", "-n", namespace, "-l", f"job-name={job},{INDEX_KEY}={index}"])
    return shlex.join(["kubectl", "logs", "-n", namespace, "-l", f"job-name={job}", "--prefix",
                       f"--max-log-requests={max(shards, 1)}"])


def rerun_job_name(source_job: str, source_run_id: str, run_id: str) -> str:
    """The name of run ``run_id``'s Job copied from ``source_job`` (run ``source_run_id``): the source name plus
    the rerun suffix (``-r1``…), shortened to 63 characters with a digest of the full name when too long."""
    tail = run_id[len(source_run_id):] if run_id.startswith(source_run_id) else f"-{run_id}"
    full = _dns_label(source_job + tail)
    if len(full) <= MAX_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    tail = _dns_label(tail)[-20:].lstrip("-")
    head = full[:MAX_NAME - len(tail) - len(digest) - 2].rstrip("-")
    return f"{head}-{digest}-{tail}"


def _dns_label(text: str) -> str:
    """``text`` lower-cased, every run of characters other than [a-z0-9-] made one ``-``, no ``-`` at the ends."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def _check_run_id(run_id: str) -> str:
    if not run_id or not LABEL_VALUE.fullmatch(run_id):
        raise BadInput(f"run id {run_id!r} cannot be a Kubernetes label value ({RUN_ID_LABEL}): at most 63 letters, "
                       "digits, '-', '_' or '.', starting and ending with a letter or digit")
    return run_id


def _run_selector(run_id: str) -> str:
    return f"{WORKER_SELECTOR},{RUN_ID_LABEL}={_check_run_id(run_id)}"


@dataclass(frozen=True)
class JobCondition:
    """One entry of a Job's ``status.conditions`` (Complete, Failed, FailureTarget, SuccessCriteriaMet, Suspended)."""

    type: str
    status: str
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class PodView:
    """One pod of a Job: its completion index, phase and, once its worker container ended, the exit code."""

    name: str
    index: int | None
    phase: str
    exit_code: int | None = None
    reason: str = ""  # the container's termination reason: Completed, Error, OOMKilled…
    created: str = ""

    @classmethod
    def from_api(cls, pod: dict[str, Any]) -> PodView:
        meta, status = pod.get("metadata", {}), pod.get("status", {})
        raw = (meta.get("labels") or {}).get(INDEX_KEY, (meta.get("annotations") or {}).get(INDEX_KEY))
        containers = status.get("containerStatuses") or []
        worker = next((c for c in containers if c.get("name") == WORKER_CONTAINER), containers[0] if containers else {})
        ended = (worker.get("state") or {}).get("terminated") or {}
        return cls(name=meta.get("name", ""), index=int(raw) if raw is not None and str(raw).isdigit() else None,
                   phase=status.get("phase", "Unknown"), exit_code=ended.get("exitCode"),
                   reason=ended.get("reason", ""), created=meta.get("creationTimestamp", ""))


@dataclass(frozen=True)
class JobView:
    """A worker Job as the API server reports it, with its pods."""

    name: str
    namespace: str
    run_id: str
    parent_run_id: str | None
    completions: int
    parallelism: int
    completed_indexes: tuple[int, ...] = ()
    failed_indexes: tuple[int, ...] = ()
    active: int = 0
    ready: int = 0
    succeeded: int = 0
    failed: int = 0  # failed pods (every attempt), not indexes
    terminating: int = 0
    conditions: tuple[JobCondition, ...] = ()
    pods: tuple[PodView, ...] = field(default=(), repr=False)

    @classmethod
    def from_api(cls, job: dict[str, Any], pods: Sequence[dict[str, Any]] = ()) -> JobView:
        meta, spec, status = job.get("metadata", {}), job.get("spec", {}), job.get("status") or {}
        where = f"Job {meta.get('namespace')}/{meta.get('name')}"
        try:
            completed = parse_indexes(status.get("completedIndexes"))
            failed = parse_indexes(status.get("failedIndexes"))
        except ValueError as exc:
            raise KubernetesRefused(f"{where}: unreadable status: {exc}") from None
        return cls(
            name=meta.get("name", ""), namespace=meta.get("namespace", ""),
            run_id=(meta.get("labels") or {}).get(RUN_ID_LABEL, ""),
            parent_run_id=(meta.get("annotations") or {}).get(PARENT_ANNOTATION),
            completions=spec.get("completions") or 1, parallelism=spec.get("parallelism") or 1,
            completed_indexes=completed, failed_indexes=failed,
            active=status.get("active") or 0, ready=status.get("ready") or 0,
            succeeded=status.get("succeeded") or 0, failed=status.get("failed") or 0,
            terminating=status.get("terminating") or 0,
            conditions=tuple(JobCondition(c.get("type", ""), c.get("status", ""), c.get("reason", ""),
                                          c.get("message", "")) for c in status.get("conditions") or ()),
            pods=tuple(sorted((PodView.from_api(p) for p in pods), key=lambda p: (p.created, p.name))),
        )

    def condition(self, kind: str) -> JobCondition | None:
        """The condition of this type when it holds (status True), else None."""
        return next((c for c in self.conditions if c.type == kind and c.status == "True"), None)

    @property
    def finished(self) -> bool:
        return bool(self.condition("Complete") or self.condition("Failed"))

    @property
    def failure_reason(self) -> str | None:
        """Why the Job failed (PodFailurePolicy, BackoffLimitExceeded, MaxFailedIndexesExceeded…), or None."""
        failed = self.condition("Failed") or self.condition("FailureTarget")
        return (failed.reason or "Failed") if failed else None

    def index_pods(self, index: int) -> list[PodView]:
        """The pods that ran this completion index, oldest first (pods already deleted are not counted)."""
        return [p for p in self.pods if p.index == index]

    @property
    def phases(self) -> dict[int, str]:
        """The phase of each index's newest pod (indexes without a pod are absent)."""
        return {p.index: p.phase for p in self.pods if p.index is not None}

    def outcome(self) -> JobOutcome:
        """The Job's result with the local executor's semantics: a completed index exits 0; a failed one with its
        pod's exit code when known, else 1 (2 when the Job failed by its podFailurePolicy, i.e. on bad input);
        an index still running has no exit code, unless the Job failed (then it fails with the Job)."""
        fallback = EXIT_BAD_INPUT if self.failure_reason == "PodFailurePolicy" else EXIT_FAILED
        indexes: dict[int, IndexOutcome] = {}
        for index in range(self.completions):
            pods = self.index_pods(index)
            ended = pods[-1].exit_code if pods and pods[-1].exit_code not in (None, EXIT_OK) else None
            if index in self.completed_indexes:
                code: int | None = EXIT_OK
            elif index in self.failed_indexes:
                code = ended if ended is not None else fallback
            elif self.failure_reason:  # stopped because the Job failed: its own SIGTERM is not the cause
                code = ended if ended not in (None, EXIT_SIGTERM) else fallback
            else:
                code = None
            indexes[index] = IndexOutcome(index, code, len(pods))
        return JobOutcome(indexes)

    def logs_command(self, index: int | None = None) -> str:
        """``kubectl logs`` for one shard of this Job, or for all of them."""
        return kubectl_logs(self.namespace, self.name, index, shards=self.completions)


def _api_client_and_namespace() -> tuple[Any, str]:
    """A client for this pod's cluster (in-cluster config) or else the kube config's current context
    (``$KUBECONFIG``, default ``~/.kube/config``), with its namespace."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise KubernetesNotConfigured("the Kubernetes executor needs the kubernetes client: "
                                      "pip install 'clobjob[kubernetes]'") from None
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        pass
    else:
        namespace = SA_NAMESPACE_FILE.read_text().strip() if SA_NAMESPACE_FILE.exists() else ""
        return client.ApiClient(configuration), namespace or "default"
    path = os.environ.get("KUBECONFIG")
    try:
        config.load_kube_config(config_file=path, client_configuration=configuration)
        _, context = config.list_kube_config_contexts(config_file=path)
    except (config.ConfigException, OSError) as exc:
        raise KubernetesNotConfigured(f"no Kubernetes configuration: not in a cluster, and no usable kube config "
                                      f"($KUBECONFIG or ~/.kube/config): {exc}") from None
    return client.ApiClient(configuration), (context.get("context") or {}).get("namespace") or "default"


class KubernetesExecutor:
    """Worker Jobs of one namespace: the Job of a run, a rerun's Job copied from its lineage, a Job's status.

    Without ``api_client`` the client is configured in-cluster (the pod's service account and namespace) or from
    the kube config (its current context and namespace), so it works in a pod and from a laptop."""

    def __init__(self, namespace: str | None = None, api_client: Any = None, *, attempts: int = 5,
                 backoff_s: float = 0.5, timeout_s: float = 30.0) -> None:
        if api_client is None:
            api_client, found = _api_client_and_namespace()
            namespace = namespace or found
        from kubernetes import client

        self.namespace = namespace or "default"
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s

    # -- one method per verb ------------------------------------------------------------------------------------

    def create_job(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """Create a Job; None when a Job of that name already exists (409)."""
        name = body["metadata"]["name"]
        return self._request(f"create Job {self.namespace}/{name}", lambda: self.batch.create_namespaced_job(
            self.namespace, body, _preload_content=False, _request_timeout=self.timeout_s), missing_ok=False)

    def read_job(self, name: str) -> dict[str, Any] | None:
        """The Job of that name; None when there is none (404)."""
        return self._request(f"read Job {self.namespace}/{name}", lambda: self.batch.read_namespaced_job(
            name, self.namespace, _preload_content=False, _request_timeout=self.timeout_s), missing_ok=True)

    def list_jobs(self, selector: str) -> list[dict[str, Any]]:
        """The Jobs matching a label selector."""
        answer = self._request(f"list Jobs in namespace {self.namespace} ({selector})",
                               lambda: self.batch.list_namespaced_job(
                                   self.namespace, label_selector=selector, _preload_content=False,
                                   _request_timeout=self.timeout_s), missing_ok=False)
        return (answer or {}).get("items") or []

    def list_pods(self, selector: str) -> list[dict[str, Any]]:
        """The pods matching a label selector."""
        answer = self._request(f"list pods in namespace {self.namespace} ({selector})",
                               lambda: self.core.list_namespaced_pod(
                                   self.namespace, label_selector=selector, _preload_content=False,
                                   _request_timeout=self.timeout_s), missing_ok=False)
        return (answer or {}).get("items") or []

    def _request(self, what: str, call: Callable[[], Any], *, missing_ok: bool) -> dict[str, Any] | None:
        """One API call's JSON answer; None for 404 (``missing_ok``) or 409. Retries what a retry can fix."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        for attempt in range(1, self.attempts + 1):
            try:
                answer = call()
            except ApiException as exc:
                if exc.status == 409 or (exc.status == 404 and missing_ok):
                    return None
                if exc.status != 429 and not 500 <= (exc.status or 0) <= 599:
                    raise KubernetesRefused(f"Kubernetes refused to {what}: {_api_reason(exc)}") from None
                problem = _api_reason(exc)
            except urllib3.exceptions.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            except ValueError as exc:  # the client's model of the object refused the body before sending it
                raise KubernetesRefused(f"could not {what}: the kubernetes client refused the body: {exc}") from None
            else:
                try:
                    return json.loads(answer.data)
                finally:
                    answer.release_conn()
            if attempt < self.attempts:
                time.sleep(random.uniform(0.0, min(30.0, self.backoff_s * 2 ** (attempt - 1))))
        raise KubernetesUnavailable(f"could not {what} after {self.attempts} attempts: {problem}")

    # -- runs and their Jobs ------------------------------------------------------------------------------------

    def job_for_run(self, run_id: str) -> dict[str, Any] | None:
        """The worker Job of a run (the newest if several carry its label), None when there is none."""
        jobs = self.list_jobs(_run_selector(run_id))
        return max(jobs, key=lambda j: j.get("metadata", {}).get("creationTimestamp", "")) if jobs else None

    def job_status(self, run_id: str) -> JobView | None:
        """The run's Job with its pods, None when the run has no Job (run elsewhere, or deleted after its TTL)."""
        job = self.job_for_run(run_id)
        if job is None:
            return None
        return JobView.from_api(job, self.list_pods(f"job-name={job['metadata']['name']}"))

    def launch_rerun(self, run_id: str, lineage: Sequence[str], *, shards: int,
                     parallelism: int | None = None) -> JobView:
        """Create rerun ``run_id``'s Job (``shards`` completions) as a copy of the nearest Job of ``lineage``, its
        parent run first, then the parent's parent…; returns the Job. Launching again returns the same Job."""
        _check_run_id(run_id)
        if not lineage or run_id in lineage:
            raise BadInput(f"rerun {run_id}: its lineage must name its parent run first, and not itself: {lineage!r}")
        if not 1 <= shards <= 100_000:
            raise BadInput(f"rerun {run_id}: shards must be 1..100000 (an Indexed Job's completions), got {shards}")
        parallelism = shards if parallelism is None else parallelism
        if parallelism < 1:
            raise BadInput(f"rerun {run_id}: parallelism must be at least 1, got {parallelism}")
        source_run, source = next(((r, job) for r in lineage if (job := self.job_for_run(r)) is not None),
                                  (None, None))
        if source is None:
            raise KubernetesRefused(
                f"rerun {run_id}: no worker Job of run {', '.join(lineage)} in namespace {self.namespace} to copy the "
                f"pod template from (deleted after its ttlSecondsAfterFinished?); relaunch with `helm upgrade`")
        body = rerun_job(source, source_run, run_id, lineage[0], shards=shards, parallelism=parallelism)
        name = body["metadata"]["name"]
        job = self.create_job(body) or self.read_job(name)
        if job is None:
            raise KubernetesUnavailable(f"Job {self.namespace}/{name} already existed and then vanished: launch again")
        owner = job.get("metadata", {}).get("labels", {}).get(RUN_ID_LABEL)
        if owner != run_id:
            raise KubernetesRefused(f"Job {self.namespace}/{name} already exists for run {owner!r}, not {run_id!r}")
        return JobView.from_api(job)

    def logs_command(self, job_name: str, index: int | None = None, shards: int = 5) -> str:
        """``kubectl logs`` for one shard of a Job of this namespace, or for all ``shards`` of it."""
        return kubectl_logs(self.namespace, job_name, index, shards=shards)

    async def launch(self, run: Run, *, parallelism: int, stop: asyncio.Event,
                     lineage: Sequence[str] = ()) -> JobOutcome:
        """Start rerun ``run``'s Job (its ``lineage``: parent run first) and return its outcome so far; a run's
        first Job is the chart's (``helm install`` / ``helm upgrade``). ``stop`` is not needed: the Job runs on."""
        if not run.parent_run_id or not lineage:
            raise BadInput(f"run {run.run_id}: on Kubernetes a run's first Job comes from the chart "
                           "(helm install / helm upgrade); clobjob launches reruns")
        view = await asyncio.to_thread(self.launch_rerun, run.run_id, lineage, shards=run.shards,
                                       parallelism=parallelism)
        return view.outcome()


def in_a_cluster() -> bool:
    """Whether this process runs in a Kubernetes pod."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def kube_config_present() -> bool:
    """Whether a kube config is there to reach a cluster from outside it."""
    path = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    return any(Path(p).is_file() for p in path.split(os.pathsep) if p)


def job_summary(view: JobView) -> dict[str, Any]:
    """A Job's status as JSON-ready data, with the ``kubectl logs`` command of every shard whose index failed or
    whose newest pod failed (for ``clobjob status``)."""
    failing = sorted(set(view.failed_indexes) | {i for i, phase in view.phases.items() if phase == "Failed"})
    return {**dataclasses.asdict(view), "failure_reason": view.failure_reason, "finished": view.finished,
            "logs": {str(i): view.logs_command(i) for i in failing}, "logs_all": view.logs_command()}


def rerun_job(source: dict[str, Any], source_run_id: str, run_id: str, parent_run_id: str, *, shards: int,
              parallelism: int) -> dict[str, Any]:
    """The body of run ``run_id``'s Job: ``source`` (run ``source_run_id``'s Job as the API returned it) with only
    the changes the module docstring lists."""
    meta, spec = source.get("metadata", {}), source.get("spec", {})
    where = f"Job {meta.get('namespace')}/{meta.get('name')}"
    template = copy.deepcopy(spec.get("template") or {})
    worker = next((c for c in template.get("spec", {}).get("containers", []) if c.get("name") == WORKER_CONTAINER),
                  None)
    args = (worker or {}).get("args") or []
    at = next((i for i, a in enumerate(args) if a == "--run-id" or a.startswith("--run-id=")), None)
    if worker is None or at is None or (args[at] == "--run-id" and at + 1 >= len(args)):
        raise KubernetesRefused(f"{where} has no container {WORKER_CONTAINER!r} with a --run-id argument: "
                                "it was not made by the clobjob chart")
    if args[at] == "--run-id":
        args[at + 1] = run_id
    else:
        args[at] = f"--run-id={run_id}"
    template["metadata"] = _copied_metadata(template.get("metadata") or {}, run_id, parent_run_id)
    new_spec = {k: copy.deepcopy(v) for k, v in spec.items() if k not in ("selector", "manualSelector")}
    new_spec.update(completions=shards, parallelism=parallelism, template=template)
    if new_spec.get("maxFailedIndexes") is not None:
        new_spec["maxFailedIndexes"] = min(new_spec["maxFailedIndexes"], shards)
    metadata = _copied_metadata(meta, run_id, parent_run_id)
    metadata["name"] = rerun_job_name(meta.get("name", ""), source_run_id, run_id)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": new_spec}


def _copied_metadata(meta: dict[str, Any], run_id: str, parent_run_id: str) -> dict[str, Any]:
    """Object metadata without what the API server sets, for run ``run_id`` (label) of ``parent_run_id``."""
    kept = {k: copy.deepcopy(v) for k, v in meta.items() if k not in SERVER_METADATA}
    kept["labels"] = {k: v for k, v in (meta.get("labels") or {}).items() if k not in SERVER_LABELS}
    kept["labels"][RUN_ID_LABEL] = run_id
    kept["annotations"] = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in STALE_ANNOTATIONS}
    kept["annotations"][PARENT_ANNOTATION] = parent_run_id
    return kept


def _api_reason(exc: Any) -> str:
    """``403 Forbidden: <the API server's message>`` from an ApiException."""
    try:
        message = json.loads(exc.body or "{}").get("message", "")
    except (ValueError, AttributeError):
        message = ""
    return f"{exc.status} {exc.reason}" + (f": {message}" if message else "")

