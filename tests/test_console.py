"""The pipeline console: one line per stage/step on the terminal, everything else in the log file."""

import subprocess
import sys
import textwrap


def test_child_processes_log_to_the_file_and_echo_reaches_the_terminal(tmp_path):
    script = textwrap.dedent(f"""
        import subprocess, sys
        from pathlib import Path
        from qdpo_ray.console import quiet_console
        with quiet_console(Path({str(tmp_path)!r}) / "logs" / "run.log") as echo:
            print("python noise")
            subprocess.run([sys.executable, "-c", "import sys; print('engine start-up noise'); print('warn', file=sys.stderr)"])
            echo("[pipeline] train: step 1/3")
        print("after")
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "[pipeline] train: step 1/3" in p.stdout and "after" in p.stdout
    assert "noise" not in p.stdout + p.stderr and "warn" not in p.stderr
    log = (tmp_path / "logs" / "run.log").read_text()
    assert "python noise" in log and "engine start-up noise" in log and "warn" in log


def test_progress_lines_are_echoed_once_each(tmp_path):
    import time

    from qdpo_ray.console import watch_progress, write_progress

    lines = []
    with watch_progress(tmp_path, lines.append, "[train] ", every_s=0.05):
        for i in range(3):
            write_progress(tmp_path, f"step {i}")
            time.sleep(0.3)
    assert lines == ["[train] step 0", "[train] step 1", "[train] step 2"]
