"""Figures: one headless backend, one resolution, one atomic write, for every PNG the stages write.

matplotlib is imported on first use, not with this module: most commands never draw anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qdpo_ray.io import atomic_path

DPI = 110


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend (Ray workers, CI and SSH sessions have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = DPI) -> Path:
    """Write `fig` to `path` as a PNG (a reader never sees half an image) and close it.

    Closed even when the write fails: pyplot keeps every open figure alive until closed.
    """
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        pyplot().close(fig)
    return Path(path)
