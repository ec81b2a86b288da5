"""Serve pieces without engines: /compare maths, request models, config, CLI, and the HTTP layer
(auth, CORS, error shapes) on a real FastAPI app through Starlette's in-process client."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from qdpo_ray.serve.compare import CompareRequest  # module level: FastAPI resolves the route's annotation here


def _side(ids, tokens=None, gaps=None, text=None):
    return {"model": "m", "text": text if text is not None else " ".join(map(str, ids)), "token_ids": ids,
            "tokens": tokens or [str(i) for i in ids], "top2_gaps": gaps or [1.0] * len(ids),
            "latency_s": 1.0, "tokens_per_s": len(ids)}


def test_compare_sides_divergence_and_gap():
    from qdpo_ray.serve.compare import compare_sides

    r = compare_sides(_side([1, 2, 3, 4], gaps=[2.0, 1.5, 0.01, 3.0]), _side([1, 2, 9, 4]))
    assert r["first_divergence"] == 2 and not r["identical"]
    assert r["divergence"] == {"index": 2, "fp_token": {"id": 3, "text": "3"}, "w4_token": {"id": 9, "text": "9"},
                               "fp_gap": 0.01}
    assert 0 < r["rouge_l"] < 1


def test_compare_sides_identical_and_prefix():
    from qdpo_ray.serve.compare import compare_sides

    same = compare_sides(_side([5, 6]), _side([5, 6]))
    assert same["identical"] and same["first_divergence"] is None and same["divergence"] is None
    assert same["rouge_l"] == pytest.approx(1.0)
    # One answer stopped early: they part where the shorter one ended.
    pre = compare_sides(_side([5, 6, 7]), _side([5, 6]))
    assert pre["first_divergence"] == 2 and pre["divergence"]["w4_token"] is None
    assert pre["divergence"]["fp_token"]["id"] == 7


def test_side_from_chat_reads_vllm_response():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse

    from qdpo_ray.serve.compare import side_from_chat

    resp = ChatCompletionResponse.model_validate({
        "id": "x", "created": 0, "model": "fp16", "object": "chat.completion",
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        "choices": [{"index": 0, "finish_reason": "length", "token_ids": [11, 12],
                     "message": {"role": "assistant", "content": "Hi there"},
                     "logprobs": {"content": [
                         {"token": "Hi", "logprob": -0.1, "top_logprobs": [
                             {"token": "Hi", "logprob": -0.1}, {"token": "Hello", "logprob": -2.6}]},
                         {"token": " there", "logprob": -0.5, "top_logprobs": [
                             {"token": " there", "logprob": -0.5}]}]}}]})
    side = side_from_chat(resp, "fp16", latency_s=0.5)
    assert side["token_ids"] == [11, 12] and side["tokens"] == ["Hi", " there"]
    assert side["top2_gaps"][0] == pytest.approx(2.5) and side["top2_gaps"][1] is None
    assert side["tokens_per_s"] == pytest.approx(4.0) and side["prompt_tokens"] == 5


@pytest.mark.parametrize("body", [{}, {"prompt": "a", "messages": [{"role": "user", "content": "a"}]},
                                  {"prompt": "a", "max_tokens": 0}, {"prompt": "a", "extra": 1},
                                  {"messages": [{"role": "robot", "content": "a"}]}])
def test_compare_request_rejects(body):
    from qdpo_ray.serve.compare import CompareRequest

    with pytest.raises(ValidationError):
        CompareRequest.model_validate(body)


def test_compare_request_messages():
    from qdpo_ray.serve.compare import CompareRequest

    assert CompareRequest(prompt="hi").chat_messages() == [{"role": "user", "content": "hi"}]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert CompareRequest(messages=msgs).chat_messages() == msgs


def test_serve_config_errors_name_fields():
    from qdpo_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="serve.fp_replicas"):
        load_config(None, ["serve.fp_replicas.min_replicas=3", "serve.fp_replicas.max_replicas=2"])
    with pytest.raises(ConfigError, match="serve"):
        load_config(None, ["serve.fp_name=same", "serve.w4_name=same"])
    with pytest.raises(ConfigError, match="serve.port"):
        load_config(None, ["serve.port=70000"])


def test_cli_serve_flags():
    from qdpo_ray.cli import resolve

    cmd, cfg, _ = resolve(["serve", "--fp", "smollm2-135m", "--w4", "runs/x/w4-qdpo", "--port", "8123",
                           "--serve.fp_replicas.max_replicas=3"])
    assert cmd == "serve" and cfg.serve.fp_model == "smollm2-135m" and cfg.serve.w4_dir == "runs/x/w4-qdpo"
    assert cfg.serve.port == 8123 and cfg.serve.fp_replicas.max_replicas == 3
    assert cfg.pairs.w4_dir is None  # `--w4` means the served checkpoint here, not pairs.w4_dir


def test_logical_cpus_fit_a_two_core_laptop():
    from qdpo_ray.config import load_config
    from qdpo_ray.serve.app import logical_cpus

    assert logical_cpus(load_config(None, [])) == 2
    assert logical_cpus(load_config(None, ["serve.w4_replicas.max_replicas=3"])) == 4
    assert logical_cpus(load_config(None, ["serve.ray_num_cpus=16"])) == 16


def test_llm_config_resources_and_autoscaling():
    from qdpo_ray.config import load_config
    from qdpo_ray.serve.app import llm_config

    cfg = load_config(None, ["serve.w4_replicas.max_replicas=4", "serve.w4_replicas.target_ongoing_requests=2"])
    c = llm_config(cfg, "w4", "/some/dir", cfg.serve.w4_replicas)
    assert c.model_id == "w4" and c.engine_kwargs["dtype"] == "float16"
    assert c.engine_kwargs["trust_remote_code"] is False
    auto = c.deployment_config["autoscaling_config"]
    assert auto["max_replicas"] == 4 and auto["target_ongoing_requests"] == 2
    assert c.placement_group_config["bundles"] == [{"CPU": 1.0}]
    assert c.runtime_env["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"


def test_serve_yaml_builds_a_config():
    """serve/config.yaml's args go through the same loader as the CLI."""
    import yaml

    from qdpo_ray.serve.app import _args_config

    doc = yaml.safe_load(open("serve/config.yaml"))
    app = doc["applications"][0]
    assert app["import_path"] == "serve.app:build_app"
    cfg = _args_config(app["args"])
    assert cfg.serve.fp_name == "fp16" and cfg.serve.engine.dtype == "float16" and cfg.model.name == "smollm2-135m"
    from qdpo_ray.config import ConfigError

    with pytest.raises(ConfigError, match="serve.port"):
        _args_config({"serve": {"port": "eighty"}})


