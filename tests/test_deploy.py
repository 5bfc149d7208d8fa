"""Offline checks of deploy/: render every kustomization, validate against Kubernetes schemas, assert key properties.

No kubectl, kustomize or helm here: `render()` implements exactly the kustomize fields the manifests use
(resources, namespace, images, patches as JSON6902 with a target) and refuses any other field, so a
manifest using something it cannot render faithfully fails this test instead of being half-checked.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30"
OVERLAYS = ["cpu", "gpu"]
SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding", "StorageClass"}


# --------------------------------------------------------------------------- renderer


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _apply_op(doc: dict, op: dict) -> None:
    *parents, last = _pointer(op["path"])
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    kind = op["op"]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if kind == "add":
            node.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            node[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[index]
        else:
            raise AssertionError(f"unsupported JSON6902 op {kind}")
    else:
        if kind == "add":
            node[last] = copy.deepcopy(op["value"])
        elif kind == "replace":
            assert last in node, f"replace of missing {op['path']}"
            node[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[last]
        else:
            raise AssertionError(f"unsupported JSON6902 op {kind}")


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    want = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    assert set(target) <= set(want), f"unsupported patch target fields {set(target) - set(want)}"
    return all(want[k] == v for k, v in target.items())


def _set_image(container: dict, images: list[dict]) -> None:
    image = container["image"]
    name = re.split(r"[@]", image)[0]
    name = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
    for rule in images:
        if rule["name"] == name:
            assert set(rule) <= {"name", "newName", "newTag", "digest"}, rule
            new = rule.get("newName", name)
            tag = rule.get("newTag") or (image[len(name) + 1 :] if image.startswith(name + ":") else "")
            container["image"] = f"{new}@{rule['digest']}" if "digest" in rule else (f"{new}:{tag}" if tag else new)


def render(directory: Path) -> list[dict]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kust) <= SUPPORTED, f"{directory}: kustomize fields {set(kust) - SUPPORTED} are not rendered by this test"
    assert kust["kind"] == "Kustomization"
    objects: list[dict] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        if path.is_dir():
            objects.extend(render(path))
        else:
            objects.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for patch in kust.get("patches", []):
        assert set(patch) == {"target", "patch"}, f"only inline JSON6902 patches with a target are supported: {patch}"
        ops = yaml.safe_load(patch["patch"])
        assert isinstance(ops, list), "strategic merge patches are not supported"
        hits = [o for o in objects if _matches(o, patch["target"])]
        assert hits, f"patch target matched nothing: {patch['target']}"
        for obj in hits:
            for op in ops:
                _apply_op(obj, op)
    if "namespace" in kust:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kust["namespace"]
    for obj in objects:
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            _set_image(container, kust.get("images", []))
    ids = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(ids) == len(set(ids)), f"duplicate objects in {directory}: {ids}"
    return objects


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(DEPLOY / "overlays" / name) for name in OVERLAYS} | {"base": render(DEPLOY / "base")}


def _get(objs: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _env(objs: list[dict], deployment: dict) -> dict[str, str]:
    """Effective container environment: envFrom ConfigMaps, then env (values or secret refs)."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_get(objs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "<ref>")
    return env


# --------------------------------------------------------------------------- tests


def test_every_kustomization_is_rendered():
    found = {p.parent.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("kustomization.yaml")}
    assert found == {"base"} | {f"overlays/{o}" for o in OVERLAYS}


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_schema_valid(rendered, name):
    for obj in rendered[name]:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")


