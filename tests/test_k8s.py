"""docker/k8s/*.yaml: schema-valid for a fixed Kubernetes version, and consistent with the image.

Validation is offline: kubernetes-validate ships the JSON schemas of each Kubernetes release.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "docker" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
KUBERNETES_VERSION = "1.30.0"
READY, LIVE, METRICS = "/v2/health/ready", "/v2/health/live", "/metrics"

Doc = dict[str, Any]


def load_docs() -> list[tuple[Path, Doc]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def by_kind(kind: str) -> list[Doc]:
    return [d for _, d in load_docs() if d["kind"] == kind]


def one(kind: str) -> Doc:
    (doc,) = by_kind(kind)
    return doc


def container() -> Doc:
    (c,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(c)


def dockerfile_facts() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")  # join continuation lines
    (expose,) = re.findall(r"^EXPOSE\s+(\d+)", text, re.M)
    (port,) = re.findall(r"TEXTSERVE_PORT=(\d+)", text)
    (user,) = re.findall(r"^USER\s+(\d+)", text, re.M)
    (health,) = re.findall(r"^HEALTHCHECK.*$", text, re.M)
    return {"expose": expose, "port": port, "user": user, "healthcheck": health}


def test_every_manifest_validates_strictly_against_a_fixed_kubernetes_version() -> None:
    docs = load_docs()
    kinds = {d["kind"] for _, d in docs}
    expected = {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "PersistentVolumeClaim",
    }
    assert expected <= kinds
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']}: {exc.message}")
    assert one("HorizontalPodAutoscaler")["apiVersion"] == "autoscaling/v2"


def test_the_validator_rejects_a_misspelt_field() -> None:
    """The check above can fail: a typo in a probe's field name is caught."""
    bad = copy.deepcopy(one("Deployment"))
    c = bad["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_probes_and_ports_match_the_image() -> None:
    c = container()
    facts = dockerfile_facts()
    (port,) = c["ports"]
    assert str(port["containerPort"]) == facts["expose"] == facts["port"]
    assert c["readinessProbe"]["httpGet"]["path"] == READY
    assert c["livenessProbe"]["httpGet"]["path"] == LIVE
    assert c["startupProbe"]["httpGet"]["path"] in (LIVE, READY)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in (port["name"], port["containerPort"])
    assert READY in facts["healthcheck"]  # the image's HEALTHCHECK asks the same route

    config = one("ConfigMap")
    assert config["data"]["TEXTSERVE_PORT"] == facts["port"]
    assert config["data"]["TEXTSERVE_HOST"] == "0.0.0.0"
    assert config["data"]["TEXTSERVE_REPO"] == "/models"
    assert all(k.startswith("TEXTSERVE_") for k in config["data"])
    (ref,) = c["envFrom"]
    assert ref["configMapRef"]["name"] == config["metadata"]["name"]

    pod = one("Deployment")["spec"]["template"]
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == str(port["containerPort"])
    assert ann["prometheus.io/path"] == METRICS
    assert str(pod["spec"]["securityContext"]["runAsUser"]) == facts["user"]


def test_objects_reference_each_other() -> None:
    dep = one("Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = one("Service")
    assert svc["spec"]["selector"].items() <= labels.items()
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["targetPort"] in {p["name"] for p in container()["ports"]}
    target = one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", dep["metadata"]["name"])
    (cpu,) = one("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert cpu["resource"]["name"] == "cpu"
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    models = mounts["/models"]
    assert models["readOnly"] is True
    claim = volumes[models["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == one("PersistentVolumeClaim")["metadata"]["name"]
    for pdb in by_kind("PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def _mebibytes(quantity: str) -> float:
    units = {"Ki": 2**-10, "Mi": 1, "Gi": 2**10}
    for suffix, scale in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * scale
    return float(quantity) / 2**20


def test_resources_leave_room_for_tensorflow_and_the_demo_set() -> None:
    """~500 MiB for `import tensorflow` + the demo set: at least 600 MiB requested."""
    res = container()["resources"]
    assert _mebibytes(res["requests"]["memory"]) >= 600
    assert _mebibytes(res["limits"]["memory"]) >= _mebibytes(res["requests"]["memory"])
    assert set(res["limits"]) >= {"cpu", "memory"}


def _route_statuses(paths: tuple[str, ...]) -> dict[str, int]:
    """Status of GET ``path`` on the real app over ASGI (no lifespan: no model is loaded)."""
    import asyncio

    import httpx

    from server.api.app import create_app
    from server.settings import Settings

    app = create_app(Settings(repo=Path("/nonexistent-textserve-repository")))

    async def probe() -> dict[str, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://k8s") as client:
            return {p: (await client.get(p)).status_code for p in paths}

    return asyncio.run(probe())


def test_probe_paths_are_routes_the_server_answers() -> None:
    dep = one("Deployment")
    c = container()
    paths = tuple({c[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")})
    statuses = _route_statuses(paths)
    assert statuses[LIVE] == 200  # the process serves HTTP
    assert statuses[READY] == 503  # no model loaded: not ready, and the route exists
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == METRICS


def test_the_scrape_path_is_a_route_the_server_answers() -> None:
    assert _route_statuses((METRICS,))[METRICS] == 200
