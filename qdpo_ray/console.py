"""A console that reads like a tool: one line per stage and step on the terminal, full logs in a file.

Ray, vLLM, DeepSpeed and transformers each print start-up logs, raw training reports and progress bars
from many processes. `quiet_console` points file descriptors 1 and 2 — inherited by every process the
run starts — at `<run dir>/logs/pipeline.log` and hands back an `echo` that still reaches the terminal.
Stages that have progress to show write a one-line `progress.json` (`write_progress`); `watch_progress`
echoes each new line while the stage runs.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


@contextmanager
def quiet_console(log_path: Path, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    if not enabled:
        yield lambda line: print(line, flush=True)
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)

    def echo(line: str) -> None:
        os.write(saved_out, (line + "\n").encode())

    echo(f"full logs: {log_path}")
    try:
        yield echo
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)


def write_progress(out: Path, line: str) -> None:
    """One line of progress for the console (atomic, cheap: called once per optimizer step)."""
    from qdpo_ray.io import atomic_write_text

    try:
        atomic_write_text(Path(out) / "progress.json", json.dumps({"line": line}))
    except OSError:  # a worker on a node without the driver's run directory: progress is cosmetic
        pass


@contextmanager
def watch_progress(out: Path, echo: Callable[[str], None], prefix: str, every_s: float = 2.0) -> Iterator[None]:
    """Echo `out/progress.json`'s line (and those of on-policy rounds' subdirectories) whenever it changes."""
    stop = threading.Event()

    def loop() -> None:
        last: dict[Path, str] = {}
        while True:
            stopped = stop.wait(every_s)  # one more pass after the stop: the last step's line too
            for f in sorted(Path(out).glob("**/progress.json")) if Path(out).exists() else []:
                try:
                    line = json.loads(f.read_text())["line"]
                except (OSError, ValueError, KeyError):
                    continue
                if last.get(f) != line:
                    last[f] = line
                    where = f.parent.relative_to(Path(out)).as_posix()  # a round's subdirectory: say which
                    echo(f"{prefix}{'' if where == '.' else where + ': '}{line}")
            if stopped:
                return

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join(timeout=every_s + 1)
