"""The cluster configs under cluster/: Ray's own validation, broken variants, and the shape they promise.

Launcher YAMLs go through what ``ray up`` runs before it touches a cloud:
``ray.autoscaler._private.util.prepare_config`` (merge with the provider's packaged defaults.yaml, fill
per-type worker bounds) then ``validate_config`` (ray-schema.json plus Ray's semantic checks). Both are
offline for aws and gcp; the provider bootstrap (credentials, key pairs, security groups) is never called,
and a guard makes any network connection during validation fail the test.

Ray 2.60 accepts a node type whose own ``min_workers`` exceeds its ``max_workers`` (it only checks the sum
of ``min_workers`` against the global ``max_workers``), so ``lint_launcher_config`` adds that check with
the other promises of these configs: placement resources, head without GPU or work, spot rollout nodes,
MLflow on the private address, dashboard on 127.0.0.1, token auth.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import socket
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay.yaml"
LAUNCHER_CONFIGS = sorted(p for p in CLUSTER.glob("*.yaml") if p != KUBERAY)

LEARNER, ROLLOUT = "learner_node", "rollout_node"


class LintError(ValueError):
    """A launcher config breaks a promise that Ray's validator does not check."""


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during config validation: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def ray_validate(config: dict) -> dict:
    """What ``ray up`` does before the provider bootstrap; returns the prepared config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def all_commands(config: dict) -> list[str]:
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    cmds = [c for k in keys for c in config.get(k, [])]
    for node_type in config["available_node_types"].values():
        cmds += node_type.get("worker_setup_commands", [])
    return cmds


def flag_value(command: str, flag: str) -> str | None:
    m = re.search(rf"{re.escape(flag)}[= ]\"?([^\s\";]+)", command)
    return m.group(1) if m else None


def is_spot(node_config: dict) -> bool:
    market = node_config.get("InstanceMarketOptions", {}).get("MarketType", "")  # AWS
    scheduling = node_config.get("scheduling", {})  # GCP
    return (
        market.lower() == "spot" or bool(scheduling.get("preemptible")) or scheduling.get("provisioningModel") == "SPOT"
    )


def lint_launcher_config(config: dict) -> None:
    """Promises of these configs beyond Ray's schema; raises LintError naming the node type or field."""
    types = config["available_node_types"]
    head_name = config["head_node_type"]
    for name, t in types.items():
        lo, hi = t.get("min_workers", 0), t.get("max_workers", config["max_workers"])
        if lo > hi:
            raise LintError(f"{name}: min_workers {lo} > max_workers {hi}")
    head = types[head_name]["resources"]
    if head.get("GPU", 0) or head.get("CPU", None) != 0 or LEARNER in head or ROLLOUT in head:
        raise LintError(f"{head_name}: the head must have CPU: 0, no GPU and no placement resource")
    workers = {n: t for n, t in types.items() if n != head_name}
    learners = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    rollouts = {n: t for n, t in workers.items() if ROLLOUT in t["resources"]}
    if not learners or not rollouts:
        raise LintError("needs at least one GPU learner node type and one rollout node type")
    for name, t in learners.items():
        if t["resources"].get(LEARNER, 0) < 1 or ROLLOUT in t["resources"]:
            raise LintError(f"{name}: a GPU node type carries {LEARNER} (and not {ROLLOUT})")
        if is_spot(t["node_config"]):
            raise LintError(f"{name}: learners run on demand (they hold optimizer state)")
    for name, t in rollouts.items():
        if t["resources"].get("GPU", 0) or LEARNER in t["resources"]:
            raise LintError(f"{name}: rollout nodes are CPU nodes without {LEARNER}")
        if not is_spot(t["node_config"]):
            raise LintError(f"{name}: rollout nodes are spot/preemptible")
    # `dromo-ray sweep` checks a trial against the resources present when it starts: a fresh cluster must
    # already have a GPU learner node and a rollout node.
    for kind, group in (("GPU learner", learners), ("rollout", rollouts)):
        if not any(t.get("min_workers", 0) >= 1 for t in group.values()):
            raise LintError(f"no {kind} node type has min_workers >= 1")
    if "0.0.0.0" in "\n".join(all_commands(config)):
        raise LintError("a command binds 0.0.0.0")


# ------------------------------------------------------------------------------------------------------
# Ray's own validation


