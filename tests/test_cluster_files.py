"""The cluster and job files users run: Ray's own validator on the launcher YAMLs, the KubeRay
manifests' structure, every job config parsed by its stage's config class, and the custom
resources that tie them together (what the configs ask for, some node type declares)."""

from __future__ import annotations

import glob
import json
import os
import re

import pytest
import yaml

from moe2dense_ray import assets
from moe2dense_ray.cli import main

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
LAUNCHERS = sorted(glob.glob(os.path.join(ROOT, "clusters", "*.yaml")))
CLOUDS = [p for p in LAUNCHERS if not p.endswith("local.yaml")]
JOB_CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "jobs", "**", "*.yaml"), recursive=True)
                     if os.path.basename(p) not in ("runtime_env.yaml", "sweep-space.yaml"))


def _load(path: str):
    with open(path) as f:
        return yaml.safe_load(f)


def _stage_config(stage: str):
    from moe2dense_ray.core.config import CalibrateConfig, ConvertConfig
    from moe2dense_ray.distill.config import DistillConfig, TeacherLogitsConfig
    from moe2dense_ray.eval.stage import EvalConfig
    from moe2dense_ray.sweep import SweepConfig

    return {"calibrate": CalibrateConfig, "convert": ConvertConfig, "teacher-logits": TeacherLogitsConfig,
            "distill": DistillConfig, "sweep": SweepConfig, "eval": EvalConfig}[stage]


def _worker_types(config: dict) -> dict[str, dict]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


@pytest.mark.parametrize("path", LAUNCHERS, ids=os.path.basename)
def test_launcher_yamls_pass_rays_validator(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_load(path))
    validate_config(config)  # raises on any schema violation


@pytest.mark.parametrize("path", CLOUDS, ids=os.path.basename)
def test_cloud_clusters_have_teacher_and_student_node_types_and_install_from_the_tree(path):
    config = _load(path)
    head = config["available_node_types"][config["head_node_type"]]
    assert not head["resources"].get("GPU")  # drivers, build and Tune need no GPU
    workers = _worker_types(config)
    assert set(workers) == {"teacher", "student"}
    for name, node in workers.items():
        assert node["resources"].get(name, 0) >= 1 and node["resources"].get("GPU", 0) >= 1, name
        assert node["min_workers"] == 0 < node["max_workers"] <= config["max_workers"]
    # the project comes from the working tree `ray up` runs in: nothing for the user to export
    assert config["file_mounts"] == {"~/moe2dense-ray": "."}
    commands = " ".join(config["setup_commands"] + config.get("head_setup_commands", []))
    assert "./install.sh" in commands
    variables = set(re.findall(r"\$\{?([A-Za-z_]+)", " ".join(
        commands.split() + config["head_start_ray_commands"] + config["worker_start_ray_commands"])))
    assert variables <= {"PATH", "RAY_HEAD_IP"}, variables


