"""What a finished training run keeps of its Ray Train checkpoints.

A checkpoint holds every rank's DeepSpeed ZeRO state (fp32 master weights and Adam's two moments, about
four times the model) so that a killed run resumes where it stopped. Once a run has finished, nothing
resumes it: its Ray Train name hashes the whole configuration (`trainer.run_name`), so any change starts
a new run, and the same configuration again finds its last step done. Only the final checkpoint's
`policy.safetensors` (the trained weights: export, on-policy rounds) and each `train_state.json` (the
history) are read after that. On the embedded model the DeepSpeed state of the two kept checkpoints is
4.7 GB of a 4.8 GB training directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# The tag the worker saves and loads DeepSpeed checkpoints under. `save_checkpoint(d, tag=DS_TAG)` writes
# the tag folder, the `latest` pointer and two conversion scripts; the rest of a checkpoint is the project's.
DS_TAG = "ds"
RESUME_STATE = (DS_TAG, "latest", "zero_to_fp32.py", "zero_to_torch.py")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def drop_resume_state(run_dir: str | Path) -> int:
    """Remove the DeepSpeed resume state from every checkpoint under `run_dir` (one Ray Train run's
    folder); returns the bytes freed. Call it only once the run has finished."""
    freed = 0
    for ckpt in sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir()):  # not Ray's snapshot json
        for name in RESUME_STATE:
            p = ckpt / name
            if p.exists():
                freed += _size(p)
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    return freed
