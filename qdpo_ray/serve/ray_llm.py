"""The one place that imports Ray's private `ray.llm._internal` modules; the Serve app imports them from here.

`ray.serve.llm` publishes the deployments and the OpenAI ingress, but the request models the ingress'
routes are typed with (ChatCompletionRequest, CompletionRequest, ErrorResponse), the exception its
handlers raise (OpenAIHTTPException) and the model-card builder (to_model_metadata) live under
`ray.llm._internal`, which moves between Ray releases without notice. Tested on Ray 2.60.0; pyproject.toml
keeps Ray inside `TESTED_RAY` so that an untested release is not installed with this project. Where the
private module moved anyway (a Ray installed by hand), importing this module raises an ImportError that
names the tested versions, not Ray's own "no module named" deep in a replica.
"""

from __future__ import annotations

import importlib
from types import ModuleType

TESTED_RAY = ">=2.50,<2.61"  # the bound in pyproject.toml; Ray 2.60.0 is the release the tests ran on
OPENAI_API_MODELS = "ray.llm._internal.serve.core.configs.openai_api_models"
NAMES = ("ChatCompletionRequest", "CompletionRequest", "ErrorResponse", "OpenAIHTTPException", "to_model_metadata")


def private_module(path: str, names: tuple[str, ...]) -> ModuleType:
    """`path` imported, with each of `names` present, or an ImportError naming the tested Ray versions."""
    import ray

    try:
        module = importlib.import_module(path)
        missing = [n for n in names if not hasattr(module, n)]
    except ImportError as e:
        module, missing = None, [f"the module itself ({e})"]
    if missing:
        raise ImportError(
            f"qdpo-ray's Serve app uses Ray's private {path} ({', '.join(names)}), tested on Ray 2.60.0; "
            f"this Ray is {ray.__version__} and lacks {', '.join(missing)}: install a Ray in the tested "
            f"range, pip install 'ray[train,serve,data]{TESTED_RAY}'"
        )
    return module


_api = private_module(OPENAI_API_MODELS, NAMES)
ChatCompletionRequest = _api.ChatCompletionRequest
CompletionRequest = _api.CompletionRequest
ErrorResponse = _api.ErrorResponse
OpenAIHTTPException = _api.OpenAIHTTPException
to_model_metadata = _api.to_model_metadata

__all__ = list(NAMES)
