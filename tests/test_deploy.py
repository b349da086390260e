"""The Kubernetes manifest and the Serve config: valid against their real schemas, in sync, able to scale.

tests/data/kuberay-v1.7.0-ray.io_rayservices.yaml.gz is KubeRay's published RayService CRD, unmodified:
github.com/ray-project/kuberay, tag v1.7.0 (commit 59d663ae), ray-operator/config/crd/bases/ray.io_rayservices.yaml.
"""

from __future__ import annotations

import copy
import gzip
from pathlib import Path

import jsonschema
import pytest
import yaml

from encoder_service.tools import kuberay

CRD = Path(__file__).parent / "data" / "kuberay-v1.7.0-ray.io_rayservices.yaml.gz"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rayservice_schema() -> dict:
    crd = yaml.safe_load(gzip.open(CRD))
    assert crd["spec"]["names"]["kind"] == "RayService"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@pytest.fixture
def manifest() -> dict:
    return yaml.safe_load(kuberay.MANIFEST.read_text())


def _errors(schema: dict, document: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_manifest_matches_kuberays_rayservice_schema(rayservice_schema, manifest):
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert _errors(rayservice_schema, manifest) == []
    # ... and the schema is strict enough to catch what a typo would do.
    broken = copy.deepcopy(manifest)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    broken["spec"]["rayClusterConfig"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    errors = _errors(rayservice_schema, broken)
    assert any("maxReplicas" in e for e in errors) and any("upscalingMode" in e for e in errors)


def test_serve_configs_are_valid_serve_deploy_configs(manifest):
    """Ray's own schema for `serve deploy` / serveConfigV2, for both files."""
    ServeDeploySchema = pytest.importorskip("ray.serve.schema").ServeDeploySchema

    for config in (yaml.safe_load(kuberay.SERVE_CONFIG.read_text()), yaml.safe_load(manifest["spec"]["serveConfigV2"])):
        ServeDeploySchema.model_validate(config)


def test_manifest_serve_config_is_serve_config_yaml_plus_documented_differences(manifest, tmp_path):
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert served == kuberay.render_serve_config()
    local = yaml.safe_load(kuberay.SERVE_CONFIG.read_text())
    differing = {path for path in kuberay.KUBERNETES if kuberay.lookup(served, path) != kuberay.lookup(local, path)}
    assert differing == set(kuberay.KUBERNETES)  # every listed difference is one (none is stale)
    # The block is what the tool writes, byte for byte: rewriting a copy changes nothing.
    copy_path = tmp_path / "rayservice.yaml"
    copy_path.write_text(kuberay.MANIFEST.read_text())
    kuberay.write_manifest(copy_path)
    assert copy_path.read_text() == kuberay.MANIFEST.read_text()


def test_manifest_can_scale_to_what_serve_asks(manifest):
    assert kuberay.check_manifest(manifest) == []
    cluster = manifest["spec"]["rayClusterConfig"]
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    app = served["applications"][0]
    max_replicas = app["deployments"][0]["autoscaling_config"]["max_replicas"]
    (group,) = cluster["workerGroupSpecs"]
    gpus_per_pod = float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert cluster["enableInTreeAutoscaling"] is True
    assert group["maxReplicas"] >= max_replicas * app["args"]["gpus_per_replica"] / gpus_per_pod


@pytest.mark.parametrize("break_it, complaint", [
    (lambda m: m["spec"]["rayClusterConfig"].update(enableInTreeAutoscaling=False), "enableInTreeAutoscaling"),
    (lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(maxReplicas=2), "raise maxReplicas"),
    (lambda m: m["spec"].update(serveConfigV2=m["spec"]["serveConfigV2"].replace("max_replicas: 8", "max_replicas: 6")),
     "serveConfigV2 differs"),
    (lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"].pop(),
     "serve-grpc"),
    (lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
     ["volumeMounts"][0].update(readOnly=False), "read-only"),
    (lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
     ["resources"]["limits"].update(cpu="4"), "CPUs"),
])
def test_check_names_what_breaks_scaling(manifest, break_it, complaint):
    break_it(manifest)
    problems = kuberay.check_manifest(manifest)
    assert any(complaint in p for p in problems), problems


def test_dockerfile_builds_the_image_the_manifest_names():
    """Static checks only: no container runtime here. Non-root, the gpu extra with the pinned constraints,
    the checkpoint mounted rather than copied, the health check on the gRPC health service."""
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "FROM nvidia/cuda:" in dockerfile
    assert "pip install -c constraints.txt '.[gpu]'" in dockerfile
    assert "\nUSER 10001\n" in dockerfile
    assert not [line for line in dockerfile.splitlines() if line.startswith("COPY") and "models" in line]
    assert '"encoder-service", "health"' in dockerfile
    manifest = kuberay.MANIFEST.read_text()
    assert "runAsUser: 10001" in manifest
