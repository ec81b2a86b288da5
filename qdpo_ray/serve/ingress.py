"""The HTTP front of the app: Ray's OpenAI ingress plus /compare, the comparison page and /healthz.

`OpenAiIngress` (ray.serve.llm) already speaks the OpenAI API to the LLM deployments; this subclass
checks every request against the served limits before it reaches an engine, and adds the project's
routes. Errors are OpenAI-shaped JSON (`{"error": {"message", "type", "param", "code"}}`) naming the
offending field; the FastAPI app carries the bearer-token check and optional CORS.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from importlib import resources
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    OpenAIHTTPException,
)
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

from qdpo_ray.serve.compare import CompareRequest, compare_sides, side_from_chat

# Routes open without a token: liveness probes and the page's static HTML (its own calls carry the token).
PUBLIC_PATHS = frozenset({"/healthz", "/"})


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_


def _error(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": type_, "param": param, "code": status}})


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    messages, params = [], []
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        if e.get("type") == "json_invalid":
            messages.append(f"body: not valid JSON ({e.get('ctx', {}).get('error', e['msg'])}); send a JSON object")
            params.append("body")
            continue
        field = ".".join(loc) or "body"
        given = e.get("input")
        shown = "" if e.get("type") == "missing" else f"; got {given!r}"[:120]
        messages.append(f"{field}: {e['msg']}{shown}")
        params.append(field)
    return _error(400, "; ".join(messages) or "invalid request", params[0] if params else None)


def create_app(api_key_env: str, cors_origins: list[str]) -> FastAPI:
    """The FastAPI app the ingress routes are attached to."""
    app = FastAPI(title="qdpo-ray", description="fp and W4 models side by side (OpenAI API + /compare)")

    @app.middleware("http")
    async def bearer_token(request: Request, call_next):
        # Read per request: the token is a secret from the replica's environment, never in the app config.
        key = os.environ.get(api_key_env)
        if key and request.url.path not in PUBLIC_PATHS and request.method != "OPTIONS":
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return _error(401, f"missing or wrong bearer token; send `Authorization: Bearer ${api_key_env}`",
                              "authorization", "authentication_error", headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ApiError, lambda _, e: _error(e.status, e.message, e.param, e.type))
    app.add_exception_handler(HTTPException, lambda _, e: _error(e.status_code, str(e.detail)))
    app.add_exception_handler(OpenAIHTTPException, lambda _, e: _error(e.status_code, e.message, None, e.type))
    try:  # vLLM's request models raise their own error from validators (e.g. an empty completion prompt)
        from vllm.exceptions import VLLMValidationError

        app.add_exception_handler(VLLMValidationError, lambda _, e: _error(
            400, f"{e.parameter or 'body'}: {e.args[0] if e.args else e}", e.parameter))
    except ImportError:
        pass
    return app


class QdpoIngress(OpenAiIngress):
    """OpenAI routes with request limits, plus /compare, / and /healthz."""

    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, settings: dict[str, Any]):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self.fp_name: str = settings["fp_name"]
        self.w4_name: str = settings["w4_name"]
        self.max_prompt_chars: int = settings["max_prompt_chars"]
        self.max_tokens: int = settings["max_tokens"]
        self.compare_max_tokens: int = settings["compare_max_tokens"]

    # ---- limits ---------------------------------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model not in (self.fp_name, self.w4_name):
            raise ApiError(404, f"model: unknown model {model!r}; served models are "
                           f"{self.fp_name!r} and {self.w4_name!r} (GET /v1/models)", "model", "model_not_found")

    def _check_sampling(self, body) -> None:
        mt = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if mt is not None and not 1 <= mt <= self.max_tokens:
            raise ApiError(400, f"max_tokens: must be between 1 and {self.max_tokens} "
                           f"(serve.max_tokens); got {mt}", "max_tokens")
        t = body.temperature
        if t is not None and not 0.0 <= t <= 2.0:
            raise ApiError(400, f"temperature: must be between 0 and 2; got {t}", "temperature")
        if body.top_p is not None and not 0.0 < body.top_p <= 1.0:
            raise ApiError(400, f"top_p: must be in (0, 1]; got {body.top_p}", "top_p")
        if body.n is not None and not 1 <= body.n <= 8:
            raise ApiError(400, f"n: must be between 1 and 8; got {body.n}", "n")

    def _check_text(self, text: str, field: str) -> None:
        if not text.strip():
            raise ApiError(400, f"{field}: the prompt is empty; send some text", field)
        if len(text) > self.max_prompt_chars:
            raise ApiError(400, f"{field}: the prompt has {len(text)} characters; the limit is "
                           f"{self.max_prompt_chars} (serve.max_prompt_chars)", field)

    def _check_messages(self, messages: list[Any]) -> None:
        if not messages:
            raise ApiError(400, "messages: empty; send at least one message", "messages")
        text = ""
        for m in messages:
            c = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
            if isinstance(c, str):
                text += c
            elif isinstance(c, list):  # OpenAI content parts
                text += "".join(p.get("text", "") for p in c if isinstance(p, dict))
        self._check_text(text, "messages")

    # ---- OpenAI routes ----------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, request: Request):
        self._check_model(body.model)
        self._check_sampling(body)
        self._check_messages(body.messages)
        return await super().chat(body, request)

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_model(body.model)
        self._check_sampling(body)
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "prompt: send a string or a list of strings (token ids are not accepted)", "prompt")
        for p in prompts:
            self._check_text(p, "prompt")
        return await super().completions(body, request)

    # ---- project routes ---------------------------------------------------------------------------

    async def _greedy(self, model: str, messages: list[dict], max_tokens: int) -> dict[str, Any]:
        body = ChatCompletionRequest(model=model, messages=messages, max_tokens=max_tokens, temperature=0.0,
                                     logprobs=True, top_logprobs=2, return_token_ids=True, stream=False)
        t0 = time.perf_counter()
        async for resp in self._get_response(body=body, call_method="chat"):
            first = resp[0] if isinstance(resp, list) else resp
            if isinstance(first, ErrorResponse):
                raise ApiError(first.error.code, f"{model}: {first.error.message}", None, first.error.type)
            return side_from_chat(first, model, time.perf_counter() - t0)
        raise ApiError(502, f"{model}: the engine returned no answer", None, "server_error")

    async def compare(self, body: CompareRequest) -> dict[str, Any]:
        max_tokens = body.max_tokens or self.compare_max_tokens
        if max_tokens > self.max_tokens:
            raise ApiError(400, f"max_tokens: must be between 1 and {self.max_tokens} "
                           f"(serve.max_tokens); got {max_tokens}", "max_tokens")
        messages = body.chat_messages()
        self._check_messages(messages)
        fp, w4 = await asyncio.gather(self._greedy(self.fp_name, messages, max_tokens),
                                      self._greedy(self.w4_name, messages, max_tokens))
        return compare_sides(fp, w4)

    async def page(self) -> HTMLResponse:
        html = resources.files("qdpo_ray.serve").joinpath("page.html").read_text()
        return HTMLResponse(html.replace("__FP__", self.fp_name).replace("__W4__", self.w4_name))

    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "models": [self.fp_name, self.w4_name]}


ENDPOINTS = {
    "models": lambda app: app.get("/v1/models"),
    "model_data": lambda app: app.get("/v1/models/{model:path}"),
    "completions": lambda app: app.post("/v1/completions"),
    "chat": lambda app: app.post("/v1/chat/completions"),
    "compare": lambda app: app.post("/compare"),
    "page": lambda app: app.get("/", response_class=HTMLResponse),
    "healthz": lambda app: app.get("/healthz"),
}


def ingress_class(api_key_env: str, cors_origins: list[str]):
    """`QdpoIngress` bound to a fresh FastAPI app (one app per deployment build)."""
    return make_fastapi_ingress(QdpoIngress, endpoint_map=ENDPOINTS, app=create_app(api_key_env, cors_origins))