def test_every_node_installs_the_cloud_extra_and_reaches_the_bucket_without_keys():
    """s3:// and gs:// need s3fs/gcsfs on every node (the `cloud` extra, `./install.sh --cloud`),
    and every node type a role of its own: an instance profile (AWS) or a service account (GCP)
    of the project the cluster runs in."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert {re.split(r"[<>=\[]", d)[0] for d in extras["cloud"]} == {"s3fs", "gcsfs"}
    for path in CLOUDS:
        config = _load(path)
        assert any(re.search(r"\./install\.sh( --\w+)* --cloud\b", c) for c in config["setup_commands"]), path
        nodes = config["available_node_types"]
        if config["provider"]["type"] == "aws":
            arns = {name: node["node_config"]["IamInstanceProfile"]["Arn"] for name, node in nodes.items()}
            assert all(re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", a) for a in arns.values()), arns
            assert arns["teacher"] == arns["student"] != arns[config["head_node_type"]]  # workers: the bucket only
        else:
            project = config["provider"]["project_id"]
            for name, node in nodes.items():
                (account,) = node["node_config"]["serviceAccounts"]
                assert account["email"].endswith(f"@{project}.iam.gserviceaccount.com"), (name, account)
                assert "https://www.googleapis.com/auth/cloud-platform" in account["scopes"], name
    with open(os.path.join(ROOT, "clusters", "kuberay", "Dockerfile")) as f:
        assert re.search(r"^RUN .*\./install\.sh --cloud\b", f.read(), re.M)


def test_install_sh_turns_its_flags_into_extras(tmp_path):
    """What `./install.sh` asks pip for, with a stand-in interpreter that records it (torch
    "imports", so nothing else is installed): the flags become extras, in any order, and an
    unknown flag stops it before pip runs."""
    import subprocess

    env_dir = tmp_path / "venv"
    (env_dir / "bin").mkdir(parents=True)
    log = tmp_path / "pip.log"
    python = env_dir / "bin" / "python"
    python.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -m ]; then echo "$*" >> {log}; else echo stub; fi\n')
    python.chmod(0o755)
    script = os.path.join(ROOT, "install.sh")
    for flags, extra in (([], "."), (["--cloud"], ".[cloud]"), (["--test", "--cloud"], ".[test,cloud]")):
        log.unlink(missing_ok=True)
        run = subprocess.run([script, *flags], env={**os.environ, "VIRTUAL_ENV": str(env_dir)},
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert log.read_text().split()[-2:] == ["-e", extra], (flags, log.read_text())
    log.unlink()
    run = subprocess.run([script, "--clod"], env={**os.environ, "VIRTUAL_ENV": str(env_dir)},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "unknown option --clod" in run.stderr and not log.exists()


def _kuberay_groups(spec: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def _declared(group: dict) -> dict[str, float]:
    text = group["rayStartParams"].get("resources", "{}")
    return json.loads(json.loads(text) if text.startswith('"') else text)  # KubeRay's quoted JSON


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_have_a_head_and_gpu_worker_groups_declaring_the_resources(name):
    doc = _load(os.path.join(ROOT, "clusters", "kuberay", name))
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    import ray

    assert spec["rayVersion"] == ray.__version__ and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert len(head) == 1 and head[0]["name"] == "ray-head" and "nvidia.com/gpu" not in head[0]["resources"]["limits"]
    assert {p["containerPort"] for p in head[0]["ports"]} >= {6379, 8265}
    groups = _kuberay_groups(spec)
    assert set(groups) == {"teacher", "student"}
    for group_name, g in groups.items():
        assert g["minReplicas"] == 0 < g["maxReplicas"]
        (container,) = g["template"]["spec"]["containers"]
        assert container["name"] == "ray-worker" and container["image"] == head[0]["image"]
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus >= 1 and container["resources"]["requests"]["nvidia.com/gpu"] == str(gpus)
        assert _declared(g).get(group_name, 0) >= 1
    # every pod runs as the service account that carries the bucket's credentials (IRSA, Workload Identity)
    account = _load(os.path.join(ROOT, "clusters", "kuberay", "serviceaccount.yaml"))
    assert account["kind"] == "ServiceAccount" and {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"} \
        <= set(account["metadata"]["annotations"])
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups.values()]
    assert all(t["spec"]["serviceAccountName"] == account["metadata"]["name"] for t in templates)
    if doc["kind"] == "RayJob":
        entry = doc["spec"]["entrypoint"].split()
        assert entry[0] == "moe2dense" and entry[2] == "--config"
        config = entry[3].replace("/home/ray/moe2dense-ray/", "")
        assert os.path.exists(os.path.join(ROOT, config)), config  # the image holds the tree
        _stage_config(entry[1]).from_yaml(os.path.join(ROOT, config))
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
        standing = _load(os.path.join(ROOT, "clusters", "kuberay", "raycluster.yaml"))["spec"]
        assert _kuberay_groups(standing) == groups  # the job's cluster is the standing cluster's shape


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "jobs")))
def test_job_configs_parse_and_ask_only_for_resources_every_cluster_declares(path):
    stage = os.path.basename(path)[:-len(".yaml")]
    cfg = _stage_config(stage).from_yaml(path)  # a typo or a stale field fails here
    asked = set(getattr(cfg, "teacher_resources", {}) or {}) | set(getattr(cfg, "worker_resources", {}) or {})
    for launcher in CLOUDS + [os.path.join(ROOT, "clusters", "local.yaml")]:
        config = _load(launcher)
        declared = set()
        for node in config.get("available_node_types", {}).values():
            declared |= set(node.get("resources", {}))
        for command in config.get("head_start_ray_commands", []):
            m = re.search(r"--resources='([^']*)'", command)
            if m:
                declared |= set(json.loads(m.group(1)))
        assert asked <= declared, (launcher, asked - declared)
    if "qwen3-30b-a3b" in path:
        assert all(u.startswith(("s3://", "hf:")) for u in _urls(cfg)), _urls(cfg)  # several nodes: shared storage


def _urls(cfg) -> list[str]:
    return [v for k, v in cfg.model_dump().items() if k in ("src", "data", "out", "stats", "teacher", "student", "model")
            and isinstance(v, str)]


def test_qwen3_distillation_fits_the_cloud_clusters():
    from moe2dense_ray.distill.config import DistillConfig

    cfg = DistillConfig.from_yaml(os.path.join(ROOT, "jobs", "qwen3-30b-a3b", "distill.yaml"))
    for launcher in CLOUDS:
        workers = _worker_types(_load(launcher))
        teacher, student = workers["teacher"], workers["student"]
        replicas_per_node = min(teacher["resources"]["teacher"], teacher["resources"]["GPU"] // cfg.gpus_per_teacher)
        assert cfg.teacher_workers <= replicas_per_node * teacher["max_workers"], launcher
        assert cfg.workers <= min(student["resources"]["student"], student["resources"]["GPU"]) * student["max_workers"]
        assert cfg.teacher_workers % cfg.workers == 0


def test_qwen3_sweep_fits_the_cloud_clusters():
    """Its space is valid for the model (128 experts) before any node starts; its teacher replicas
    fit the teacher nodes, and --max-concurrent trials (set: an autoscaling cluster starts with no
    student node) fit the student nodes, each worker with its CPUs and its stream readers."""
    from moe2dense_ray.sweep import READER_CPUS, SweepConfig, check_space, load_space

    path = os.path.join(ROOT, "jobs", "qwen3-30b-a3b", "sweep.yaml")
    cfg = SweepConfig.from_yaml(path)
    combos = check_space(cfg, load_space(os.path.join(ROOT, cfg.space)), num_experts=128)
    assert len(combos) == 8 and any(c.get("refit") == "down" for c in combos)
    assert cfg.max_concurrent and cfg.calibration_workers in (None, cfg.teacher_workers)
    for launcher in CLOUDS:
        workers = _worker_types(_load(launcher))
        teacher, student = workers["teacher"], workers["student"]
        replicas_per_node = min(teacher["resources"]["teacher"], teacher["resources"]["GPU"] // cfg.gpus_per_teacher)
        assert cfg.teacher_workers <= replicas_per_node * teacher["max_workers"], launcher
        assert replicas_per_node * cfg.cpus_per_teacher <= teacher["resources"]["CPU"], launcher
        per_node = min(student["resources"]["student"], student["resources"]["GPU"])  # one GPU per training worker
        assert cfg.max_concurrent * cfg.workers <= per_node * student["max_workers"], launcher
        assert per_node * (cfg.cpus_per_worker + READER_CPUS) <= student["resources"]["CPU"], launcher


def test_runtime_env_is_one_ray_accepts():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**_load(os.path.join(ROOT, "jobs", "runtime_env.yaml")))
    assert env["working_dir"] == "." and ".venv" in env["excludes"]
    # a job finds DeepSpeed's CPU op where the node's install.sh built it: naming another cache
    # here made every node's first job compile it again
    assert "TORCH_EXTENSIONS_DIR" not in env.get("env_vars", {})


def test_custom_resources_are_flags_and_an_unmet_one_is_one_line(ray_cluster, capsys, tmp_path):
    from moe2dense_ray.core.config import CalibrateConfig

    cfg = CalibrateConfig.create(src="s", data="d", out="o", teacher_resources={"teacher": 1})
    assert cfg.teacher_resources == {"teacher": 1.0}
    for bad, fragment in (("GPU=1", "not a custom resource"), ("teacher=x", "NAME=AMOUNT"),
                          ("teacher=-1", "positive")):
        code = main(["calibrate", assets.teacher_path(), "--data", assets.calibration_path(), "--out",
                     str(tmp_path / "s"), "--teacher-resources", bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (bad, err)
    code = main(["-q", "calibrate", assets.teacher_path(), "--data", assets.calibration_path(), "--samples", "2",
                 "--seq-len", "32", "--workers", "1", "--teacher-resources", "teacher=1",
                 "--out", str(tmp_path / "stats")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "1 teacher but the cluster has 0" in err[0] \
        and "declare teacher" in err[0], err
    assert not (tmp_path / "stats").exists()


def test_an_unmet_worker_resource_is_one_line_before_any_work(ray_cluster, capsys, tmp_path):
    code = main(["-q", "distill", "--teacher", assets.teacher_path(), "--student", assets.dense_peer_path(),
                 "--data", assets.calibration_path(), "--tokens", "4096", "--seq-len", "64",
                 "--worker-resources", "student=1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "1 student but the cluster has 0" in err[0] \
        and "--worker-resources" in err[0], err
    assert not (tmp_path / "run").exists()
