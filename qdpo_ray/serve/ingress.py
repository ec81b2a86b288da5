"""The HTTP front of the app: Ray's OpenAI ingress plus /compare, the comparison page and /healthz.

`OpenAiIngress` (ray.serve.llm) already speaks the OpenAI API to the LLM deployments; this subclass
checks every request against the served limits before it reaches an engine, and adds the project's
routes. Errors are OpenAI-shaped JSON (`{"error": {"message", "type", "param", "code"}}`) naming the
offending field; the FastAPI app carries the bearer-token check and optional CORS.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
import os
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

from qdpo_ray.serve.compare import CompareRequest, compare_sides, side_from_chat
from qdpo_ray.serve.ray_llm import ChatCompletionRequest, CompletionRequest, ErrorResponse, OpenAIHTTPException

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


def create_app(api_key_env: str, cors_origins: list[str], require_key: bool = False) -> FastAPI:
    """The FastAPI app the ingress routes are attached to.

    `require_key`: the key was set where the app was built, so a replica without it is misconfigured and
    must refuse requests rather than serve them unauthenticated.
    """
    app = FastAPI(title="qdpo-ray", description="fp and W4 models side by side (OpenAI API + /compare)")

    @app.middleware("http")
    async def bearer_token(request: Request, call_next):
        if request.url.path in PUBLIC_PATHS or request.method == "OPTIONS":
            return await call_next(request)
        # Read per request from the replica's own environment: the key is never in the app config or a
        # runtime_env, which the Ray dashboard shows to anyone who can open it.
        key = os.environ.get(api_key_env)
        if not key:
            if require_key:
                return _error(503, f"the server needs a bearer token but ${api_key_env} is not set in this "
                              "replica's environment; set it on every Ray node (docs/serving.md)",
                              None, "server_error")
            return await call_next(request)
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


def _chars(value: Any) -> int:
    """Characters one request field adds to the prompt: a string's length, anything else its JSON's."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    return len(json.dumps(value, ensure_ascii=False,
                          default=lambda o: o.model_dump() if hasattr(o, "model_dump") else str(o)))


def _field(body: Any, name: str) -> Any:
    # Through __dict__: reading a deprecated pydantic field (vLLM's chat `max_tokens`) warns on every request.
    return vars(body).get(name)


def _as_dict(message: Any) -> dict[str, Any]:
    if isinstance(message, dict):
        return message
    if hasattr(message, "model_dump"):
        return message.model_dump(exclude_none=True)
    return {"content": str(message)}


def messages_size(messages: list[Any]) -> tuple[int, bool]:
    """(characters, whether any message says something) of a chat, every field of every message counted.

    Text parts count their text; other parts (image_url, input_audio, …), tool calls, names and roles
    count as their JSON, so no field of a message escapes `serve.max_prompt_chars`.
    """
    chars, said = 0, False
    for m in messages:
        for key, value in _as_dict(m).items():
            if key == "content" and isinstance(value, list):
                for part in value:
                    text = part.get("text") if isinstance(part, dict) and part.get("type", "text") == "text" else None
                    if isinstance(text, str):
                        chars += len(text)
                        said = said or bool(text.strip())
                    else:
                        chars += _chars(part)
                        said = True
                continue
            chars += _chars(value)
            if key not in ("role", "name"):
                said = said or (bool(value.strip()) if isinstance(value, str) else bool(value))
    return chars, said


# Request-level chat fields that the chat template renders into the prompt next to the messages.
PROMPT_FIELDS = ("tools", "documents", "chat_template", "chat_template_kwargs")


