"""The Kubernetes manifests (``k8s/``), offline: the KubeRay validator passes them with
``--strict`` and fails a broken one; the CPU overlay renders with kustomize and passes too;
and what the manifests say agrees with the pool spec they carry (gateway port and probes,
token files, GPUs, images, Redis)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonpatch
import pytest
import ray
import yaml

from raymoe import PoolSpec

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
VALIDATOR = Path(
    os.environ.get("RAYMOE_K8S_VALIDATOR", ROOT.parent / "shared/k8s-validate/validate_k8s.py")
)
needs_validator = pytest.mark.skipif(
    not VALIDATOR.is_file(), reason=f"no KubeRay validator at {VALIDATOR} (RAYMOE_K8S_VALIDATOR)"
)
RAY_CONTAINERS = ("ray-head", "ray-worker")


def validate(*paths: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(VALIDATOR), "--strict", *map(str, paths)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def kustomize(path: Path) -> str:
    """``path`` rendered by kustomize (its own binary, or kubectl's); skip without one."""
    if shutil.which("kustomize"):
        argv = ["kustomize", "build", str(path)]
    elif shutil.which("kubectl"):
        argv = ["kubectl", "kustomize", str(path)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def base() -> list[dict]:
    k = yaml.safe_load((K8S / "base/kustomization.yaml").read_text())
    return [d for r in k["resources"] for d in load(K8S / "base" / r)]


def cpu_overlay() -> list[dict]:
    """The base with the overlay's JSON patches applied (what kustomize renders, less its
    labels)."""
    k = yaml.safe_load((K8S / "overlays/cpu/kustomization.yaml").read_text())
    docs = copy.deepcopy(base())
    for p in k["patches"]:
        t = p["target"]
        patch = jsonpatch.JsonPatch(yaml.safe_load(p["patch"]))
        hits = [i for i, d in enumerate(docs) if _is(d, t)]
        assert len(hits) == 1, f"patch target {t} matches {len(hits)} documents"
        docs[hits[0]] = patch.apply(docs[hits[0]])
    return docs


def _is(doc: dict, target: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    return (
        doc["kind"] == target["kind"]
        and doc["metadata"]["name"] == target["name"]
        and group == target.get("group", "")
        and version == target["version"]
    )


def one(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod_specs(cluster: dict) -> list[dict]:
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


# --- the validator ---------------------------------------------------------------------------


@needs_validator
def test_every_manifest_passes_strict_validation():
    done = validate(K8S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " 0 error(s), 0 warning(s)" in done.stdout


@needs_validator
def test_the_cpu_overlay_renders_and_passes(tmp_path):
    rendered = tmp_path / "cpu.yaml"
    rendered.write_text(kustomize(K8S / "overlays/cpu"))
    done = validate(rendered)
    assert done.returncode == 0, done.stdout + done.stderr
    kinds = sorted(d["kind"] for d in load(rendered))
    assert kinds == ["ConfigMap", "RayCluster", "Service", "Service", "StatefulSet"]
    assert "nvidia.com/gpu" not in rendered.read_text()


@needs_validator
def test_a_broken_manifest_fails_with_each_mistake_named(tmp_path):
    cluster = copy.deepcopy(one(base(), "RayCluster", "raymoe"))
    cpu, gpu = cluster["spec"]["workerGroupSpecs"]
    cpu["rayStartParams"]["num-cpus"] = 4  # must be a string
    cpu["maxReplica"] = cpu.pop("maxReplicas")  # misspelled
    gpu["minReplicas"], gpu["maxReplicas"] = 4, 2
    worker = gpu["template"]["spec"]["containers"][0]
    worker["resources"]["requests"]["nvidia.com/gpu"] = "2"  # request != limit
    worker["readinessProbe"] = {"periodSeconds": 5}  # no handler
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(cluster))
    done = validate(broken)
    assert done.returncode == 1
    for expected in (
        "rayStartParams.num-cpus: expected string",
        "did you mean 'maxReplicas'",
        "minReplicas",
        "nvidia.com/gpu",
        "readinessProbe",
    ):
        assert expected in done.stdout, f"{expected!r} not reported:\n{done.stdout}"


# --- what the manifests and the pool spec say agrees ------------------------------------------


@pytest.mark.parametrize("variant", [base, cpu_overlay], ids=["base", "cpu"])
def test_manifests_agree_with_the_pool_spec(variant):
    docs = variant()
    spec = PoolSpec.from_yaml(one(docs, "ConfigMap", "raymoe-pool")["data"]["pool.yaml"])
    cluster = one(docs, "RayCluster", "raymoe")
    g = spec.gateway
    assert g.enabled and g.per_node and g.host == "0.0.0.0"
    service = one(docs, "Service", "raymoe-gateway")
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert service["spec"]["ports"][0]["targetPort"] == "gateway"
    token_dirs = {str(Path(f).parent) for f in (g.data_token_file, g.admin_token_file)}
    for pod in pod_specs(cluster):
        ray_c = pod["containers"][0]
        assert ray_c["name"] in RAY_CONTAINERS
        ports = {p["name"]: p["containerPort"] for p in ray_c["ports"]}
        assert ports["gateway"] == g.port and ports["metrics"] == 8080
        assert ray_c["readinessProbe"]["grpc"]["port"] == g.port  # a gateway serves here
        assert "livenessProbe" not in ray_c  # KubeRay's own (Ray's health) stays
        mounts = {m["mountPath"] for m in ray_c["volumeMounts"]}
        assert token_dirs <= mounts, f"{ray_c['name']} cannot read the token files"
        assert pod["securityContext"]["fsGroup"] == 100
    driver = one_container(cluster, "raymoe")
    config = driver["command"][driver["command"].index("-c") + 1]
    mounted = {m["mountPath"] for m in driver["volumeMounts"]}
    assert str(Path(config).parent) in mounted and Path(config).name == "pool.yaml"
    assert {"--attach", "--keep"} <= set(driver["command"])
    env = {e["name"]: e.get("value") for e in driver["env"]}
    head_ports = {p["name"]: p["containerPort"] for p in head_container(cluster)["ports"]}
    assert env["RAY_ADDRESS"] == f"ray://127.0.0.1:{head_ports['client']}"  # Ray Client
    for probe in ("startupProbe", "livenessProbe"):
        assert driver[probe]["grpc"]["port"] == g.port
    gpus = [
        c["resources"]["limits"].get("nvidia.com/gpu")
        for pod in pod_specs(cluster)
        for c in pod["containers"]
    ]
    if spec.shards.num_gpus > 0:
        assert spec.shards.device != "cpu" and any(gpus)
    else:
        assert spec.shards.device == "cpu" and not any(gpus)
    biggest = max(
        float(p["containers"][0]["resources"]["limits"]["cpu"]) for p in pod_specs(cluster)
    )
    assert biggest >= spec.shards.num_cpus  # a shard fits on a node


def head_container(cluster: dict) -> dict:
    return cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def one_container(cluster: dict, name: str) -> dict:
    (c,) = [c for pod in pod_specs(cluster) for c in pod["containers"] if c["name"] == name]
    return c


def test_images_ray_version_and_dockerfile_agree():
    cluster = one(base(), "RayCluster", "raymoe")
    version = cluster["spec"]["rayVersion"]
    images = {c["image"] for pod in pod_specs(cluster) for c in pod["containers"]}
    assert images == {f"raymoe/raymoe:{version}-py311-cpu", f"raymoe/raymoe:{version}-py311-gpu"}
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(version)}$", dockerfile, re.M)
    assert ray.__version__ == version  # the Ray the tests run is the one deployed


def test_gcs_fault_tolerance_has_a_durable_redis():
    docs = base()
    ft = one(docs, "RayCluster", "raymoe")["spec"]["gcsFaultToleranceOptions"]
    host, port = ft["redisAddress"].split(":")
    service = one(docs, "Service", host)
    assert service["spec"]["ports"][0]["port"] == int(port)
    redis = one(docs, "StatefulSet", host)
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags["--appendonly"] == "yes" and flags["--maxmemory-policy"] == "noeviction"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    password = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    env = redis["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": password}} in env


def test_the_pool_keeps_its_metadata_in_that_redis():
    from raymoe.store import open_store
    from raymoe.store.redis import RedisStore

    docs = base()
    cluster = one(docs, "RayCluster", "raymoe")
    ft = cluster["spec"]["gcsFaultToleranceOptions"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    serve = next(c for c in head["containers"] if c["name"] == "raymoe")
    env = {e["name"]: e for e in serve["env"]}
    url = env["RAYMOE_REDIS_URL"]["value"]
    assert url.startswith(f"redis://{ft['redisAddress']}/") and not url.endswith("/0")
    secret = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert env["RAYMOE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret
    assert isinstance(open_store({"RAYMOE_REDIS_URL": url}), RedisStore)  # no connection yet