# ---- HTTP layer -------------------------------------------------------------------------------------


def _app(monkeypatch, key=None, cors=()):
    from fastapi.testclient import TestClient

    from qdpo_ray.serve.ingress import ApiError, create_app

    if key:
        monkeypatch.setenv("QDPO_TEST_KEY", key)
    else:
        monkeypatch.delenv("QDPO_TEST_KEY", raising=False)
    app = create_app("QDPO_TEST_KEY", list(cors))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"data": []}

    @app.post("/fail")
    async def fail():
        raise ApiError(400, "max_tokens: too many", "max_tokens")

    @app.post("/compare")
    async def compare(body: CompareRequest):
        return {"ok": True}

    return TestClient(app)


def test_auth_off_by_default(monkeypatch):
    c = _app(monkeypatch)
    assert c.get("/v1/models").status_code == 200


def test_auth_on(monkeypatch):
    c = _app(monkeypatch, key="s3cret")
    r = c.get("/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "authentication_error" and "QDPO_TEST_KEY" in r.json()["error"]["message"]
    assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/healthz").status_code == 200


def test_error_shapes(monkeypatch):
    c = _app(monkeypatch)
    e = c.post("/fail").json()["error"]
    assert e == {"message": "max_tokens: too many", "type": "invalid_request_error", "param": "max_tokens", "code": 400}
    r = c.post("/compare", content=b"{oops", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = c.post("/compare", json={"prompt": "x", "max_tokens": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert "max_tokens" in r.json()["error"]["message"]


def test_cors_only_when_configured(monkeypatch):
    origin = {"Origin": "http://app.example"}
    assert "access-control-allow-origin" not in _app(monkeypatch).get("/healthz", headers=origin).headers
    c = _app(monkeypatch, cors=["http://app.example"])
    assert c.get("/healthz", headers=origin).headers["access-control-allow-origin"] == "http://app.example"
