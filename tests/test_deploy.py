"""cluster.yaml against the Ray autoscaler's own schema; the KubeRay manifests parse and point at real files."""

import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
IMAGE_ROOT = "/home/ray/qdpo-ray/"  # where deploy/Dockerfile puts the repository


def _cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_matches_the_autoscaler_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(_cluster(), schema)


def test_cluster_yaml_passes_ray_up_validation():
    """What `ray up` does before launching anything: fill the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_cluster()))


def test_cluster_layout():
    import ray

    c = _cluster()
    assert c["provider"]["type"] == "aws"
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    gpu = [t for n, t in types.items() if t["resources"].get("GPU", 0) > 0]
    cpu = [t for n, t in types.items() if n != c["head_node_type"] and not t["resources"].get("GPU")]
    assert gpu and cpu
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu)  # autoscaling from zero
    setup = "\n".join(c["setup_commands"])
    assert "[gpu]" in setup and "[cpu]" not in setup and "ray[llm]" not in setup
    for remote, local in c["file_mounts"].items():
        assert (REPO / local).exists(), f"file_mounts {remote}: {local} is not in the repository"
    assert "./configs" in c["file_mounts"].values()
    for image in (c["docker"]["head_image"], c["docker"]["worker_image"]):
        assert image.split(":")[1].startswith(ray.__version__ + "-"), f"{image}: keep Ray at {ray.__version__}"


def _docs(name):
    return [d for d in yaml.safe_load_all((REPO / "deploy" / name).read_text()) if d]


def _repo_path(p: str) -> Path:
    assert p.startswith(IMAGE_ROOT), p
    return REPO / p[len(IMAGE_ROOT):]


def test_kuberay_rayjob_entrypoint_exists():
    import ray

    (job,) = _docs("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = job["spec"]["entrypoint"].split()
    assert argv[0] == "python" and _repo_path(argv[1]).is_file()
    cfg_path = _repo_path(argv[argv.index("--config") + 1])
    assert cfg_path.is_file()
    from qdpo_ray.config import load_config
    from qdpo_ray.pipeline import plan

    plan(load_config(cfg_path, ["out=/tmp/qdpo-rayjob-plan-check"]))
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= 1


def test_kuberay_rayservice_serve_config_resolves():
    import ray

    (svc,) = _docs("rayservice.yaml")
    assert (svc["apiVersion"], svc["kind"]) == ("ray.io/v1", "RayService")
    assert svc["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    module, attr = app["import_path"].split(":")
    module_file = REPO / (module.replace(".", "/") + ".py")
    if not module_file.is_file():
        pytest.skip(f"{module_file.relative_to(REPO)} (the Serve app) is not in this tree yet")
    assert re.search(rf"\b{attr}\b", module_file.read_text()), f"{module_file} defines no {attr}"
    args = dict(app["args"])
    cfg_path = _repo_path(args.pop("config"))
    assert cfg_path.is_file()

    from qdpo_ray.config import load_config

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}={json.dumps(v) if not isinstance(v, str) else v}"

    cfg = load_config(cfg_path, list(flat(args)))  # every serve field the manifest sets exists and is valid
    assert cfg.serve.engine.gpus_per_actor >= 1
    assert cfg.serve.w4_dir.startswith(cfg.out)  # serves what the RayJob's pipeline wrote


def test_dockerfile_installs_the_gpu_extra():
    text = (REPO / "deploy" / "Dockerfile").read_text()
    install = [line for line in text.splitlines() if "pip install" in line]
    assert any("[gpu]" in line for line in install) and not any("[cpu]" in line for line in install)
    images = {m for name in ("rayjob.yaml", "rayservice.yaml")
              for m in re.findall(r"image: (\S+)", (REPO / "deploy" / name).read_text())}
    assert len(images) == 1, f"one image for all pods, got {images}"
