"""The Ray Serve application: two `ray.serve.llm` LLM deployments (fp, W4) behind `QdpoIngress`.

    qdpo-ray serve --fp smollm2-135m --w4 runs/train-qdpo/w4-qdpo          # this module's run_serve
    serve run serve/config.yaml                                           # Ray's CLI, via app_builder

Each model is a vLLM engine in its own autoscaling deployment (`serve.fp_replicas`, `serve.w4_replicas`);
the ingress forwards OpenAI requests by model name and runs /compare against both.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from qdpo_ray.config import ConfigError, ModelConfig, ReplicasConfig, RunConfig, ServeConfig, load_config
from qdpo_ray.generate.engine import engine_settings, resolve_dtype, w4_engine_dir

log = logging.getLogger(__name__)

APP_NAME = "qdpo"


def fp_model_config(cfg: RunConfig) -> ModelConfig:
    """The served fp model: `serve.fp_model` when given, else `model`."""
    return cfg.model.model_copy(update={"name": cfg.serve.fp_model}) if cfg.serve.fp_model else cfg.model


def resolve_models(cfg: RunConfig) -> tuple[str, str]:
    """(fp model directory, W4 checkpoint directory); RTN-exports the W4 model when none is given."""
    from qdpo_ray.models import resolve_model_path
    from qdpo_ray.quant.export import check_quantized_dir, ensure_rtn_checkpoint

    s = cfg.serve
    model = fp_model_config(cfg)
    fp_dir = resolve_model_path(model.name)
    if s.w4_dir:
        w4_dir = check_quantized_dir(s.w4_dir, "serve.w4_dir")
    else:
        w4_dir = ensure_rtn_checkpoint(cfg.model_copy(update={"model": model}), Path(cfg.out) / "w4-rtn")
    return fp_dir, w4_dir


def _autoscaling(r: ReplicasConfig) -> dict[str, Any]:
    return {"autoscaling_config": {"min_replicas": r.min_replicas, "max_replicas": r.max_replicas,
                                   "initial_replicas": max(1, r.min_replicas),
                                   "target_ongoing_requests": r.target_ongoing_requests},
            "max_ongoing_requests": r.max_ongoing_requests}


def served_chat_template(cfg: RunConfig) -> str | None:
    """The chat template both engines' chat routes apply: `model.chat_template` resolved against the fp model's
    tokenizer, as every stage resolves it (a ConfigError under `auto` when that tokenizer has none). None: each
    model directory's own (`auto`, `none`)."""
    from qdpo_ray.chat_templates import AUTO, NONE
    from qdpo_ray.models import load_tokenizer

    model = fp_model_config(cfg)
    if model.chat_template == NONE:
        return None
    tok = load_tokenizer(model)
    return None if model.chat_template == AUTO else tok.chat_template


def llm_config(cfg: RunConfig, name: str, model_dir: str, replicas: ReplicasConfig, chat_template: str | None = None):
    from ray.serve.llm import LLMConfig

    engine_kwargs, env, bundles = engine_settings(cfg.serve.engine, cfg.seed)
    if chat_template is not None:  # vLLM's frontend argument (--chat-template), here the template's text
        engine_kwargs["chat_template"] = chat_template
    deployment = _autoscaling(replicas)
    # The replica actor only drives the engine; its CPUs are the bundle's, so it reserves none itself.
    deployment["ray_actor_options"] = {"num_cpus": 0}
    return LLMConfig(
        model_loading_config={"model_id": name, "model_source": model_dir},
        engine_kwargs=engine_kwargs,
        deployment_config=deployment,
        placement_group_config={"bundles": bundles},
        runtime_env={"env_vars": env},
    )


def ingress_deployment_options(s: ServeConfig) -> dict[str, Any]:
    """Serve options of the ingress deployment; no runtime_env, so no secret can ride along in one."""
    options = _autoscaling(s.ingress_replicas)
    options["ray_actor_options"] = {"num_cpus": s.ingress_cpus}
    return options


def ingress_settings(s: ServeConfig) -> dict[str, Any]:
    """The ingress' constructor settings (bound into the app, so visible in the dashboard: no secrets)."""
    return {k: getattr(s, k) for k in ("fp_name", "w4_name", "max_prompt_chars", "max_tokens", "max_request_tokens",
                                       "max_prompts_per_request", "compare_max_tokens")}


