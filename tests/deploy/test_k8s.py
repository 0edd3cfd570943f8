"""deploy/k8s: every manifest and both rendered overlays validate against the Kubernetes
OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors), and the
wiring between objects holds (probes, resources, references, GPU only in the gpu overlay).

Rendering: tests/deploy/kustomize.py (pure Python); when `kustomize` or `kubectl` is on
PATH the real renderer must produce the same objects.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.kustomize import KustomizeError, referenced_files, render

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="dev extra not installed: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = ("cpu", "gpu")
# Oldest and newest Kubernetes minor versions the manifests are meant for.
K8S_VERSIONS = ("1.30.0", "1.37.0")
SERVICES = ("cofeat-ingest", "cofeat-embed", "cofeat-serve")


def validate(obj: dict, version: str = K8S_VERSIONS[-1]) -> None:
    kubernetes_validate.validate(obj, version, strict=True)


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"
                  and not p.name.endswith("-patch.yaml"))


def by_key(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def pod_spec(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def all_containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return spec.get("initContainers", []) + spec["containers"]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(K8S / "overlays" / request.param)


# -- files -------------------------------------------------------------------------------

def test_kustomizations_name_existing_files_and_every_file_is_used() -> None:
    listed: set[Path] = set()
    for kust in K8S.rglob("kustomization.yaml"):
        for path in referenced_files(kust.parent):
            assert path.exists(), f"{kust} names {path}, which does not exist"
            listed.add(path.resolve())
    for path in K8S.rglob("*.yaml"):
        if path.name != "kustomization.yaml":
            assert path.resolve() in listed, f"{path} is in no kustomization"


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_each_manifest_file_validates(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} is empty"
    for doc in docs:
        for version in K8S_VERSIONS:
            validate(doc, version)


# -- rendered overlays -------------------------------------------------------------------

def test_overlay_objects_validate(overlay) -> None:
    _, objects = overlay
    assert len(by_key(objects)) == len(objects), "duplicate kind/name"
    for obj in objects:
        for version in K8S_VERSIONS:
            validate(obj, version)
        assert obj["metadata"]["namespace"] == "cofeat"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cofeat"


def test_overlay_has_the_expected_objects(overlay) -> None:
    _, objects = overlay
    assert set(by_key(objects)) >= {
        ("ConfigMap", "cofeat-settings"), ("Secret", "cofeat-secrets"),
        ("PersistentVolumeClaim", "cofeat-data"), ("Job", "cofeat-migrate"),
        ("Job", "cofeat-topics"),
        ("Deployment", "cofeat-ingest"), ("HorizontalPodAutoscaler", "cofeat-ingest"),
        ("Deployment", "cofeat-embed"), ("Deployment", "cofeat-serve"),
        ("Service", "cofeat-serve"), ("CronJob", "cofeat-refresh"),
    }


def test_services_probe_their_health_endpoints(overlay) -> None:
    _, objects = overlay
    objs = by_key(objects)
    for name in SERVICES:
        (container,) = pod_spec(objs["Deployment", name])["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] in ("/healthz", "/readyz"), (name, probe)
            assert get["port"] in ports, f"{name} {probe} uses an undeclared port"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    serve = pod_spec(objs["Deployment", "cofeat-serve"])["containers"][0]
    assert serve["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_every_container_has_requests_limits_and_runs_as_non_root(overlay) -> None:
    _, objects = overlay
    for obj in objects:
        if obj["kind"] not in ("Deployment", "CronJob", "Job"):
            continue
        spec = pod_spec(obj)
        assert spec["securityContext"]["runAsNonRoot"] is True, obj["metadata"]["name"]
        for container in all_containers(obj):
            resources = container["resources"]
            for key in ("cpu", "memory"):
                assert key in resources["requests"], (obj["metadata"]["name"], key)
                assert key in resources["limits"], (obj["metadata"]["name"], key)
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_references_resolve(overlay) -> None:
    _, objects = overlay
    objs = by_key(objects)
    for obj in objects:
        if obj["kind"] not in ("Deployment", "CronJob", "Job"):
            continue
        spec = pod_spec(obj)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in all_containers(obj):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in objs
                if "secretRef" in source:
                    assert ("Secret", source["secretRef"]["name"]) in objs
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, (obj["metadata"]["name"], mount["name"])
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in objs
    for kind, name in objs:
        if kind == "Deployment":
            deployment = objs[kind, name]
            selector = deployment["spec"]["selector"]["matchLabels"]
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), name
    service = objs["Service", "cofeat-serve"]
    serve_pod = objs["Deployment", "cofeat-serve"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= serve_pod.items()
    serve_ports = {p["name"] for p in pod_spec(objs["Deployment", "cofeat-serve"])
                   ["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= serve_ports
    hpa = objs["HorizontalPodAutoscaler", "cofeat-ingest"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) in objs
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] == "cofeat_ingest_lag"
    assert objs["PersistentVolumeClaim", "cofeat-data"]["spec"]["accessModes"] == [
        "ReadWriteMany"]


def test_settings_from_configmap_and_secret_load(overlay, monkeypatch) -> None:
    from shared.settings import load_settings

    _, objects = overlay
    objs = by_key(objects)
    env = {**objs["ConfigMap", "cofeat-settings"]["data"],
           **objs["Secret", "cofeat-secrets"]["stringData"]}
    for key, value in env.items():
        assert key.startswith("COFEAT_")
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.metrics_port == 9100
    assert str(settings.data_dir) == "/data"


def test_images_are_tagged_and_gpu_only_in_the_gpu_overlay(overlay) -> None:
    name, objects = overlay
    objs = by_key(objects)
    for obj in objects:
        if obj["kind"] in ("Deployment", "CronJob", "Job"):
            for container in all_containers(obj):
                image = container["image"]
                if image.startswith("cofeat/"):
                    assert ":0.1.0-" in image, image
                else:  # third-party images: an explicit version, never latest
                    assert re.search(r":[0-9][^:/]*$", image), image
    refresh = objs["CronJob", "cofeat-refresh"]
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for c in all_containers(refresh)]
    if name == "gpu":
        assert gpus == ["1", "1"]
        assert all(c["image"].endswith("-cuda") for c in all_containers(refresh))
        assert pod_spec(refresh)["tolerations"][0]["key"] == "nvidia.com/gpu"
    else:
        assert gpus == [None, None]
        for obj in objects:
            if obj["kind"] in ("Deployment", "CronJob", "Job"):
                for container in all_containers(obj):
                    assert "nvidia.com/gpu" not in container["resources"]["limits"]
                    if container["image"].startswith("cofeat/"):
                        assert container["image"].endswith("-cpu")
        assert objs["ConfigMap", "cofeat-settings"]["data"]["COFEAT_ALS_USE_GPU"] == "false"


def _real_kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("name", OVERLAYS)
def test_renderer_matches_kustomize(name: str) -> None:
    command = _real_kustomize()
    if command is None:
        pytest.skip("neither kustomize nor kubectl on PATH: the pure-Python render stands")
    directory = K8S / "overlays" / name
    out = subprocess.run(command + [str(directory)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    real = by_key([d for d in yaml.safe_load_all(out) if d])
    ours = by_key(render(directory))
    assert real.keys() == ours.keys()
    for key, obj in real.items():
        assert obj == ours[key], f"{key} differs between kustomize and tests/deploy/kustomize"


# -- the checks do fail on broken manifests ------------------------------------------------

def _deployment() -> dict:
    return copy.deepcopy(yaml.safe_load((BASE / "ingest-deployment.yaml").read_text()))


@pytest.mark.parametrize("breakage", ["unknown_field", "wrong_type", "missing_required",
                                      "bad_probe_port"])
def test_schema_rejects_invalid_manifests(breakage: str) -> None:
    deployment = _deployment()
    validate(deployment)  # the original is fine
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    if breakage == "unknown_field":
        container["livenessProbe"]["initialDelay"] = 10  # typo of initialDelaySeconds
    elif breakage == "wrong_type":
        deployment["spec"]["replicas"] = "two"
    elif breakage == "missing_required":
        del deployment["spec"]["selector"]
    else:
        container["readinessProbe"]["httpGet"]["port"] = [9100]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def test_broken_overlay_copy_fails(tmp_path: Path) -> None:
    copy_root = tmp_path / "k8s"
    shutil.copytree(K8S, copy_root)
    # 1. a kustomization naming a missing file
    kust = copy_root / "base" / "kustomization.yaml"
    kust.write_text(kust.read_text().replace("pvc.yaml", "pvcs.yaml"))
    with pytest.raises(KustomizeError, match="does not exist"):
        render(copy_root / "overlays" / "gpu")
    kust.write_text(kust.read_text().replace("pvcs.yaml", "pvc.yaml"))
    # 2. a patch whose target is gone
    cron = copy_root / "base" / "refresh-cronjob.yaml"
    cron.write_text(cron.read_text().replace("name: cofeat-refresh\n", "name: refresh\n", 1))
    with pytest.raises(KustomizeError, match="matches nothing"):
        render(copy_root / "overlays" / "gpu")
    shutil.copy(BASE / "refresh-cronjob.yaml", cron)
    # 3. a manifest that renders but breaks the schema
    serve = copy_root / "base" / "serve-service.yaml"
    serve.write_text(serve.read_text().replace("port: 80", "port: eighty"))
    objects = render(copy_root / "overlays" / "cpu")
    (service,) = [o for o in objects if o["kind"] == "Service"]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(service)
