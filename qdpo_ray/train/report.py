"""Training metrics → metrics.csv, TensorBoard event files and training.png (the paper's Fig. 4)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from qdpo_ray.io import atomic_write_text


def write_reports(history: list[dict[str, Any]], out: Path, title: str = "QDPO", objective: str | None = None) -> None:
    if not history:
        return
    cols = list(history[0])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(history)
    atomic_write_text(out / "metrics.csv", buf.getvalue())
    _tensorboard(history, out / "tensorboard")
    _plot(history, out / "training.png", title, objective)


def _tensorboard(history, logdir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    import shutil

    shutil.rmtree(logdir, ignore_errors=True)  # one event file per finished run, rewritten as a whole
    with SummaryWriter(str(logdir)) as sw:
        for m in history:
            for k, v in m.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    sw.add_scalar(k if "/" in k else f"train/{k}", v, m["step"])


def _series(history, key: str) -> list[float] | None:
    vals = [m.get(key) for m in history]
    return None if any(v is None for v in vals) else [float(v) for v in vals]


def _panels(history, objective: str | None) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(title, [(metric, label, colour)]) per panel, only for metrics the run has.

    KD has no implicit rewards (the trainer logs them as 0 to keep one column set), so a KD run — named,
    or recognised by all-zero rewards and rejected log-probs — gets its loss and the student's log-prob of
    the fp answers instead of empty reward panels.
    """
    zero = all(not any(_series(history, k) or [0.0]) for k in ("rewards/chosen", "rewards/rejected", "logps/rejected"))
    kd = objective == "kd" or (objective is None and zero)
    if kd:
        panels = [("KD loss: KL(teacher ‖ student) per answer token", [("loss", "loss", "black")]),
                  ("log π_θ(fp answer), summed over its tokens", [("logps/chosen", "log-prob", "tab:blue")])]
    else:
        panels = [("implicit rewards β·log(π_θ/π_ref)", [("rewards/chosen", "chosen reward", "tab:blue"),
                                                       ("rewards/rejected", "rejected reward", "tab:red"),
                                                       ("rewards/margins", "margin", "tab:green")]),
                  ("loss", [("loss", "loss", "black")])]
    panels.append(("gradient norm (before clipping)", [("grad_norm", "grad norm", "tab:purple")]))
    out = []
    for name, lines in panels:
        lines = [ln for ln in lines if _series(history, ln[0]) is not None]
        if lines:
            out.append((name, lines))
    return out


def _plot(history, path: Path, title: str, objective: str | None = None) -> None:
    from qdpo_ray.plots import pyplot, save_figure

    plt = pyplot()

    steps = [m["step"] for m in history]
    panels = _panels(history, objective)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels):
        for key, label, colour in lines:
            ax.plot(steps, _series(history, key), label=label, color=colour, alpha=0.6 if key == "rewards/margins" else 1)
        if key.startswith("rewards/"):
            ax.axhline(0, color="grey", lw=0.5)
        if len(lines) > 1:
            ax.legend()
        ax.set_xlabel("step")
        ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
