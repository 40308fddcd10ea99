"""The Kubernetes manifests under deploy/kubernetes/ (docs/DEPLOY.md): valid against the Kubernetes schemas,
and tied to the code they deploy.

Every manifest is validated against the Kubernetes 1.30 OpenAPI schemas bundled in `kubernetes-validate`
(offline), in strict mode, so an unknown or misspelt field fails. Two kinds are not Kubernetes API kinds and
are checked by hand here: the Prometheus Operator's `ServiceMonitor` (a CRD) and kustomize's `Kustomization`.
The kustomizations are also rendered with `kubectl kustomize` (skipped where kubectl is missing) and the
result validated. No cluster is involved: nothing here proves the manifests run, only that Kubernetes would
accept them and that they agree with the server (probe path and port, key, options, grace period).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # the `dev` extra: a missing validator fails the tests, it does not skip them
import pytest
import yaml

from badit_serve.api.limits import OPEN_PATHS
from badit_serve.launch.cli import ENV_API_KEY, build_parser
from badit_serve.launch.server_process import HEALTH_PATH
from badit_serve.launch.supervisor import DESCENDANT_GRACE_S, KILL_WAIT_S

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30"
IMAGE = "badit-serve:cpu"
SHM_MIN_BYTES = 160 * 2**20  # vLLM's minimum /dev/shm (docs/CONTAINER.md)
SERVER_EXIT_ALLOWANCE_S = 15
"""SIGTERM -> vLLM's API server has exited, in abort mode: measured 1.4-1.8 s under 16 streams
(docs/RESULTS.md "Reliability and shutdown"); the grace period allows this much."""
SLOWEST_START_S = 200
"""The slowest start the startup probe must survive (export check + vLLM compile on a small CPU)."""
NOT_API_KINDS = frozenset({"Kustomization", "ServiceMonitor"})


def yaml_files() -> list[Path]:
    return sorted(DEPLOY.rglob("*.yaml"))


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def patch_files() -> set[Path]:
    """Files named as kustomize patches: partial objects, validated only once rendered."""
    found = set()
    for path in yaml_files():
        for doc in load_docs(path):
            if doc.get("kind") == "Kustomization":
                found.update((path.parent / p["path"]).resolve() for p in doc.get("patches", []))
    return found


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every whole object under deploy/kubernetes/ (patches excluded)."""
    patches = patch_files()
    return [(p, d) for p in yaml_files() if p.resolve() not in patches for d in load_docs(p)]


