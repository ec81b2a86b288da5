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

    cfg = load_config(None, ["serve.w4_replicas.max_replicas=4", "serve.w4_replicas.target_ongoing_requests=2",
                             "serve.engine.dtype=float16"])
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
    assert cfg.serve.fp_name == "fp16" and cfg.serve.engine.dtype == "auto" and cfg.model.name == "smollm2-135m"
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


def test_require_key_fails_closed_when_the_replica_lacks_it(monkeypatch):
    """Built with a key but the replica's environment has none: refuse (503), never serve unauthenticated."""
    from fastapi.testclient import TestClient

    from qdpo_ray.serve.ingress import create_app

    monkeypatch.delenv("QDPO_TEST_KEY", raising=False)
    app = create_app("QDPO_TEST_KEY", [], require_key=True)

    @app.get("/v1/models")
    async def models():
        return {"data": []}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    c = TestClient(app)
    r = c.get("/v1/models")
    assert r.status_code == 503 and "QDPO_TEST_KEY" in r.json()["error"]["message"]
    assert c.get("/healthz").status_code == 200
    monkeypatch.setenv("QDPO_TEST_KEY", "k")
    assert c.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200


# ---- request limits (defaults and caps before a request reaches an engine) -------------------

SETTINGS = {"fp_name": "fp16", "w4_name": "w4", "max_prompt_chars": 200, "max_tokens": 512,
            "max_request_tokens": 2048, "max_prompts_per_request": 16, "compare_max_tokens": 64}


def _limits(**kw):
    from qdpo_ray.serve.ingress import Limits

    return Limits.from_settings({**SETTINGS, **kw})


def _chat(**kw):
    from qdpo_ray.serve.ray_llm import ChatCompletionRequest

    return ChatCompletionRequest.model_validate({"model": "w4", "messages": [{"role": "user", "content": "hi"}], **kw})


def _completion(**kw):
    from qdpo_ray.serve.ray_llm import CompletionRequest

    return CompletionRequest.model_validate({"model": "w4", "prompt": "hi", **kw})


def _api_error(fn, *args):
    from qdpo_ray.serve.ingress import ApiError

    with pytest.raises(ApiError) as e:
        fn(*args)
    assert 400 <= e.value.status < 500
    return e.value


def _max_tokens(body):
    d = vars(body)
    return d.get("max_completion_tokens") or d.get("max_tokens")


def test_chat_without_max_tokens_gets_the_served_default():
    body = _chat()
    _limits().check_chat(body)
    assert _max_tokens(body) == 512  # not None, which vLLM decodes up to max_model_len
    body = _chat(n=8)
    _limits().check_chat(body)
    assert _max_tokens(body) == 2048 // 8  # n × max_tokens stays within serve.max_request_tokens
    body = _chat(max_completion_tokens=7)
    _limits().check_chat(body)
    assert _max_tokens(body) == 7


def _null_max_tokens(body):
    # vLLM's CompletionRequest turns a missing or null max_tokens into 16 while validating; the ingress
    # must still bound a body that arrives without one (a vLLM without that normalisation).
    body.max_tokens = None
    return body


def test_completion_without_max_tokens_is_bounded():
    body = _completion(max_tokens=None)
    _limits().check_completion(body)
    assert 1 <= body.max_tokens <= 512
    body = _null_max_tokens(_completion())
    _limits().check_completion(body)
    assert body.max_tokens == 512
    body = _null_max_tokens(_completion(n=5))
    _limits().check_completion(body)
    assert body.max_tokens == 2048 // 5


@pytest.mark.parametrize("kw,param,needle", [
    ({"max_tokens": 513}, "max_tokens", "serve.max_tokens"),
    ({"max_completion_tokens": 513}, "max_completion_tokens", "serve.max_tokens"),
    ({"max_completion_tokens": 5, "max_tokens": 10_000}, "max_tokens", "serve.max_tokens"),
    ({"max_tokens": 0}, "max_tokens", "between 1"),
    ({"n": 8, "max_tokens": 512}, "max_tokens", "serve.max_request_tokens"),
    ({"n": 9}, "n", "between 1 and 8"),
    ({"n": 0}, "n", "between 1 and 8"),
    ({"temperature": 3}, "temperature", "between 0 and 2"),
])
def test_chat_sampling_limits_name_the_field(kw, param, needle):
    e = _api_error(_limits().check_chat, _chat(**kw))
    assert e.param == param and needle in e.message and e.message.startswith(param)


def test_completion_prompt_count_is_capped():
    _limits().check_completion(_completion(prompt=["a"] * 16))
    e = _api_error(_limits().check_completion, _completion(prompt=["a"] * 17))
    assert e.param == "prompt" and "serve.max_prompts_per_request" in e.message and "17" in e.message
    e = _api_error(_limits().check_completion, _completion(prompt=[1, 2, 3]))
    assert e.param == "prompt"


def test_messages_size_counts_every_part():
    from qdpo_ray.serve.ingress import messages_size

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 500}}
    chars, said = messages_size([{"role": "user", "content": [image]}])
    assert chars > 500 and said  # a non-text part counts as its JSON, not as zero text
    tool_call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "x" * 300}}
    chars, said = messages_size([{"role": "assistant", "content": None, "tool_calls": [tool_call]}])
    assert chars > 300 and said
    chars, _ = messages_size([{"role": "user", "content": [{"type": "text", "text": "abc"}]}])
    assert chars == len("user") + 3
    assert messages_size([{"role": "user", "content": "  "}])[1] is False


