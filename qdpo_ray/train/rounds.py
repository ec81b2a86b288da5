"""On-policy rounds: after a round, π_θ's own W4 answers become the next round's rejected answers.

    round 1: pairs (y_w = fp, y_l = π_q)          → train from the fp weights, reference π_q
    round r: pairs (y_w = fp, y_l = π_θ^(r-1) W4)  → train from π_θ^(r-1)'s weights, reference π_θ^(r-1)

Round 1 is `run_train` on `train.pairs`, written to `out` as a single run would be. Round r ≥ 2
regenerates pairs for round 1's prompts with round 1's generation settings, both read from
`train.pairs/generation.json` (the quantized engine loads round r-1's export; anchored pairs find their
flips on it too) into `out/round-r/pairs`, and trains into `out/round-r`, starting from round r-1's
master weights with round r-1's fake-quant model as the reference — so its step-0 rewards are 0 again.
Every round is resumable as its stages are. Objectives that never read y_l (`qdpo_flips`, `kd`, without
`answers: both`) skip the regeneration: round r trains on the same fp answers, and round r-1's model as
the reference decides which of their tokens are still flips.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qdpo_ray.config import ConfigError, RunConfig


def _derive(cfg: RunConfig, **updates: dict | str) -> RunConfig:
    data = cfg.model_dump(mode="json")
    for k, v in updates.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) else v
    return RunConfig.model_validate(data)


def generation_settings(cfg: RunConfig) -> dict[str, Any]:
    """The key `generate-pairs` wrote beside `train.pairs`: which prompts, which settings.

    Round r's pairs come from it, not from `cfg`'s prompts and pairs sections: `qdpo-ray train` has no
    prompts of its own (the section defaults to the held-out `builtin:eval`), so regenerating from `cfg`
    would train round 2 on the prompts the evaluation holds out, with other lengths."""
    from qdpo_ray.generate.pairs import GENERATION_KEY

    key_file = Path(cfg.train.pairs) / GENERATION_KEY
    if not key_file.is_file():
        raise ConfigError(f"train.rounds={cfg.train.rounds} regenerates the rejected answers for train.pairs' "
                          f"prompts, but {key_file} does not exist (pairs not made by `qdpo-ray generate-pairs`); "
                          "make the pairs with generate-pairs, or set train.rounds=1")
    key = json.loads(key_file.read_text())
    if key["model"] != cfg.model.name:
        raise ConfigError(f"train.pairs were generated with model {key['model']!r} but model.name is "
                          f"{cfg.model.name!r}; round 2 would mix the two: use pairs of {cfg.model.name!r}")
    return key


def final_weights(summary: dict[str, Any]):
    from safetensors.torch import load_file

    return load_file(str(Path(summary["checkpoint"]) / "policy.safetensors"))


def run_rounds(cfg: RunConfig) -> dict[str, Any]:
    """`train.rounds` rounds; returns the last round's summary with every round's in `rounds`."""
    from qdpo_ray.generate.pairs import regeneration_config, run_pairs
    from qdpo_ray.io import atomic_write_json
    from qdpo_ray.train.steps import objective_of
    from qdpo_ray.train.trainer import run_train

    out = Path(cfg.out)
    regenerate = cfg.train.rounds > 1 and objective_of(cfg.train).rejected
    key = generation_settings(cfg) if regenerate else None  # before round 1: a refusal costs no training
    summary = run_train(cfg)
    rounds = [{"round": 1, "out": str(out), "export": summary.get("export"), "final": summary["final"],
               "codes_moved": summary.get("codes_moved")}]
    for r in range(2, cfg.train.rounds + 1):
        if not summary.get("export"):
            raise RuntimeError("train.rounds > 1 regenerates pairs with the previous round's W4 export; "
                               "set train.export=true")
        rdir = out / f"round-{r}"
        kept = None
        if regenerate:
            pairs = run_pairs(regeneration_config(cfg, key, summary["export"], rdir / "pairs"))
            pairs_dir, kept = str(rdir / "pairs"), pairs["pairs_kept"]
        else:  # token-level objectives read only y_w; the new reference's flips are found in training
            pairs_dir = cfg.train.pairs
        weights = final_weights(summary)
        if cfg.train.init_from:  # the starting checkpoint's grid stays the grid of every round
            from qdpo_ray.quant.fake_quant import GRID_SUFFIXES
            from qdpo_ray.train.trainer import start_weights

            weights.update({k: v for k, v in start_weights(cfg.train.init_from).items() if k.endswith(GRID_SUFFIXES)})
        summary = run_train(_derive(cfg, out=str(rdir), train={"pairs": pairs_dir}), init_weights=weights)
        rounds.append({"round": r, "out": str(rdir), "export": summary.get("export"), "final": summary["final"],
                       "codes_moved": summary.get("codes_moved"), "pairs_kept": kept})
    summary = {**summary, "rounds": rounds}
    atomic_write_json(out / "summary.json", summary)
    return summary