@pytest.mark.parametrize("name", OVERLAYS)
def test_services_grpc_probes_lb_pdb_hpa(rendered, name):
    objs = rendered[name]
    for app, port, health in (("teran-encoder", 50051, "teran.v1.EncoderService"), ("teran-search", 50052, "teran.v1.SearchService")):
        dep = _get(objs, "Deployment", app)
        pod = dep["spec"]["template"]["spec"]
        container = pod["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, (app, probe)
        assert container["readinessProbe"]["grpc"]["service"] == health
        assert container["startupProbe"]["grpc"]["service"] == health
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and container["resources"]["limits"]
        assert container["image"].startswith("registry.example.com/teran/"), container["image"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        # graceful shutdown fits in the termination grace period
        prefix = "TERAN_ENCODER_" if app == "teran-encoder" else "TERAN_SEARCH_"
        grace = float(_env(objs, dep)[prefix + "SHUTDOWN_GRACE_S"])
        assert pod["terminationGracePeriodSeconds"] > grace + 5
        # headless Service for client-side load balancing
        svc = _get(objs, "Service", app)
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["selector"].items() <= labels.items()
        assert svc["spec"]["ports"][0]["port"] == port
        pdb = _get(objs, "PodDisruptionBudget", app)
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        hpa = _get(objs, "HorizontalPodAutoscaler", app)
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": app}
        assert hpa["spec"]["minReplicas"] >= 2 and pdb["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("name", OVERLAYS)
def test_non_root_and_locked_down(rendered, name):
    for obj in rendered[name]:
        if obj["kind"] != "Deployment":
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        for container in pod["containers"] + pod.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc.get("runAsUser", 1) > 0
            if obj["metadata"]["name"] != "teran-triton":
                assert sc["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("name", OVERLAYS)
def test_namespace_and_references(rendered, name):
    objs = rendered[name]
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "teran"
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for dep in (o for o in objs if o["kind"] == "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        for vol in pod["volumes"]:
            if "persistentVolumeClaim" in vol:
                assert ("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]) in names
            if "secret" in vol:
                assert ("Secret", vol["secret"]["secretName"]) in names
        for container in pod["containers"]:
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = _get(objs, "Secret", ref["name"])
                    assert ref["key"] in secret["stringData"]


def test_gpu_overlay_runs_triton_and_switches_encoder(rendered):
    objs = rendered["gpu"]
    triton = _get(objs, "Deployment", "teran-triton")["spec"]["template"]["spec"]["containers"][0]
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert triton["command"] == ["tritonserver"]
    assert "--model-repository=/models/teran-flickr8k/triton" in triton["args"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    model_dir = _env(objs, _get(objs, "Deployment", "teran-encoder"))["TERAN_ENCODER_MODEL_DIR"]
    assert triton["args"][0] == f"--model-repository={model_dir}/triton"
    grpc_port = next(p["port"] for p in _get(objs, "Service", "teran-triton")["spec"]["ports"] if p["name"] == "grpc")

    encoder = _get(objs, "Deployment", "teran-encoder")
    container = encoder["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    url = args[args.index("--triton-url") + 1]
    assert args[args.index("--backend") + 1] == "triton"
    assert url == f"teran-triton.teran.svc.cluster.local:{grpc_port}"
    env = _env(objs, encoder)
    assert env["TERAN_ENCODER_BACKEND"] == "triton" and env["TERAN_ENCODER_TRITON_URL"] == url
    assert "nvidia.com/gpu" not in str(container["resources"])
    # the CPU overlay is untouched
    cpu = _env(rendered["cpu"], _get(rendered["cpu"], "Deployment", "teran-encoder"))
    assert cpu["TERAN_ENCODER_BACKEND"] == "onnxruntime" and "TERAN_ENCODER_TRITON_URL" not in cpu
    assert not any("nvidia.com/gpu" in str(o) for o in rendered["cpu"])


def _help_env_names(parser) -> set[str]:
    return {name for action in parser._actions for name in re.findall(r"\bTERAN_[A-Z0-9_]+", action.help or "")}


@pytest.mark.parametrize("name", OVERLAYS)
def test_env_names_exist_in_service_help(rendered, name):
    from encoder_service.config import build_parser as encoder_parser

    known = {"teran-encoder": _help_env_names(encoder_parser())}
    search_config = pytest.importorskip("search_service.config")
    known["teran-search"] = _help_env_names(search_config.build_parser())
    objs = rendered[name]
    for app, names in known.items():
        assert len(names) > 20, f"{app}: --help lists too few variables"
        env = _env(objs, _get(objs, "Deployment", app))
        unknown = sorted(set(env) - names)
        assert not unknown, f"{app}: variables not read by the service: {unknown}"
        prefix = "TERAN_ENCODER_" if app == "teran-encoder" else "TERAN_SEARCH_"
        assert env[prefix + "METRICS_HOST"] == "0.0.0.0"  # the scraper reaches it (the services' default is loopback)


@pytest.mark.parametrize("name", OVERLAYS)
def test_webui_http_probes_and_settings(rendered, name):
    from webui.config import build_parser as webui_parser

    objs = rendered[name]
    dep = _get(objs, "Deployment", "teran-webui")
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "webui"] and container["image"].startswith("registry.example.com/teran/search")
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == container["startupProbe"]["httpGet"]["path"] == "/healthz"
    env = _env(objs, dep)
    unknown = sorted(set(env) - _help_env_names(webui_parser()))
    assert not unknown, f"teran-webui: variables not read by the gateway: {unknown}"
    assert env["TERAN_WEB_SEARCH_ADDRESS"].endswith("teran-search.teran.svc.cluster.local:50052")
    assert int(env["TERAN_WEB_PORT"]) == container["ports"][0]["containerPort"]
    assert pod["terminationGracePeriodSeconds"] > float(env["TERAN_WEB_SHUTDOWN_GRACE_S"]) + 5
    svc = _get(objs, "Service", "teran-webui")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    # Prometheus: the metrics port (own listener, opened to the scraper), its annotations and Service
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert env["TERAN_WEB_METRICS_HOST"] == "0.0.0.0" and int(env["TERAN_WEB_METRICS_PORT"]) == ports["metrics"] != ports["http"]
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == ports["metrics"]
    metrics_svc = _get(objs, "Service", "teran-webui-metrics")
    assert metrics_svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert metrics_svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_encoder_flags_in_args_exist():
    from encoder_service.config import build_parser

    flags = {opt for action in build_parser()._actions for opt in action.option_strings}
    args = _get(render(DEPLOY / "overlays" / "gpu"), "Deployment", "teran-encoder")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert {a for a in args if a.startswith("--")} <= flags


def test_milvus_values_and_uri(rendered):
    values = yaml.safe_load((DEPLOY / "milvus" / "values.yaml").read_text())
    assert values["cluster"]["enabled"] is True
    readme = (DEPLOY / "README.md").read_text()
    assert "helm install teran-milvus milvus/milvus" in readme and "deploy/milvus/values.yaml" in readme
    uri = _env(rendered["cpu"], _get(rendered["cpu"], "Deployment", "teran-search"))["TERAN_SEARCH_MILVUS_URI"]
    assert uri == "http://teran-milvus.teran.svc.cluster.local:19530"


@pytest.mark.parametrize("service", ["encoder", "search"])
def test_dockerfiles_minimal_non_root(service):
    text = (ROOT / "docker" / f"{service}.Dockerfile").read_text()
    instructions = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(froms) >= 2, "multi-stage"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11[.\d]*-slim", text, re.M)
    assert not re.search(r"^HEALTHCHECK", instructions, re.M)
    assert "torch" not in instructions.replace('! python -c "import torch"', "")
    assert re.search(r"^USER 10001", text, re.M)
    assert f'ENTRYPOINT ["python", "-m", "{service}_service"]' in text
    assert ".[serve]" in text


def test_validator_is_live():
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {"replicas": "two", "selektor": {}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