def test_chat_size_limit_covers_non_text_parts_and_tools():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 500}}
    e = _api_error(_limits().check_chat, _chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "describe"}, image]}]))
    assert e.param == "messages" and "serve.max_prompt_chars" in e.message
    tool = {"type": "function", "function": {"name": "f", "description": "d" * 500, "parameters": {}}}
    e = _api_error(_limits().check_chat, _chat(tools=[tool]))
    assert e.param == "messages" and "serve.max_prompt_chars" in e.message
    _limits().check_chat(_chat())  # a short text chat stays within the limit
    e = _api_error(_limits().check_chat, _chat(messages=[{"role": "user", "content": " "}]))
    assert e.param == "messages" and "empty" in e.message


def test_compare_max_tokens_default_and_cap():
    lim = _limits(max_tokens=32)
    assert lim.compare_max_tokens(None, 64) == 32  # a default above the cap is clipped, not a 400
    assert lim.compare_max_tokens(8, 64) == 8
    e = _api_error(lim.compare_max_tokens, 33, 64)
    assert e.param == "max_tokens" and "serve.max_tokens" in e.message


def _ingress(monkeypatch):
    """A QdpoIngress without Serve: Ray's routes replaced by fakes that return what would reach the engine."""
    from ray.serve.llm.ingress import OpenAiIngress

    from qdpo_ray.serve.ingress import Limits, QdpoIngress

    async def passthrough(self, body, request):
        return body

    monkeypatch.setattr(OpenAiIngress, "chat", passthrough)
    monkeypatch.setattr(OpenAiIngress, "completions", passthrough)
    ing = object.__new__(QdpoIngress)
    ing.fp_name, ing.w4_name, ing.compare_default_tokens = "fp16", "w4", 64
    ing.limits = Limits.from_settings(SETTINGS)
    seen = []

    async def greedy(model, messages, max_tokens):
        seen.append(max_tokens)
        return _side([1, 2])

    ing._greedy = greedy
    return ing, seen


def test_routes_apply_the_default_before_the_engine(monkeypatch):
    import asyncio

    ing, seen = _ingress(monkeypatch)
    assert _max_tokens(asyncio.run(ing.chat(_chat(), None))) == 512
    assert asyncio.run(ing.completions(_null_max_tokens(_completion()), None)).max_tokens == 512
    asyncio.run(ing.compare(CompareRequest(prompt="hi")))
    assert seen == [64, 64]
    e = _api_error(lambda: asyncio.run(ing.compare(CompareRequest(prompt="hi", max_tokens=513))))
    assert e.param == "max_tokens"


def test_new_limits_are_config_fields():
    from qdpo_ray.config import ConfigError, load_config

    s = load_config(None, []).serve
    assert s.max_prompts_per_request == 16 and s.max_request_tokens >= s.max_tokens
    with pytest.raises(ConfigError, match="serve.max_prompts_per_request"):
        load_config(None, ["serve.max_prompts_per_request=0"])
    from qdpo_ray.serve.app import ingress_settings

    assert {"max_prompts_per_request", "max_request_tokens"} <= set(ingress_settings(s))


# ---- the page -----------------------------------------------------------------------------------------


def _page_script():
    from importlib import resources

    page = resources.files("qdpo_ray.serve").joinpath("page.html").read_text()
    return page[page.index("<script>"):]


def test_page_never_parses_strings_as_html():
    script = _page_script()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, f"page.html uses {sink}; build elements and set textContent"
    assert "textContent" in script
    assert "localStorage" not in script  # the API key must not outlive the browser session on disk


def test_page_escapes_model_names():
    from qdpo_ray.serve.ingress import render_page

    page = render_page("<img src=x onerror=alert(1)>", "w4")
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


# ---- one ROUGE-L --------------------------------------------------------------------------------------


def test_rouge_l_single_implementation():
    import re
    from pathlib import Path

    from qdpo_ray import text_metrics
    from qdpo_ray.serve import compare

    assert compare.rouge_l is text_metrics.rouge_l
    pkg = Path(text_metrics.__file__).parent
    defs = [str(p.relative_to(pkg)) for p in pkg.rglob("*.py") if re.search(r"^def rouge", p.read_text(), re.M)]
    assert defs == ["text_metrics.py"]
    assert "from qdpo_ray.text_metrics import rouge_l" in (pkg / "evaluate" / "compare.py").read_text()
    # Stages import downwards only: serve must not reach into evaluate.
    for p in (pkg / "serve").glob("*.py"):
        assert "qdpo_ray.evaluate" not in p.read_text(), p


def test_rouge_l_values():
    from qdpo_ray.text_metrics import rouge_l

    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("", "") == 1.0 and rouge_l("!!", "!!") == 1.0  # equal answers, even with no words
    assert rouge_l("dog", "cat") == 0.0
    assert rouge_l("the cat sat", "the cat") == pytest.approx(rouge_l("the cat", "the cat sat")) == pytest.approx(0.8)


def test_served_max_tokens_fits_the_engine():
    """serve.max_tokens is the default of requests without one; vLLM would reject it above max_model_len."""
    from qdpo_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="max_model_len"):
        load_config(None, ["serve.engine.max_model_len=256", "serve.max_tokens=512"])
    load_config(None, ["serve.engine.max_model_len=256", "serve.max_tokens=256"])
