"""Ray Serve entry point: `serve run serve/config.yaml` (or `serve deploy`) imports `build_app` from here.

The application itself lives in `qdpo_ray.serve.app`; this file only names it for Ray's import path.
"""

from qdpo_ray.serve.app import app_builder as build_app

__all__ = ["build_app"]
