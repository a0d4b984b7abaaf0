"""The Helm chart as the cluster would see it: rendered by the real Helm engine, validated against the Kubernetes
schemas, and its pods run as local processes with the environment the kubelet would give them."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml
from aiohttp import web

from clobjob.store.serve import EngineServer

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "clobjob"
# The oldest Kubernetes the README claims (Indexed Jobs with backoffLimitPerIndex and podReplacementPolicy are
# GA/beta-on from 1.31) and the newest whose schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.31", kubernetes_validate.latest_version())
HOOK = "helm.sh/hook"


def render(values: dict[str, Any], *, release: str = "bf", namespace: str = "data", revision: int = 1,
           upgrade: bool = False) -> dict[str, str]:
    """Template path → rendered text, as `helm install` (or upgrade) would render it."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values=values, name=release, namespace=namespace, revision=revision,
                            is_install=not upgrade, is_upgrade=upgrade)


def objects(manifests: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object of a rendering (NOTES.txt is not one)."""
    found = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            found += [doc for doc in yaml.safe_load_all(text) if doc]
    return found


def notes(manifests: dict[str, str]) -> str:
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def validate(objs: list[dict[str, Any]]) -> None:
    """Every object passes the strict schema of every claimed Kubernetes version."""
    for obj in objs:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']} invalid for {version}: {exc}") from None


def one(objs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    matching = [o for o in objs if o["kind"] == kind
                and component in (None, o["metadata"].get("labels", {}).get("app.kubernetes.io/component"))]
    assert len(matching) == 1, f"{len(matching)} {kind} objects of component {component}"
    return matching[0]


def hook_weight(obj: dict[str, Any]) -> int:
    return int(obj["metadata"].get("annotations", {}).get("helm.sh/hook-weight", "0"))


def existing_before(objs: list[dict[str, Any]], hook_obj: dict[str, Any]) -> list[dict[str, Any]]:
    """What exists when a pre-install hook starts on a fresh install: the hooks of lower weight, nothing else."""
    return [o for o in objs if "pre-install" in o["metadata"].get("annotations", {}).get(HOOK, "")
            and hook_weight(o) < hook_weight(hook_obj)]


def existing_after_install(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What exists once `helm install` returned: the release's objects and the hooks not deleted on success."""
    def kept(o: dict[str, Any]) -> bool:
        annotations = o["metadata"].get("annotations", {})
        return HOOK not in annotations or "hook-succeeded" not in annotations.get("helm.sh/hook-delete-policy", "")
    return [o for o in objs if kept(o) and "test" not in o["metadata"].get("annotations", {}).get(HOOK, "")]


def image_entrypoint() -> list[str]:
    """The Dockerfile's ENTRYPOINT (exec form), which a container's args follow."""
    found = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    return json.loads(found[-1])


class GuardedEngineServer(EngineServer):
    """`db serve` behind a user and password, as a ClickHouse server is: wrong or missing credentials get
    ClickHouse's AUTHENTICATION_FAILED (code 516), so a misnamed password variable fails."""

    def __init__(self, path: str, user: str, password: str) -> None:
        super().__init__(path)
        self.credentials = (user, password)

    def build_app(self) -> web.Application:
        app = super().build_app()

        @web.middleware
        async def authenticate(request: web.Request, handler):
            header = request.headers.get("Authorization", "")
            given = (tuple(base64.b64decode(header.removeprefix("Basic ")).decode().split(":", 1))
                     if header.startswith("Basic ") else
                     (request.headers.get("X-ClickHouse-User", "default"), request.headers.get("X-ClickHouse-Key", "")))
            if request.path != "/ping" and given != self.credentials:
                return web.Response(status=516, headers={"X-ClickHouse-Exception-Code": "516"},
                                    text=f"Code: 516. DB::Exception: {given[0]}: Authentication failed. "
                                         "(AUTHENTICATION_FAILED)\n")
            return await handler(request)

        app.middlewares.append(authenticate)
        return app


# --- the kubelet, locally ----------------------------------------------------------------------------------


_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)|\$\$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in env values and args ($$ escapes; an unknown reference stays as written)."""
    return _REFERENCE.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


@dataclass
class Pod:
    """One pod of a Job's template: its name, labels and annotations as the Job controller sets them, and its
    volumes as local directories (emptyDirs empty, ConfigMaps as files)."""

    spec: dict[str, Any]
    name: str
    namespace: str
    labels: dict[str, str]
    annotations: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # what Kubernetes itself adds (JOB_COMPLETION_INDEX)
    mounts: dict[str, Path] = field(default_factory=dict)


class Kubelet:
    """Runs a pod's containers as local processes, resolving exactly what the kubelet resolves: envFrom and env
    (ConfigMap/Secret refs against the objects that exist, downward-API fields, $(VAR) expansion), volume mounts
    (paths rewritten to local directories) and the image entrypoint before the args."""

    def __init__(self, objs: list[dict[str, Any]], root: Path, entrypoint: list[str]):
        self.objs = {(o["kind"], o["metadata"]["name"]): o for o in objs}
        self.root = root
        self.entrypoint = entrypoint
        # The image's root filesystem is read-only: the working directory is, so a relative write fails (for a
        # non-root test run; root ignores the mode).
        self.rootfs = Path(tempfile.mkdtemp(dir=root, prefix="rootfs-"))
        self.rootfs.chmod(0o555)

    def _data(self, kind: str, name: str, optional: bool) -> dict[str, str] | None:
        obj = self.objs.get((kind, name))
        if obj is None:
            assert optional, f"{kind} {name} does not exist (the pod would stay in CreateContainerConfigError)"
            return None
        data = dict(obj.get("data") or {})
        if kind == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in data.items()} | (obj.get("stringData") or {})
        return data

    def _field(self, pod: Pod, path: str) -> str:
        simple = {"metadata.name": pod.name, "metadata.namespace": pod.namespace,
                  "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default"),
                  "spec.nodeName": "local", "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}
        if path in simple:
            return simple[path]
        if found := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
            return (pod.labels if found.group(1) == "labels" else pod.annotations)[found.group(2)]
        raise AssertionError(f"fieldRef {path} is not one the downward API offers for env")

    def environment(self, pod: Pod, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            ref, kind = ((source["configMapRef"], "ConfigMap") if "configMapRef" in source
                         else (source["secretRef"], "Secret"))
            data = self._data(kind, ref["name"], ref.get("optional", False)) or {}
            env |= {source.get("prefix", "") + k: v for k, v in data.items() if _ENV_NAME.match(k)}
        for var in container.get("env", []):
            if "value" in var or "valueFrom" not in var:
                env[var["name"]] = expand(var.get("value", ""), env)
                continue
            ref = var["valueFrom"]
            if "fieldRef" in ref:
                env[var["name"]] = self._field(pod, ref["fieldRef"]["fieldPath"])
                continue
            (key, kind), = [(k, {"configMapKeyRef": "ConfigMap", "secretKeyRef": "Secret"}[k]) for k in ref]
            data = self._data(kind, ref[key]["name"], ref[key].get("optional", False))
            if data is None or ref[key]["key"] not in data:
                assert data is None or ref[key].get("optional", False), \
                    f"{var['name']}: key {ref[key]['key']} missing in {kind} {ref[key]['name']}"
                continue
            env[var["name"]] = data[ref[key]["key"]]
        return env

    def mount(self, pod: Pod) -> None:
        """Each volume of the pod as a directory, shared by its containers."""
        base = Path(tempfile.mkdtemp(dir=self.root, prefix=f"{pod.name}-"))
        for volume in pod.spec.get("volumes", []):
            where = base / volume["name"]
            where.mkdir()
            if "configMap" in volume:
                data = self._data("ConfigMap", volume["configMap"]["name"], volume["configMap"].get("optional", False))
                items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    (where / item["path"]).write_text(data[item["key"]])
            else:
                assert set(volume) == {"name", "emptyDir"}, f"volume {volume['name']}: only emptyDir and configMap here"
            pod.mounts[volume["name"]] = where

    def _local(self, container: dict[str, Any], pod: Pod):
        mounts = sorted(((m["mountPath"], pod.mounts[m["name"]]) for m in container.get("volumeMounts", [])),
                        key=lambda pair: -len(pair[0]))

        def rewrite(text: str) -> str:
            for path, local in mounts:
                if text == path or text.startswith(path.rstrip("/") + "/"):
                    return str(local) + text[len(path):]
            return text
        return rewrite

    def start(self, pod: Pod, container: dict[str, Any], **popen: Any) -> subprocess.Popen:
        """Start one container of the pod; its output goes to ``popen``'s stdout/stderr (default: captured)."""
        if not pod.mounts:
            self.mount(pod)
        rewrite = self._local(container, pod)
        env = self.environment(pod, container) | pod.env
        env = {k: rewrite(v) for k, v in env.items()}
        command = container.get("command") or self.entrypoint
        args = [rewrite(expand(a, env)) for a in container.get("args", [])]
        assert command == ["clobjob"], f"container {container['name']} does not run the clobjob entrypoint"
        process_env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
                       "HOSTNAME": pod.name, **env}
        if rewrite("/tmp") != "/tmp":
            process_env.setdefault("TMPDIR", rewrite("/tmp"))  # the container's /tmp is its emptyDir
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen([sys.executable, "-m", "clobjob", *args], env=process_env, cwd=self.rootfs,
                                text=True, **popen)

    def run_pod(self, pod: Pod, timeout: float = 120) -> list[tuple[str, int, str]]:
        """Init containers one by one, then the containers; stops at the first failure.
        Returns (container, exit code, output) per container run."""
        results = []
        for key in ("initContainers", "containers"):
            for container in pod.spec.get(key, []):
                process = self.start(pod, container)
                out, err = process.communicate(timeout=timeout)
                results.append((container["name"], process.returncode, out + err))
                if process.returncode != 0:
                    return results
        return results