def build_app(cfg: RunConfig, fp_dir: str | None = None, w4_dir: str | None = None):
    """The Serve application (not yet running)."""
    from ray import serve
    from ray.serve.llm import build_llm_deployment

    from qdpo_ray.serve.ingress import ingress_class
    from qdpo_ray.serve.ray_llm import to_model_metadata

    s = cfg.serve
    if fp_dir is None or w4_dir is None:
        fp_dir, w4_dir = resolve_models(cfg)
    w4_dir, w4_engine = w4_engine_dir(w4_dir, s.engine, cfg.out)  # dense π_q where vLLM lacks the W4 kernel
    s = s.model_copy(update={"engine": resolve_dtype(s.engine, w4_engine, "serve.engine")})
    cfg = cfg.model_copy(update={"serve": s})
    log.info("W4 replicas run %s (%s, %s)", w4_dir, w4_engine, s.engine.dtype)
    template = served_chat_template(cfg)
    configs = [llm_config(cfg, s.fp_name, fp_dir, s.fp_replicas, template),
               llm_config(cfg, s.w4_name, w4_dir, s.w4_replicas, template)]
    ingress_options = ingress_deployment_options(s)
    settings = ingress_settings(s)
    # Only whether a key is set travels with the app, never the key: options, runtime_envs and bind
    # arguments are shown by the Ray dashboard. Replicas read the key from their own process environment.
    require_key = bool(os.environ.get(s.api_key_env))
    return serve.deployment(ingress_class(s.api_key_env, s.cors_origins, require_key), name="QdpoIngress",
                            **ingress_options).bind(
        llm_deployments={c.model_id: build_llm_deployment(c) for c in configs},
        model_cards={c.model_id: to_model_metadata(c.model_id, c) for c in configs},
        settings=settings,
    )


def logical_cpus(cfg: RunConfig) -> int:
    """Logical CPUs a local Ray needs so that every configured replica can be placed."""
    s = cfg.serve
    if s.ray_num_cpus:
        return s.ray_num_cpus
    per_engine = s.engine.cpus_per_actor
    need = (s.fp_replicas.max_replicas + s.w4_replicas.max_replicas) * per_engine
    need += s.ingress_replicas.max_replicas * s.ingress_cpus
    return max(1, int(need + 0.999))


def start(cfg: RunConfig, blocking: bool = False):
    """Start (or join) Ray, deploy the app on serve.host:serve.port, wait until it answers."""
    from ray import serve

    from qdpo_ray.cluster import ensure_ray

    fp_dir, w4_dir = resolve_models(cfg)
    ensure_ray(logical_cpus(cfg))
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    t0 = time.time()
    handle = serve.run(build_app(cfg, fp_dir, w4_dir), name=APP_NAME, route_prefix="/", blocking=blocking)
    log.info("serve app ready in %.0f s", time.time() - t0)
    return handle


def run_serve(cfg: RunConfig) -> None:
    """`qdpo-ray serve`: deploy and keep serving until Ctrl-C."""
    from ray import serve

    t0 = time.time()
    start(cfg)
    s = cfg.serve
    base = f"http://{s.host}:{s.port}"
    print(f"serving {s.fp_name!r} and {s.w4_name!r} on {base} (ready after {time.time() - t0:.0f} s)")
    print(f"  page     {base}/")
    print(f"  OpenAI   {base}/v1  (models: {s.fp_name}, {s.w4_name})")
    print(f"  compare  curl -s {base}/compare -H 'Content-Type: application/json' "
          "-d '{\"prompt\": \"What is the capital of France?\"}'")
    if os.environ.get(s.api_key_env):
        print(f"  auth     bearer token from ${s.api_key_env}")
    print("Ctrl-C stops the server.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()


def _args_config(args: dict[str, Any] | None) -> RunConfig:
    args = dict(args or {})
    path = args.pop("config", None)
    overrides = list(args.pop("overrides", None) or [])
    flat = [f"{k}={v}" for k, v in _flatten(args)]
    try:
        return load_config(path, flat + overrides)
    except ConfigError as e:
        raise ConfigError(f"serve/config.yaml args: {e}") from None


def app_builder(args: dict[str, Any] | None = None):
    """Application builder for Ray's `serve run` / `serve deploy` (serve/config.yaml `args:`).

    `args` is a partial run config (`model:`, `quant:`, `serve:`, `out:` …), optionally with
    `config: <yaml>` loaded first and `overrides: [serve.w4_dir=…]` applied last.
    """
    return build_app(_args_config(args))


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    import json

    items: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            items += _flatten(v, key + ".")
        else:
            items.append((key, json.dumps(v) if not isinstance(v, str) else v))
    return items
