"""Training metrics → metrics.csv, TensorBoard event files and training.png (the paper's Fig. 4)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from qdpo_ray.io import atomic_path, atomic_write_text


def write_reports(history: list[dict[str, Any]], out: Path, title: str = "QDPO") -> None:
    if not history:
        return
    cols = list(history[0])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(history)
    atomic_write_text(out / "metrics.csv", buf.getvalue())
    _tensorboard(history, out / "tensorboard")
    _plot(history, out / "training.png", title)


def _tensorboard(history, logdir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    import shutil

    shutil.rmtree(logdir, ignore_errors=True)  # one event file per finished run, rewritten as a whole
    with SummaryWriter(str(logdir)) as sw:
        for m in history:
            for k, v in m.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    sw.add_scalar(k if "/" in k else f"train/{k}", v, m["step"])


def _plot(history, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(steps, [m["rewards/chosen"] for m in history], label="chosen reward", color="tab:blue")
    a.plot(steps, [m["rewards/rejected"] for m in history], label="rejected reward", color="tab:red")
    a.plot(steps, [m["rewards/margins"] for m in history], label="margin", color="tab:green", alpha=0.6)
    a.axhline(0, color="grey", lw=0.5)
    a.set_xlabel("step")
    a.set_title("implicit rewards β·log(π_θ/π_ref)")
    a.legend()
    b.plot(steps, [m["loss"] for m in history], color="black")
    b.set_xlabel("step")
    b.set_title("loss")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