@dataclass(frozen=True)
class Limits:
    """The served request limits (`serve.*`); each check names the field and the setting in its 400."""

    max_prompt_chars: int
    max_tokens: int
    max_request_tokens: int
    max_prompts_per_request: int
    max_n: int = 8

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "Limits":
        return cls(**{k: settings[k] for k in ("max_prompt_chars", "max_tokens", "max_request_tokens",
                                               "max_prompts_per_request")})

    def check_n(self, n: int | None) -> int:
        n = 1 if n is None else n
        top = min(self.max_n, self.max_request_tokens)  # every choice needs at least one token of the budget
        if not 1 <= n <= top:
            raise ApiError(400, f"n: must be between 1 and {top}; got {n}", "n")
        return n

    def resolve_max_tokens(self, given: int | None, n: int = 1, field: str = "max_tokens") -> int:
        """The request's max_tokens: `given` if within the limits, else 400; the default if it gave none.

        Without a default vLLM decodes up to max_model_len, n times over.
        """
        if given is None:
            return max(1, min(self.max_tokens, self.max_request_tokens // n))
        if not 1 <= given <= self.max_tokens:
            raise ApiError(400, f"{field}: must be between 1 and {self.max_tokens} (serve.max_tokens); got {given}",
                           field)
        if given * n > self.max_request_tokens:
            raise ApiError(400, f"{field}: n × {field} = {n} × {given} = {n * given} is above "
                           f"{self.max_request_tokens} (serve.max_request_tokens); lower n or {field}", field)
        return given

    def check_sampling(self, body: Any) -> None:
        """Check the sampling fields and write the effective max_tokens into `body` (chat or completion)."""
        n = self.check_n(_field(body, "n"))
        # Chat has both names and vLLM decodes max_completion_tokens when it is given, else max_tokens:
        # check every given one, then write the effective value where vLLM reads it first.
        target = "max_completion_tokens" if "max_completion_tokens" in type(body).model_fields else "max_tokens"
        given = {f: _field(body, f) for f in ("max_completion_tokens", "max_tokens")}
        checked = {f: self.resolve_max_tokens(v, n, f) for f, v in given.items() if v is not None}
        setattr(body, target, next(iter(checked.values()), None) or self.resolve_max_tokens(None, n))
        t = body.temperature
        if t is not None and not 0.0 <= t <= 2.0:
            raise ApiError(400, f"temperature: must be between 0 and 2; got {t}", "temperature")
        if body.top_p is not None and not 0.0 < body.top_p <= 1.0:
            raise ApiError(400, f"top_p: must be in (0, 1]; got {body.top_p}", "top_p")

    def check_text(self, text: str, field: str) -> None:
        if not text.strip():
            raise ApiError(400, f"{field}: the prompt is empty; send some text", field)
        self.check_size(len(text), field)

    def check_size(self, chars: int, field: str, what: str = "the prompt") -> None:
        if chars > self.max_prompt_chars:
            raise ApiError(400, f"{field}: {what} has {chars} characters; the limit is "
                           f"{self.max_prompt_chars} (serve.max_prompt_chars); shorten it", field)

    def check_messages(self, messages: list[Any], extra_chars: int = 0) -> None:
        if not messages:
            raise ApiError(400, "messages: empty; send at least one message", "messages")
        chars, said = messages_size(messages)
        if not said:
            raise ApiError(400, "messages: every message is empty; send some text", "messages")
        self.check_size(chars + extra_chars, "messages",
                        "the chat (text, roles, tool calls and definitions, non-text parts as JSON)")

    def check_chat(self, body: Any) -> None:
        self.check_sampling(body)
        extra = sum(_chars(getattr(body, f, None)) for f in PROMPT_FIELDS)
        self.check_messages(body.messages, extra)

    def check_completion(self, body: Any) -> None:
        self.check_sampling(body)
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "prompt: send a string or a list of strings (token ids are not accepted)", "prompt")
        if len(prompts) > self.max_prompts_per_request:
            raise ApiError(400, f"prompt: {len(prompts)} prompts in one request; the limit is "
                           f"{self.max_prompts_per_request} (serve.max_prompts_per_request); split the request",
                           "prompt")
        for p in prompts:
            self.check_text(p, "prompt")

    def compare_max_tokens(self, given: int | None, default: int) -> int:
        # The configured default may exceed serve.max_tokens; a request that gave none must not get a 400.
        return self.resolve_max_tokens(given) if given is not None else min(default, self.max_tokens)


def render_page(fp_name: str, w4_name: str) -> str:
    """The comparison page with the model names filled in, HTML-escaped (they come from the config)."""
    page = resources.files("qdpo_ray.serve").joinpath("page.html").read_text()
    return page.replace("__FP__", html.escape(fp_name)).replace("__W4__", html.escape(w4_name))


class QdpoIngress(OpenAiIngress):
    """OpenAI routes with request limits, plus /compare, / and /healthz."""

    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, settings: dict[str, Any]):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self.fp_name: str = settings["fp_name"]
        self.w4_name: str = settings["w4_name"]
        self.compare_default_tokens: int = settings["compare_max_tokens"]
        self.limits = Limits.from_settings(settings)

    def _check_model(self, model: str | None) -> None:
        if model not in (self.fp_name, self.w4_name):
            raise ApiError(404, f"model: unknown model {model!r}; served models are "
                           f"{self.fp_name!r} and {self.w4_name!r} (GET /v1/models)", "model", "model_not_found")

    # ---- OpenAI routes ----------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, request: Request):
        self._check_model(body.model)
        self.limits.check_chat(body)
        return await super().chat(body, request)

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_model(body.model)
        self.limits.check_completion(body)
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
        max_tokens = self.limits.compare_max_tokens(body.max_tokens, self.compare_default_tokens)
        messages = body.chat_messages()
        self.limits.check_messages(messages)
        fp, w4 = await asyncio.gather(self._greedy(self.fp_name, messages, max_tokens),
                                      self._greedy(self.w4_name, messages, max_tokens))
        return compare_sides(fp, w4)

    async def page(self) -> HTMLResponse:
        return HTMLResponse(render_page(self.fp_name, self.w4_name))

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


def ingress_class(api_key_env: str, cors_origins: list[str], require_key: bool = False):
    """`QdpoIngress` bound to a fresh FastAPI app (one app per deployment build)."""
    return make_fastapi_ingress(QdpoIngress, endpoint_map=ENDPOINTS,
                                app=create_app(api_key_env, cors_origins, require_key))