def job_pod(job: dict[str, Any], index: int | None = None, attempt: int = 0) -> Pod:
    """A pod of ``job`` as the Job controller makes it (Indexed: its index in name, labels, annotation and env)."""
    template = job["spec"]["template"]
    name = job["metadata"]["name"]
    labels = {**template["metadata"].get("labels", {}), "job-name": name, "batch.kubernetes.io/job-name": name}
    annotations = dict(template["metadata"].get("annotations", {}))
    env = {}
    pod_name = f"{name}-{attempt:05x}"
    if index is not None:
        labels["batch.kubernetes.io/job-completion-index"] = annotations[
            "batch.kubernetes.io/job-completion-index"] = str(index)
        env["JOB_COMPLETION_INDEX"] = str(index)
        pod_name = f"{name}-{index}-{attempt:05x}"
    return Pod(template["spec"], pod_name, job["metadata"].get("namespace", "data"), labels, annotations, env)


def pod_of(obj: dict[str, Any]) -> Pod:
    """A Pod object (the helm test pod, a `kubectl run` pod) as it runs."""
    meta = obj["metadata"]
    return Pod(obj["spec"], meta["name"], meta.get("namespace", "data"), dict(meta.get("labels", {})),
               dict(meta.get("annotations", {})))


def fails_job(job: dict[str, Any], container: str, exit_code: int) -> bool:
    """Whether the Job's podFailurePolicy fails the whole Job for this container exit."""
    for rule in job["spec"].get("podFailurePolicy", {}).get("rules", []):
        codes = rule.get("onExitCodes")
        if not codes or codes.get("containerName", container) != container:
            continue
        matched = exit_code in codes["values"] if codes["operator"] == "In" else exit_code not in codes["values"]
        if matched:
            return rule["action"] == "FailJob"
    return False


def kubectl_run_pods(text: str) -> list[tuple[str, dict[str, Any]]]:
    """The pods of the `kubectl run … --overrides='…'` lines of NOTES.txt: (pod name, pod object)."""
    pods = []
    for line in text.splitlines():
        if found := re.search(r"kubectl -n (\S+) run (\S+) .*--image=(\S+) --overrides='(.+)'$", line):
            namespace, name, image, overrides = found.groups()
            pod = json.loads(overrides) | {"kind": "Pod"}
            pod["metadata"] = {"name": name, "namespace": namespace, "labels": {"run": name}}
            assert all(c["image"] == image for c in pod["spec"]["containers"])
            pods.append((name, pod))
    return pods