def of_kind(kind: str, docs: list[tuple[Path, dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    return [d for _, d in (manifests() if docs is None else docs) if d.get("kind") == kind]


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomizations are not rendered")
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d is not None]


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


def server_deployments() -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, Deployment) for the base and every rendered overlay; without kubectl, the base file alone (the
    overlay's patch is then checked by `test_the_adapter_dir_patch_args_parse_even_without_kubectl`)."""
    if shutil.which("kubectl") is None:
        (deployment,) = of_kind("Deployment")
        yield "base", deployment
        return
    for directory in kustomization_dirs():
        for doc in kustomize(directory):
            if doc["kind"] == "Deployment":
                yield str(directory.relative_to(DEPLOY)), doc


def k8s_validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def quantity_bytes(text: str) -> int:
    units = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|k|M|G|)", str(text))
    assert match, f"unsupported quantity {text!r}"
    return int(match[1]) * units[match[2]]


def the_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def served_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


# --------------------------------------------------------------------------------------- schema validation


def test_the_deploy_directory_has_the_promised_manifests() -> None:
    kinds = {d["kind"] for _, d in manifests()}
    assert {"Deployment", "Service", "Secret", "PersistentVolumeClaim", "ServiceMonitor"} <= kinds
    assert (DEPLOY / "overlays" / "adapter-dir" / "kustomization.yaml").is_file()


@pytest.mark.parametrize(
    "path",
    [p for p in yaml_files() if p.resolve() not in patch_files()],
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_every_manifest_is_valid_against_the_kubernetes_schemas_strictly(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        if doc.get("kind") in NOT_API_KINDS:
            continue  # checked by hand below
        assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION


def test_strict_validation_rejects_a_misspelt_field_and_a_wrong_type() -> None:
    """The validator itself, on the real Deployment: what the parametrized test relies on."""
    (deployment,) = of_kind("Deployment")
    misspelt = yaml.safe_load(yaml.safe_dump(deployment))
    container = the_container(misspelt)
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        k8s_validate(misspelt)
    wrong_type = yaml.safe_load(yaml.safe_dump(deployment))
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "60"
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(wrong_type)


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_each_kustomization_renders_to_valid_objects(directory: Path) -> None:
    (kustomization,) = load_docs(directory / "kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "patches"}
    for entry in [
        *kustomization.get("resources", []),
        *(p["path"] for p in kustomization.get("patches", [])),
    ]:
        assert (directory / entry).exists(), f"{directory}/kustomization.yaml names missing {entry}"
    rendered = kustomize(directory)
    assert {d["kind"] for d in rendered} >= {"Deployment", "Service", "PersistentVolumeClaim"}
    assert "Secret" not in {d["kind"] for d in rendered}, "the Secret template must never be applied by -k"
    for doc in rendered:
        k8s_validate(doc)


def test_the_service_monitor_has_the_shape_the_operator_expects_and_scrapes_the_service() -> None:
    """ServiceMonitor is a CRD that kubernetes-validate does not know: its fields, checked by hand against
    the monitoring.coreos.com/v1 API (spec.selector, spec.endpoints[].port/path/interval/scrapeTimeout)."""
    (monitor,) = of_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    (service,) = of_kind("Service")
    labels = monitor["spec"]["selector"]["matchLabels"]
    assert set(spec["selector"]) == {"matchLabels"}
    assert labels.items() <= service["metadata"]["labels"].items(), "the selector must match the Service"
    endpoint_keys = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= endpoint_keys
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
        assert endpoint["path"] in OPEN_PATHS, "/metrics would need the key: the scrape would get 401"
        for field in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint[field])
        assert int(endpoint["scrapeTimeout"][:-1]) <= int(endpoint["interval"][:-1])


# ------------------------------------------------------------------------------------- tied to the server


def test_probes_ask_the_servers_health_path_on_its_port_without_a_key() -> None:
    for where, deployment in server_deployments():
        container = the_container(deployment)
        opts = build_parser({}).parse_args(container["args"])
        assert [p["containerPort"] for p in container["ports"]] == [opts.port], where
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] == HEALTH_PATH, (where, probe)
            assert served_port(container, get["port"]) == opts.port, (where, probe)
            assert HEALTH_PATH in OPEN_PATHS
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(opts.port)
        assert annotations["prometheus.io/path"] in OPEN_PATHS
        assert opts.host == "0.0.0.0", "the server must listen beyond the pod's loopback"


def test_the_startup_probe_outlasts_the_slowest_start() -> None:
    (deployment,) = of_kind("Deployment")
    probe = the_container(deployment)["startupProbe"]
    budget = probe.get("initialDelaySeconds", 0) + probe["periodSeconds"] * probe["failureThreshold"]
    assert budget >= 2 * SLOWEST_START_S


def test_container_args_are_options_badit_serve_accepts_and_name_the_mounted_directories() -> None:
    """`badit-serve --help`'s own parser, built in-process: an option it does not know would go to vLLM,
    so it is checked against vLLM's serve parser instead (imported only then)."""
    deployments = list(server_deployments())
    expected = {"base", "overlays/adapter-dir"} if shutil.which("kubectl") else {"base"}
    assert {where for where, _ in deployments} == expected
    for where, deployment in deployments:
        container = the_container(deployment)
        assert container["image"] == IMAGE and "command" not in container, (
            "the image's ENTRYPOINT is badit-serve"
        )
        opts, passthrough = build_parser({}).parse_known_args(container["args"])
        unknown_to_vllm = [a for a in passthrough if a.startswith("-") and not vllm_accepts(a)]
        assert not unknown_to_vllm, (where, unknown_to_vllm)
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts[str(opts.export_dir)]["readOnly"] is True, where
        if where == "overlays/adapter-dir":
            assert opts.adapter_dir is not None and mounts[str(opts.adapter_dir)]["readOnly"] is True
        else:
            assert opts.adapter_dir is None


def test_the_adapter_dir_patch_args_parse_even_without_kubectl() -> None:
    (patch,) = load_docs(DEPLOY / "overlays" / "adapter-dir" / "deployment-patch.yaml")
    opts = build_parser({}).parse_args(the_container(patch)["args"])
    assert str(opts.adapter_dir) == "/adapters"


def vllm_accepts(arg: str) -> bool:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    known = make_arg_parser(FlexibleArgumentParser())._option_string_actions
    return arg.split("=", 1)[0].replace("_", "-") in known


def test_the_api_key_comes_from_the_secret_through_the_variable_badit_serve_reads() -> None:
    (deployment,) = of_kind("Deployment")
    env = {e["name"]: e for e in the_container(deployment)["env"]}
    ref = env[ENV_API_KEY]["valueFrom"]["secretKeyRef"]
    assert build_parser({ENV_API_KEY: "k"}).parse_args(the_container(deployment)["args"]).api_key == "k"
    (secret,) = of_kind("Secret")
    assert (secret["metadata"]["name"], list(secret["stringData"])) == (ref["name"], [ref["key"]])
    assert "REPLACE-ME" in secret["stringData"][ref["key"]], "the template must hold an obvious placeholder"
    assert ref.get("optional") is not True, "without the Secret the pod must not start keyless"


def test_the_grace_period_covers_the_servers_bounded_shutdown() -> None:
    for where, deployment in server_deployments():
        spec = deployment["spec"]["template"]["spec"]
        container = the_container(deployment)
        _, passthrough = build_parser({}).parse_known_args(container["args"])
        shutdown_timeout = 0  # vLLM's default: abort in-flight requests at once
        for i, arg in enumerate(passthrough):
            if arg.startswith("--shutdown-timeout"):
                shutdown_timeout = int(arg.split("=", 1)[1] if "=" in arg else passthrough[i + 1])
        pre_stop = container.get("lifecycle", {}).get("preStop", {})
        command = pre_stop.get("exec", {}).get("command", [])
        sleep_s = int(command[1]) if command[:1] == ["sleep"] else pre_stop.get("sleep", {}).get("seconds", 0)
        needed = sleep_s + shutdown_timeout + SERVER_EXIT_ALLOWANCE_S + DESCENDANT_GRACE_S + KILL_WAIT_S
        assert spec["terminationGracePeriodSeconds"] >= needed, where


def test_the_pod_runs_as_the_images_user_with_a_read_only_root_and_writable_caches() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"useradd .*--uid 1000 .*badit", dockerfile) and "USER badit" in dockerfile
    assert 'ENTRYPOINT ["badit-serve"]' in dockerfile
    home = re.search(r"^WORKDIR (\S+)", dockerfile, re.M)
    assert home and home[1] == "/home/badit"
    for where, deployment in server_deployments():
        spec = deployment["spec"]["template"]["spec"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 1000, where
        container = the_container(deployment)
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert spec["enableServiceLinks"] is False, "a Service named vllm would set VLLM_PORT to a URI"
        volumes = {v["name"]: v for v in spec["volumes"]}
        by_path = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        # vLLM's caches (~/.cache/vllm, ~/.config/vllm) and /tmp (inductor, IPC sockets, metrics dir)
        for path in ("/tmp", home[1], "/dev/shm"):
            assert "emptyDir" in by_path[path], (where, path)
        shm = by_path["/dev/shm"]["emptyDir"]
        assert shm["medium"] == "Memory" and quantity_bytes(shm["sizeLimit"]) >= SHM_MIN_BYTES
        limit = quantity_bytes(container["resources"]["limits"]["memory"])
        kv_gib = int(next(e["value"] for e in container["env"] if e["name"] == "VLLM_CPU_KVCACHE_SPACE"))
        assert limit >= kv_gib * 2**30 + quantity_bytes(shm["sizeLimit"]), "KV cache + shm exceed the limit"