def test_the_launcher_configs_are_there():
    assert {p.name for p in LAUNCHER_CONFIGS} >= {"aws-gpu.yaml", "gcp-gpu.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_ray_validation(path, no_network):
    raw = load(path)
    prepared = ray_validate(raw)
    lint_launcher_config(prepared)
    # prepare_config kept our commands (our lists replace the provider defaults, never merge with them)
    assert prepared["setup_commands"] == raw["setup_commands"]
    assert prepared["head_setup_commands"] == raw["setup_commands"] + raw["head_setup_commands"]
    assert prepared["available_node_types"][raw["head_node_type"]]["max_workers"] == 0


def _rollout_type(config: dict) -> str:
    return next(n for n, t in config["available_node_types"].items() if ROLLOUT in t["resources"])


def _learner_type(config: dict) -> str:
    return next(n for n, t in config["available_node_types"].items() if LEARNER in t["resources"])


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_unknown_top_level_key_is_rejected(path, no_network):
    config = load(path)
    config["max_wrokers"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_wrokers"):
        ray_validate(config)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_wrong_type_is_rejected(path, no_network):
    config = load(path)
    config["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError, match="'many' is not of type 'integer'"):
        ray_validate(config)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_fractional_node_resource_is_rejected(path, no_network):
    # Node types declare whole units; actors ask for fractions (runtime.*_resources = {name: 0.01}).
    config = load(path)
    config["available_node_types"][_learner_type(config)]["resources"][LEARNER] = 0.5
    with pytest.raises(jsonschema.ValidationError, match="0.5 is not of type 'integer'"):
        ray_validate(config)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_head_node_type_must_name_a_node_type(path, no_network):
    config = load(path)
    config["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="`head_node_type` must be one of `available_node_types`"):
        ray_validate(config)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_min_workers_above_global_max_workers_is_rejected(path, no_network):
    config = load(path)
    config["available_node_types"][_rollout_type(config)]["min_workers"] = config["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers` is smaller than the sum of `min_workers"):
        ray_validate(config)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_node_type_min_workers_above_its_max_workers_is_rejected(path, no_network):
    config = load(path)
    name = _learner_type(config)
    config["available_node_types"][name].update(min_workers=3, max_workers=2)
    prepared = ray_validate(config)  # Ray 2.60 lets this through ...
    with pytest.raises(LintError, match=rf"{name}: min_workers 3 > max_workers 2"):
        lint_launcher_config(prepared)  # ... the lint does not


# ------------------------------------------------------------------------------------------------------
# The shape: placement, MLflow, dashboard, mounts, setup


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_lint_catches_each_broken_promise(path):
    base = ray_validate(load(path))
    head, learner, rollout = base["head_node_type"], _learner_type(base), _rollout_type(base)

    def broken(mutate) -> dict:
        config = copy.deepcopy(base)
        mutate(config["available_node_types"], config)
        return config

    cases = {
        "head with a GPU": lambda t, c: t[head]["resources"].update(GPU=1),
        "learner without learner_node": lambda t, c: t[learner]["resources"].pop(LEARNER),
        "rollout with a GPU": lambda t, c: t[rollout]["resources"].update(GPU=1),
        "rollout on demand": lambda t, c: t[rollout]["node_config"].pop(
            "InstanceMarketOptions" if "InstanceMarketOptions" in t[rollout]["node_config"] else "scheduling"
        ),
        "dashboard on 0.0.0.0": lambda t, c: c["head_start_ray_commands"].append(
            "ray start --head --dashboard-host=0.0.0.0"
        ),
        "no rollout node at start": lambda t, c: t[rollout].update(min_workers=0),
        "no learner node at start": lambda t, c: [
            x.update(min_workers=0) for x in t.values() if x["resources"].get("GPU", 0)
        ],
    }
    for what, mutate in cases.items():
        with pytest.raises(LintError):
            lint_launcher_config(broken(mutate))
            pytest.fail(f"lint accepted: {what}")


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_head_has_no_gpu_and_learners_and_rollouts_carry_their_resource(path):
    config = load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["resources"][LEARNER] >= 1 for t in gpu_types)
    rollout_types = [t for t in types.values() if ROLLOUT in t["resources"]]
    assert rollout_types and all(t["resources"].get("GPU", 0) == 0 for t in rollout_types)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_mlflow_server_binds_the_private_address(path):
    config = load(path)
    head_cmds = config["head_setup_commands"] + config["head_start_ray_commands"]
    servers = [c for c in head_cmds if "mlflow server" in c]
    assert len(servers) == 1, "one MLflow server, started on the head"
    host = flag_value(servers[0], "--host")
    assert host == "$HEAD_IP" and "0.0.0.0" not in servers[0]
    assert "HEAD_IP=$(hostname -I" in servers[0], "the head's private (first) address"
    assert "MLFLOW_TRACKING_URI=http://$HEAD_IP:5000" in servers[0]
    # workers learn the same URI from the head's private address
    assert any("MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in c for c in config["worker_start_ray_commands"])


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_dashboard_is_local_only_and_nothing_binds_all_interfaces(path):
    config = load(path)
    head_start = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    assert len(head_start) == 1
    assert flag_value(head_start[0], "--dashboard-host") == "127.0.0.1"
    assert "0.0.0.0" not in "\n".join(all_commands(config))
    # the job drivers start in the synced repository, with the node environment (venv, token mode, MLflow)
    assert "source ~/.dromo_env && cd ~/dromo_ray" in head_start[0]


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_file_mounts_and_setup_install_the_project(path):
    config = load(path)
    mounts = config["file_mounts"]
    assert mounts["~/dromo_ray"] == "."  # the repository, tune_configs/ included
    assert (REPO / "pyproject.toml").is_file()
    assert not any("tune_configs" in p for p in config["rsync_exclude"])
    assert "~/datasets" in mounts
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert config["setup_commands"] == ["bash ~/dromo_ray/cluster/setup_node.sh"]
    assert "whl/cpu" not in "\n".join(all_commands(config)), "CPU torch is the script's choice, per node"


def test_setup_script_keeps_cuda_torch_on_gpu_nodes():
    script = (CLUSTER / "setup_node.sh").read_text()
    gpu_branch, _, cpu_branch = script.partition("else")
    assert "nvidia-smi" in gpu_branch and "whl/cpu" not in gpu_branch and "whl/cpu" in cpu_branch
    assert 'uv venv --seed --python "$PY_VERSION"' in script and 'PY_VERSION="${DROMO_PYTHON:-3.11}"' in script
    assert '-e "$REPO"' in script
    assert "export RAY_AUTH_MODE=token" in script and "D4RL_DATASET_DIR" in script


def test_dromo_submit_runs_dromo_ray_from_the_repository():
    spec = importlib.util.spec_from_file_location("dromo_submit", CLUSTER / "dromo_submit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.command(["sweep", "tune_configs/sweeps/x.yaml"]) == ["dromo-ray", "sweep", "tune_configs/sweeps/x.yaml"]
    assert mod.main([]) == 2


# ------------------------------------------------------------------------------------------------------
# KubeRay


def kuberay_docs() -> list[dict]:
    with open(KUBERAY) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def start_resources(group: dict) -> dict:
    """rayStartParams.resources is a shell-quoted JSON string, as KubeRay passes it to `ray start`."""
    value = group["rayStartParams"].get("resources")
    return json.loads(shlex.split(value)[0]) if value else {}


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_kuberay_documents_and_kinds():
    docs = kuberay_docs()
    assert sorted(d["kind"] for d in docs) == sorted(
        ["PersistentVolumeClaim", "PersistentVolumeClaim", "Deployment", "Service", "RayCluster", "RayJob"]
    )
    for d in docs:
        assert d["metadata"]["name"].startswith("dromo-ray")
        if d["kind"] in ("RayCluster", "RayJob"):
            assert d["apiVersion"] == "ray.io/v1"


def test_kuberay_cluster_groups_and_resources():
    cluster = one(kuberay_docs(), "RayCluster")["spec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["serviceType"] == "ClusterIP"
    assert not any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in containers(head))
    assert LEARNER not in start_resources(head) and ROLLOUT not in start_resources(head)

    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    learners = [g for g in groups.values() if LEARNER in start_resources(g)]
    rollouts = [g for g in groups.values() if ROLLOUT in start_resources(g)]
    assert len(learners) == 1 and len(rollouts) == 1
    (learner,), (rollout,) = learners, rollouts
    assert int(learner["rayStartParams"]["num-gpus"]) >= 1
    assert all(
        c["resources"]["limits"]["nvidia.com/gpu"] == learner["rayStartParams"]["num-gpus"] for c in containers(learner)
    )
    assert rollout["rayStartParams"]["num-gpus"] == "0"
    assert learner["minReplicas"] >= 1 and rollout["minReplicas"] >= 1, "a sweep checks the cluster it starts on"
    assert not any("nvidia.com/gpu" in c["resources"]["limits"] for c in containers(rollout))
    for g in [head, *groups.values()]:
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), "KubeRay wants strings"
        if g is not head:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_kuberay_job_runs_a_dromo_ray_sweep_with_mlflow():
    docs = kuberay_docs()
    cluster, job = one(docs, "RayCluster"), one(docs, "RayJob")["spec"]
    assert re.fullmatch(r"dromo-ray sweep tune_configs/sweeps/[\w.-]+\.yaml", job["entrypoint"])
    assert (REPO / job["entrypoint"].split()[-1]).is_file(), "the RayJob runs a sweep of this repository"
    assert job["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]

    service = one(docs, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    uri = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"] == uri
    spec = cluster["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for c in containers(group):
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env["MLFLOW_TRACKING_URI"] == uri
            assert c["workingDir"] == "/home/ray/dromo_ray"
    mlflow = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert mlflow["command"] == ["mlflow", "server"]
    allowed = next(a for a in mlflow["args"] if a.startswith("--allowed-hosts="))
    assert service["metadata"]["name"] in allowed.split("=", 1)[1].split(",")


def test_kuberay_image_matches_the_dockerfile():
    docs = kuberay_docs()
    images = {
        c["image"] for d in docs if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]
    }
    spec = one(docs, "RayCluster")["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        images |= {c["image"] for c in containers(group)}
    assert len(images) == 1, images
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
    assert "WORKDIR /home/ray/dromo_ray" in dockerfile
