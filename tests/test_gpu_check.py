"""The CPU part of scripts/gpu_check.py: the decoder-layer, step-0 and RTN-code checks at a small width."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_part_passes():
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu"], capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert len(lines) == 3 and all(ln.startswith("PASS") for ln in lines), out
    assert "identical, loss = log 2 exactly" in out
    assert re.search(r"SDPA: aten::_scaled_dot_product_\w+", out), out
    # the bf16 cast of fp16 weights moves about 1 % of the 4-bit codes on either grid
    moved = [float(x) for x in re.findall(r"(?:per channel|g128) ([\d.]+)%", out)]
    assert len(moved) == 2 and all(0.1 < m < 5 for m in moved), out
