"""The adapter over Ray's private LLM modules: the types it re-exports are the ones Ray's OpenAI ingress
routes are typed with, pyproject bounds Ray to the tested range, and a moved private path gives an
ImportError that names the tested versions."""

import inspect
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_reexports_are_the_types_rays_ingress_uses():
    from ray.serve.llm.ingress import OpenAiIngress

    from qdpo_ray.serve import ray_llm

    assert inspect.signature(OpenAiIngress.chat).parameters["body"].annotation is ray_llm.ChatCompletionRequest
    assert inspect.signature(OpenAiIngress.completions).parameters["body"].annotation is ray_llm.CompletionRequest
    assert issubclass(ray_llm.OpenAIHTTPException, Exception) and callable(ray_llm.to_model_metadata)


def test_pyproject_bounds_ray_to_the_tested_range_and_the_installed_ray_is_inside():
    import ray
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    from qdpo_ray.serve.ray_llm import TESTED_RAY

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_req = next(Requirement(d) for d in deps if Requirement(d).name == "ray")
    assert ray_req.specifier == SpecifierSet(TESTED_RAY)
    assert ray.__version__ in ray_req.specifier
    assert "2.70.0" not in ray_req.specifier  # an upper bound, not only a floor


def test_a_moved_private_module_names_the_tested_versions():
    from qdpo_ray.serve.ray_llm import OPENAI_API_MODELS, private_module

    with pytest.raises(ImportError, match=r"tested on Ray 2\.60\.0.*ray\[train,serve,data\]>=2\.50,<2\.61"):
        private_module("ray.llm._internal.serve.configs.openai_api_models_moved", ("ChatCompletionRequest",))
    with pytest.raises(ImportError, match="lacks NoSuchModel"):
        private_module(OPENAI_API_MODELS, ("ChatCompletionRequest", "NoSuchModel"))
