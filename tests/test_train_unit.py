"""Batch layout, schedules, data order and the forward/loss maths of the trainer, without Ray."""

import math
from pathlib import Path

import pytest
import torch

from qdpo_ray.config import TrainConfig
from qdpo_ray.train.batch import collate, truncate
from qdpo_ray.train.worker import batches as _batches, lr_lambda


def test_collate_masks_only_response_tokens():
    rows = [{"prompt_token_ids": [5, 6], "chosen_token_ids": [7, 8, 9], "rejected_token_ids": [4],
             "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}]
    b = collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # labels are inputs shifted by one; the mask selects positions whose label is a response token
    assert b["labels"].tolist() == [[6, 7, 8, 9], [6, 4, 0, 0]]
    assert b["mask"].tolist() == [[0, 1, 1, 1], [0, 1, 0, 0]]
    assert b["response_len"].tolist() == [3, 1]
    assert b["ref_chosen"].tolist() == [-1.0] and b["ref_rejected"].tolist() == [-2.0]


def test_truncate_keeps_prompt_end_and_response_start():
    r = truncate({"prompt_token_ids": [1, 2, 3, 4], "chosen_token_ids": [5, 6, 7], "rejected_token_ids": [8]}, 2, 2)
    assert r["prompt_token_ids"] == [3, 4] and r["chosen_token_ids"] == [5, 6] and r["rejected_token_ids"] == [8]


@pytest.mark.parametrize("schedule,expect_end", [("constant", 1.0), ("linear", 0.0), ("cosine", 0.0)])
def test_lr_schedules(schedule, expect_end):
    f = lr_lambda(TrainConfig(warmup_steps=4, schedule=schedule), total_steps=20)
    assert f(0) == pytest.approx(0.2) and f(3) == pytest.approx(0.8) and f(4) == pytest.approx(1.0)
    assert f(20) == pytest.approx(expect_end, abs=1e-9)


def test_batches_are_seeded_per_epoch():
    rows = [{"id": i} for i in range(10)]
    a, b = _batches(rows, 3, seed=1, epoch=0), _batches(rows, 3, seed=1, epoch=0)
    assert a == b and len(a) == 3  # the incomplete last batch is dropped (ranks stay in lockstep)
    assert _batches(rows, 3, seed=1, epoch=1) != a
    assert sorted(r["id"] for bt in _batches(rows, 5, 0, 0) for r in bt) == list(range(10))


# --------------------------------------------------------------------------------------------------
# Prompt-shared rows, response-only log-probs, selective checkpointing


def _rows(n: int, seed: int = 1, vocab: int = 500) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def r(lo, hi):
        return torch.randint(3, vocab, (int(torch.randint(lo, hi, (), generator=g)),), generator=g).tolist()

    return [{"prompt_token_ids": r(1, 9), "chosen_token_ids": r(1, 7), "rejected_token_ids": r(1, 7)} for _ in range(n)]


def test_collate_shared_layout():
    from qdpo_ray.train.batch import collate_shared

    rows = [{"prompt_token_ids": [5, 6], "chosen_token_ids": [7, 8, 9], "rejected_token_ids": [4],
             "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0},
            {"prompt_token_ids": [1], "chosen_token_ids": [2], "rejected_token_ids": [3, 4],
             "ref_chosen_logps": -3.0, "ref_rejected_logps": -4.0}]
    b = collate_shared(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4], [1, 2, 3, 4, 0, 0]]
    # the rejected answer restarts right after the prompt
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2], [0, 1, 1, 2, 0, 0]]
    a = b["attention_mask"][:, 0]
    assert a.shape == (2, 6, 6) and a.dtype == torch.bool
    assert a[0, 5].tolist() == [True, True, False, False, False, True]  # rejected: prompt + itself, no chosen
    assert a[0, 4].tolist() == [True] * 5 + [False]  # chosen: causal over prompt + chosen
    assert a[1, 3].tolist() == [True, False, True, True, False, False]
    assert a[1, 4].tolist() == [False, False, False, False, True, False]  # padding: itself only
    # predicted tokens: hidden state at (row, col) → token; the last prompt token predicts both first tokens
    assert b["score_index"].tolist() == [1, 2, 3, 1, 6, 6, 8]
    assert b["score_labels"].tolist() == [7, 8, 9, 4, 2, 3, 4]
    assert b["score_seq"].tolist() == [0, 0, 0, 2, 1, 3, 3]  # collate order: chosen 0, 1, rejected 0, 1
    assert b["response_len"].tolist() == [3, 1, 1, 2]
    assert int(b["tokens"]) == int(collate(rows)["attention_mask"].sum()) == 13
    assert b["ref_chosen"].tolist() == [-1.0, -3.0] and b["ref_rejected"].tolist() == [-2.0, -4.0]


@pytest.mark.parametrize("head,selective", [("plain", True), ("plain", False), ("module", True), ("fallback", False)])
def test_response_logps_equal_full_logits_with_gradients(tiny_llama, head, selective):
    """The trainer's forward (shared prompt, response-only chunked head, selective checkpointing) gives the
    log-probs and parameter gradients of the plain two-sequence full-logits computation."""
    import copy

    from qdpo_ray.config import QuantConfig
    from qdpo_ray.quant.fake_quant import FakeQuantLinear, to_fake_quant
    from qdpo_ray.train.batch import collate_shared
    from qdpo_ray.train.checkpointing import enable_selective_checkpointing
    from qdpo_ray.train.logps import add_response_logps, response_logps
    from qdpo_ray.train.losses import sequence_logps

    quant = QuantConfig(bits=4, ignore=[] if head == "module" else ["lm_head"])  # module: a fake-quant head
    plain = to_fake_quant(tiny_llama, quant).train()
    assert isinstance(plain.lm_head, FakeQuantLinear) == (head == "module")
    ours = add_response_logps(copy.deepcopy(plain))
    if head == "fallback":  # a head transform the chunked path does not implement: full logits instead
        ours.config.final_logit_softcapping = 30.0  # (Llama's own forward ignores it)
    if selective:
        assert enable_selective_checkpointing(ours)
    rows = _rows(5)
    b = collate(rows)
    ref = sequence_logps(plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1],
                         b["labels"], b["mask"])
    lp = response_logps(ours, collate_shared(rows))
    assert lp.shape == (10,) and torch.allclose(lp, ref, atol=1e-4, rtol=0)
    up = torch.randn(10, generator=torch.Generator().manual_seed(0))
    (ref * up).sum().backward()
    (lp * up).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ours.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


# Step-0 rewards are 0 up to fp32 rounding, not bitwise: the reference pass and the training pass batch
# different pairs together, so matmuls see different shapes, and fp32 kernels on AVX-512/AMX CPUs (and
# GPUs) sum in a shape-dependent order. Each scored token's log-prob may then differ by a few hundred
# ulps of its logits (|logit| ≲ 30 here: ulp ≈ 2e-6); 2^-16 per token bounds that with room, and is
# still ~1000× below the reward change of one optimizer step (docs/training.md).
FP32_TOKEN_TOL = 2.0 ** -16


def test_step0_rewards_are_zero_up_to_fp32_rounding(tiny_llama):
    """Reference log-probs (driver, no grad, batches of 4) and the training step's (train mode, selective
    checkpointing, other batches) run the same forward: at step 0 the implicit rewards are 0."""
    import copy

    from qdpo_ray.config import QuantConfig
    from qdpo_ray.quant.fake_quant import to_fake_quant
    from qdpo_ray.train.batch import collate_shared
    from qdpo_ray.train.checkpointing import enable_selective_checkpointing
    from qdpo_ray.train.logps import add_response_logps
    from qdpo_ray.train.reference import add_reference_logps
    from qdpo_ray.train.steps import preference_micro_step

    model = to_fake_quant(tiny_llama, QuantConfig(bits=4))
    rows = add_reference_logps(copy.deepcopy(model), _rows(6), batch_size=4)
    policy = add_response_logps(model).train()
    enable_selective_checkpointing(policy)
    t = TrainConfig()
    for batch in (rows[:3], rows[3:], rows[1:5]):
        tol = t.beta * FP32_TOKEN_TOL * max(len(r["chosen_token_ids"]) + len(r["rejected_token_ids"]) for r in batch)
        loss, vals = preference_micro_step(policy, collate_shared(batch), t)
        assert abs(vals[1]) <= tol and abs(vals[2]) <= tol
        assert vals[0] == pytest.approx(0.6931471805599453, abs=tol)


def test_make_optimizer_is_fused_adamw():
    from qdpo_ray.train.worker import make_optimizer

    opt = make_optimizer([torch.nn.Parameter(torch.zeros(3))], TrainConfig(lr=1e-3, weight_decay=0.1))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] and opt.defaults["weight_decay"] == 0.1


def test_training_plot_panels_follow_the_objective(tmp_path):
    from qdpo_ray.train.report import _panels, write_reports

    base = {"loss": 0.5, "logps/chosen": -60.0, "grad_norm": 2.0, "lr": 1e-5}
    kd = [{**base, "step": s, "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0,
           "logps/rejected": 0.0} for s in (1, 2)]
    dpo = [{**base, "step": s, "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s, "rewards/margins": 0.2 * s,
            "logps/rejected": -50.0} for s in (1, 2)]
    for hist, objective in ((kd, "kd"), (kd, None)):  # named, or recognised by its all-zero rewards
        names = [name for name, _ in _panels(hist, objective)]
        assert names[0].startswith("KD loss") and not any("reward" in n for n in names)
    assert [name for name, _ in _panels(dpo, "qdpo")][:2] == ["implicit rewards β·log(π_θ/π_ref)", "loss"]
    assert all(len(lines) for _, lines in _panels([{"step": 1, "loss": 0.7}], "qdpo"))  # missing metrics: no panel
    write_reports(kd, tmp_path, "KD", objective="kd")
    assert (tmp_path / "training.png").stat().st_size > 0 and (tmp_path / "metrics.csv").is_file()


def test_lora_policy_is_pi_q_plus_adapters_on_a_quantized_base(tiny_model_dir):
    """QDPO + LoRA: the frozen base holds Q(W) in plain Linears (no fp master copy, no per-forward
    fake-quant), so at initialisation (B = 0) the policy is π_q, and only the adapters get gradients —
    the same gradients with and without selective checkpointing."""
    from qdpo_ray.config import ModelConfig, QuantConfig, RunConfig
    from qdpo_ray.models import load_model
    from qdpo_ray.quant.fake_quant import FakeQuantLinear, to_fake_quant
    from qdpo_ray.train.worker import build_policy

    cfg = RunConfig(model=ModelConfig(name=str(tiny_model_dir)), quant=QuantConfig(bits=4),
                    train={"lora": {"enabled": True, "r": 8, "alpha": 8}})
    policy = build_policy(cfg)
    assert not any(isinstance(m, FakeQuantLinear) for m in policy.modules())
    pi_q = to_fake_quant(load_model(cfg.model, dtype="float32"), cfg.quant).eval()
    ids = torch.randint(0, pi_q.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(policy.eval()(input_ids=ids).logits, pi_q(input_ids=ids).logits, atol=1e-6, rtol=0)
    with torch.no_grad():  # move B off zero so that A gets a gradient too
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    grads = []
    for selective in (True, False):  # build_policy turned selective checkpointing on
        policy.zero_grad(set_to_none=True)
        if not selective:
            policy.gradient_checkpointing_disable()
        policy.train()(input_ids=ids).logits.logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0] and all("lora_" in n for n in grads[0])
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


def _reduce_rank(rank: int, world: int, init: str, backend: str, device: str, out) -> None:
    import torch.distributed as dist

    from qdpo_ray.train.distributed import reduce_step_metrics

    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        out.put((rank, reduce_step_metrics([1.0 + rank, 10.0], device)))
    finally:
        dist.destroy_process_group()


def _run_reduction(tmp_path, world: int, backend: str, device: str) -> list:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = f"file://{tmp_path}/pg"
    procs = [ctx.Process(target=_reduce_rank, args=(r, world, init, backend, device, q)) for r in range(world)]
    for p in procs:
        p.start()
    got = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return sorted(got)


def test_step_metrics_reduce_across_ranks_on_the_worker_device(tmp_path):
    """The worker's reduction (gloo on CPU here, 2 ranks): every rank gets the sums."""
    assert _run_reduction(tmp_path, 2, "gloo", "cpu") == [(0, [3.0, 20.0]), (1, [3.0, 20.0])]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a CUDA device (run on the GPU machine)")
def test_step_metrics_reduce_under_nccl(tmp_path):
    """Under NCCL the metrics tensor must live on the GPU (a CPU tensor fails at the first step)."""
    assert _run_reduction(tmp_path, 1, "nccl", "cuda:0") == [(0, [1.0, 10.0])]


def test_shards_are_deterministic_disjoint_and_equal_sized():
    from qdpo_ray.train.worker import shard_rows

    rows = [{"id": f"p{i:03d}"} for i in range(11)]
    shuffled = list(reversed(rows))
    a = [shard_rows(rows, r, 2) for r in range(2)]
    assert a == [shard_rows(shuffled, r, 2) for r in range(2)]  # arrival order does not matter
    assert [len(s) for s in a] == [5, 5]  # same step count on every rank
    assert not {r["id"] for r in a[0]} & {r["id"] for r in a[1]}


def test_packed_batches_refuse_attention_other_than_sdpa(tiny_llama):
    """The prompt-shared 4D boolean mask is only "True = attend" under SDPA: eager must be refused."""
    from qdpo_ray.train.batch import collate_shared
    from qdpo_ray.train.logps import add_response_logps, response_logps

    tiny_llama.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        response_logps(add_response_logps(tiny_llama), collate_shared(_rows(2)))


def test_reference_cache_key_covers_precision_revision_and_start():
    from qdpo_ray.config import load_config
    from qdpo_ray.train.trainer import reference_key

    base = load_config(None, [])
    k = reference_key(base, "pairs")
    assert k != reference_key(load_config(None, ["train.precision=bf16"]), "pairs")
    assert k != reference_key(load_config(None, ["model.revision=v2"]), "pairs")
    assert k != reference_key(base, "other pairs") and k != reference_key(base, "pairs", "round-2 weights")
    assert k == reference_key(load_config(None, ["train.lr=1e-6"]), "pairs")  # the optimizer is not the reference


def test_run_name_changes_with_the_pairs_the_config_and_the_start(tmp_path):
    """New pairs written at the same path start a new Ray Train run instead of resuming the old one's checkpoints."""
    from conftest import synthetic_pairs

    from qdpo_ray.config import load_config
    from qdpo_ray.train.trainer import pairs_digest, prepare_pairs, run_name

    def digest(seed):
        path = synthetic_pairs(tmp_path / "p", n=8, seed=seed)  # the same path, rewritten
        return pairs_digest(prepare_pairs(load_config(None, [f"train.pairs={path}", "train.per_device_batch_size=1"])))

    base = load_config(None, [])
    a, b = digest(0), digest(1)
    assert a == digest(0) and a != b
    assert run_name(base, a) == run_name(load_config(None, []), a)
    assert run_name(base, a) != run_name(base, b)
    assert run_name(base, a) != run_name(base, a, "round-2 weights")
    assert run_name(base, a) != run_name(load_config(None, ["train.lr=1e-6"]), a)


def test_unexportable_bits_are_refused_before_training():
    from qdpo_ray.config import ConfigError, load_config
    from qdpo_ray.train.trainer import check

    with pytest.raises(ConfigError, match=r"quant.bits=3: train.export=true writes .*set train.export=false"):
        check(load_config(None, ["quant.bits=3"]))
    check(load_config(None, ["quant.bits=3", "train.export=false"]))


def _anchored_length1_pairs(reference, rows) -> list[dict]:
    """What `pairs.mode: anchored` with continuation_len 1 makes at *every* flip: prompt + y[:k], chosen
    y_k, rejected π_q's argmax there (from the reference's own teacher-forced logits)."""
    pairs = []
    with torch.no_grad():
        for r in rows:
            p, y = list(r["prompt_token_ids"]), list(r["chosen_token_ids"])
            logits = reference(input_ids=torch.tensor([p + y])).logits[0]
            for k in range(len(y)):
                rk = int(logits[len(p) + k - 1].argmax())
                if rk != y[k]:
                    pairs.append({"prompt_token_ids": p + y[:k], "chosen_token_ids": [y[k]], "rejected_token_ids": [rk]})
    return pairs


def test_flip_step_equals_anchored_length1_pairs_and_starts_at_zero(tiny_llama):
    """`qdpo_flips` scores every flip of a row from one pass; it must be the anchored L = 1 pairs of all
    flips through plain eq. 5 (`qdpo` on those pairs), and at step 0 (π_θ = π_q) exactly log 2 with zero
    rewards. `qdpo_flips+kd` adds λ × the `kd` step's loss."""
    import copy

    from qdpo_ray.config import QuantConfig
    from qdpo_ray.quant.fake_quant import to_fake_quant
    from qdpo_ray.train.batch import collate_shared
    from qdpo_ray.train.logps import add_response_logps
    from qdpo_ray.train.reference import add_reference_logps
    from qdpo_ray.train.steps import kd_step, preference_micro_step, qdpo_flips_step

    teacher = copy.deepcopy(tiny_llama).requires_grad_(False)
    reference = to_fake_quant(copy.deepcopy(tiny_llama), QuantConfig(bits=4)).requires_grad_(False).eval()
    policy = add_response_logps(to_fake_quant(copy.deepcopy(tiny_llama), QuantConfig(bits=4))).train()
    rows = _rows(5, seed=3)
    t = TrainConfig(objective="qdpo_flips", beta=0.5)

    loss0, vals0, _ = qdpo_flips_step(policy, rows, t, reference=reference)
    assert loss0.item() == pytest.approx(math.log(2), abs=1e-6) and abs(vals0[1]) < 1e-6 and abs(vals0[2]) < 1e-6
    on0, _, _ = qdpo_flips_step(policy, rows, t.model_copy(update={"flips_of": "policy"}), reference=reference)
    assert on0.item() == pytest.approx(loss0.item(), abs=1e-6)  # at step 0 π_θ's flips are π_q's

    with torch.no_grad():  # a trained-looking π_θ: every master weight moved a little
        g = torch.Generator().manual_seed(0)
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    loss, vals, _ = qdpo_flips_step(policy, rows, t, reference=reference)
    pairs = _anchored_length1_pairs(reference, rows)
    assert len(pairs) > 5
    anchored = add_reference_logps(copy.deepcopy(reference), pairs, batch_size=len(pairs))
    a_loss, a_vals = preference_micro_step(policy, collate_shared(anchored), t)
    assert loss.item() == pytest.approx(a_loss.item(), abs=1e-5)
    assert vals[1:4] == pytest.approx(a_vals[1:4], abs=1e-5)
    assert abs(loss.item() - math.log(2)) > 1e-3  # the comparison is not between two step-0 losses

    # on-policy flips: the anchored L = 1 pairs of π_θ's own flips (its argmax as r_k), scored against π_q
    tp = TrainConfig(objective="qdpo_flips", beta=0.5, flips_of="policy")
    p_loss, p_vals, _ = qdpo_flips_step(policy, rows, tp, reference=reference)
    with torch.no_grad():
        own = _anchored_length1_pairs(policy, rows)
    assert len(own) > 5 and own != pairs
    own = add_reference_logps(copy.deepcopy(reference), own, batch_size=len(own))
    o_loss, o_vals = preference_micro_step(policy, collate_shared(own), tp)
    assert p_loss.item() == pytest.approx(o_loss.item(), abs=1e-5)
    assert p_vals[1:4] == pytest.approx(o_vals[1:4], abs=1e-5)

    tk = TrainConfig(objective="qdpo_flips+kd", beta=0.5, kd_weight=0.3)
    mix, _, _ = qdpo_flips_step(policy, rows, tk, teacher=teacher, reference=reference)
    kd, _, _ = kd_step(policy, rows, tk, teacher=teacher)
    assert mix.item() == pytest.approx(loss.item() + 0.3 * kd.item(), abs=1e-5)
    mix.backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)


def _flips_on_answers(reference, teacher, rows, key: str) -> list[dict]:
    """The anchored L = 1 pairs of every flip along `key`'s answers: prefix prompt + answer[:k], chosen the fp
    teacher's argmax there, rejected the reference's argmax where it differs."""
    pairs = []
    with torch.no_grad():
        for r in rows:
            p, y = list(r["prompt_token_ids"]), list(r[key])
            ids = torch.tensor([p + y])
            ref, fp = reference(input_ids=ids).logits[0], teacher(input_ids=ids).logits[0]
            for k in range(len(y)):
                yk, rk = int(fp[len(p) + k - 1].argmax()), int(ref[len(p) + k - 1].argmax())
                if rk != yk:
                    pairs.append({"prompt_token_ids": p + y[:k], "chosen_token_ids": [yk], "rejected_token_ids": [rk]})
    return pairs


def test_answers_both_adds_the_flips_and_kd_along_pi_q_own_answers(tiny_llama):
    """`train.answers: both`: the flip term also scores π_q's own answers y_l, where the token to prefer is
    the fp teacher's argmax (the states the quantized model reaches when it generates), and KD covers y_l's
    positions too. Checked against the anchored L = 1 pairs of both answers' flips and against KD on y_l
    given as extra chosen answers."""
    import copy

    from qdpo_ray.config import QuantConfig
    from qdpo_ray.quant.fake_quant import to_fake_quant
    from qdpo_ray.train.batch import collate_shared
    from qdpo_ray.train.logps import add_response_logps
    from qdpo_ray.train.reference import add_reference_logps
    from qdpo_ray.train.steps import kd_step, objective_of, preference_micro_step, qdpo_flips_step

    teacher = copy.deepcopy(tiny_llama).requires_grad_(False)
    reference = to_fake_quant(copy.deepcopy(tiny_llama), QuantConfig(bits=4)).requires_grad_(False).eval()
    policy = add_response_logps(to_fake_quant(copy.deepcopy(tiny_llama), QuantConfig(bits=4))).train()
    with torch.no_grad():  # the fp answers: the teacher's own greedy tokens, as the pairs stage writes them
        rows = []
        for r in _rows(6, seed=5):
            ids = list(r["prompt_token_ids"])
            for _ in range(6):
                ids.append(int(teacher(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            rows.append({**r, "chosen_token_ids": ids[len(r["prompt_token_ids"]):]})
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))

    t = TrainConfig(objective="qdpo_flips", beta=0.5, answers="both")
    loss, vals, _ = qdpo_flips_step(policy, rows, t, teacher=teacher, reference=reference)
    on_y_l = _flips_on_answers(reference, teacher, rows, "rejected_token_ids")
    pairs = _flips_on_answers(reference, teacher, rows, "chosen_token_ids") + on_y_l
    assert len(on_y_l) >= 3
    pairs = add_reference_logps(copy.deepcopy(reference), pairs, batch_size=len(pairs))
    a_loss, a_vals = preference_micro_step(policy, collate_shared(pairs), t)
    assert loss.item() == pytest.approx(a_loss.item(), abs=1e-5)
    assert vals[1:4] == pytest.approx(a_vals[1:4], abs=1e-5)
    chosen_only, _, _ = qdpo_flips_step(policy, rows, t.model_copy(update={"answers": "chosen"}), reference=reference)
    assert abs(chosen_only.item() - loss.item()) > 1e-4

    kd_both = TrainConfig(objective="kd", answers="both")
    as_chosen = rows + [{**r, "chosen_token_ids": r["rejected_token_ids"]} for r in rows]
    kd, _, _ = kd_step(policy, rows, kd_both, teacher=teacher)
    ref_kd, _, _ = kd_step(policy, as_chosen, TrainConfig(objective="kd"), teacher=teacher)
    assert kd.item() == pytest.approx(ref_kd.item(), abs=1e-6)

    tk = TrainConfig(objective="qdpo_flips+kd", beta=0.5, kd_weight=0.3, answers="both")
    mix, _, _ = qdpo_flips_step(policy, rows, tk, teacher=teacher, reference=reference)
    assert mix.item() == pytest.approx(loss.item() + 0.3 * kd.item(), abs=1e-5)
    # what the trainer loads and keeps: the teacher, and only pairs that have a y_l
    assert objective_of(t).teacher and objective_of(t).rejected and not objective_of(TrainConfig(objective="qdpo_flips")).teacher


def test_answers_both_is_refused_for_sequence_level_objectives():
    from qdpo_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train.*answers=both is for the token-level objectives.*set answers=chosen"):
        load_config(None, ["train.objective=qdpo", "train.answers=both"])
    load_config(None, ["train.objective=kd", "train.answers=both"])


def _checkpoint_on_its_own_grid(path, tiny_model_dir):
    """A packed W4 checkpoint of the tiny model on a non-min-max grid, as AWQ/GPTQ write (their scales come
    from a search, not min-max); returns the config that starts from it, the tokenizer, and the fp weights
    it rounded (what AWQ's latent file would hold)."""
    from qdpo_ray.config import load_config
    from qdpo_ray.models import load_model, load_tokenizer
    from qdpo_ray.quant.export import export_packed
    from qdpo_ray.quant.fake_quant import FakeQuantLinear, to_fake_quant
    from qdpo_ray.quant.rtn import compute_qparams

    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"train.init_from={path}", "train.objective=qdpo_flips"])
    tok = load_tokenizer(cfg.model)
    m = to_fake_quant(load_model(tiny_model_dir, dtype="float32"), cfg.quant)
    latent = {}
    for name, mod in m.named_modules():
        if isinstance(mod, FakeQuantLinear):
            s, z = compute_qparams(mod.weight.detach(), mod.spec)
            mod.frozen_scale, mod.frozen_zero = s * 1.25, z
            latent[name + ".weight"] = mod.weight.detach().clone()
    export_packed(m, tok, cfg.quant, path)
    return cfg, tok, latent


def test_start_from_a_quantized_checkpoint_keeps_its_own_grid(tmp_path, tiny_model_dir):
    """train.init_from (AWQ+QDPO, paper Table 3): π_θ and π_q start as the checkpoint's model exactly, on its
    own scales and zero points — min-max RTN of its de-quantized weights would be another model — and an
    untrained export packs the same integers back."""
    from safetensors.torch import load_file

    from qdpo_ray.models import load_model
    from qdpo_ray.quant.fake_quant import FakeQuantLinear, checkpoint_grid, quantize_model_rtn
    from qdpo_ray.train.export import export_trained
    from qdpo_ray.train.reference import load_reference
    from qdpo_ray.train.trainer import codes_moved, start_weights
    from qdpo_ray.train.worker import build_policy

    cfg, tok, _ = _checkpoint_on_its_own_grid(tmp_path / "ckpt", tiny_model_dir)
    x = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        ckpt = load_model(str(tmp_path / "ckpt"), dtype="float32")(input_ids=x).logits
        weights = start_weights(str(tmp_path / "ckpt"))
        assert len(checkpoint_grid(weights)) == 14  # 2 layers × 7 Linears
        policy, reference = build_policy(cfg, weights).eval(), load_reference(cfg, weights)
        deq = load_model(str(tmp_path / "ckpt"), dtype="float32").state_dict()
        fq = {n: mod.quantized_weight() for n, mod in policy.named_modules() if isinstance(mod, FakeQuantLinear)}
        assert len(fq) == 14 and max((fq[n] - deq[n + ".weight"]).abs().max().item() for n in fq) < 1e-6
        # the reference holds Q(W) in plain Linears, on the checkpoint's grid too
        assert not any(isinstance(m, FakeQuantLinear) for m in reference.modules())
        assert max((reference.get_submodule(n).weight - deq[n + ".weight"]).abs().max().item() for n in fq) < 1e-6
        for model in (policy, reference):
            assert torch.allclose(model(input_ids=x).logits, ckpt, atol=1e-5)
        rtn_again = quantize_model_rtn(load_model(str(tmp_path / "ckpt"), dtype="float32"), cfg.quant)
        assert (rtn_again(input_ids=x).logits - ckpt).abs().max() > 1e-3
    master = {k: v for k, v in weights.items() if not k.endswith((".weight_scale", ".weight_zero_point", ".weight_shape"))}
    assert codes_moved(cfg, master, weights) == 0
    info = export_trained(cfg, master, tmp_path / "out", tok, weights)
    a, b = load_file(str(tmp_path / "ckpt" / "model.safetensors")), load_file(str(Path(info["export"]) / "model.safetensors"))
    packed = [k for k in a if k.endswith((".weight_packed", ".weight_scale", ".weight_zero_point"))]
    assert len(packed) == 42 and all(torch.equal(a[k], b[k]) for k in packed)


def test_awq_latent_weights_are_the_master_weights_and_round_to_the_same_pi_q(tmp_path, tiny_model_dir):
    """A `latent.safetensors` beside the checkpoint (AWQ's scaled weights before rounding, ptq_worker.py):
    π_θ's master weights start there instead of at the bin centres — from which STE training at lr 1e-4 moved
    no code of the embedded model's AWQ checkpoint in 32 steps (docs/results.md) — and π_θ, π_q and the
    codes are unchanged at step 0. A latent file that rounds to other integers is refused, naming the layer."""
    from safetensors.torch import save_file

    from qdpo_ray.config import ConfigError
    from qdpo_ray.models import load_model
    from qdpo_ray.quant.fake_quant import LATENT_FILE, FakeQuantLinear
    from qdpo_ray.train.reference import load_reference
    from qdpo_ray.train.trainer import codes_moved, start_weights
    from qdpo_ray.train.worker import build_policy

    ckpt = tmp_path / "ckpt"
    cfg, _, latent = _checkpoint_on_its_own_grid(ckpt, tiny_model_dir)
    deq = start_weights(str(ckpt))
    assert start_weights(str(ckpt), cfg.quant).keys() == deq.keys()  # no latent file yet: the same
    save_file(latent, str(ckpt / LATENT_FILE))
    assert all(torch.equal(start_weights(str(ckpt))[k], deq[k]) for k in deq)  # without the quant section: unused
    weights = start_weights(str(ckpt), cfg.quant)
    assert all(torch.equal(weights[k], latent[k]) for k in latent) and len(latent) == 14
    assert all(not torch.equal(weights[k], deq[k]) for k in latent)  # off the bin centres
    x = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        want = load_model(str(ckpt), dtype="float32")(input_ids=x).logits
        policy = build_policy(cfg, weights).eval()
        assert any(isinstance(m, FakeQuantLinear) for m in policy.modules())
        for model in (policy, load_reference(cfg, weights)):
            assert torch.allclose(model(input_ids=x).logits, want, atol=1e-5)
    assert codes_moved(cfg, {k: v for k, v in weights.items() if k in latent or k in deq}, weights) == 0

    bad = dict(latent)
    name = "model.layers.1.mlp.down_proj.weight"
    bad[name] = deq[name] + 0.75 * deq[name.removesuffix(".weight") + ".weight_scale"]
    save_file(bad, str(ckpt / LATENT_FILE))
    with pytest.raises(ConfigError, match="model.layers.1.mlp.down_proj does not round"):
        start_weights(str(ckpt), cfg.quant)


@pytest.mark.parametrize("mode", ["natural", "anchored"])
def test_a_round_regenerates_round_1s_prompts_with_round_1s_settings(tmp_path, mode):
    """Round 2's pairs are round 1's prompts and generation settings with the trained W4 model — never
    the train config's own prompts section, whose default is the held-out `builtin:eval`."""
    import json

    from qdpo_ray.config import ConfigError, load_config
    from qdpo_ray.generate.pairs import generation_key, regeneration_config
    from qdpo_ray.train.rounds import generation_settings

    gen = ["out=unused", "prompts.source=builtin:train", "prompts.limit=256", "pairs.max_new_tokens=64",
           "pairs.w4_dir=runs/x/w4-rtn", "model.system_prompt=Be brief.", f"pairs.mode={mode}",
           "pairs.continuation_len=2", "pairs.anchor_by=margin"]
    round1 = generation_key(load_config(overrides=gen), "runs/x/w4-rtn")
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "generation.json").write_text(json.dumps(round1))
    cfg = load_config("configs/train.yaml", [f"train.pairs={pairs}", "train.rounds=2", "train.answers=both",
                                             "train.objective=kd", "pairs.engine.num_actors=2", "seed=1"])
    assert cfg.prompts.source == "builtin:eval" and cfg.pairs.max_new_tokens == 128  # what a naive round 2 reads
    assert round1["seed"] == 0  # a second training seed on the same pairs still regenerates them as made

    regen = regeneration_config(cfg, generation_settings(cfg), "runs/t/w4-kd", tmp_path / "round-2" / "pairs")
    assert generation_key(regen, "runs/t/w4-kd") == {**round1, "w4_dir": "runs/t/w4-kd"}
    assert regen.pairs.w4_dir == "runs/t/w4-kd" and regen.pairs.overwrite and regen.out.endswith("round-2/pairs")
    assert regen.pairs.engine.num_actors == 2 and regen.train == cfg.train  # the rest is the run's own
    assert cfg.seed == 1 and regen.seed == 0

    (pairs / "generation.json").unlink()
    with pytest.raises(ConfigError, match="train.rounds=2 .*generation.json.*generate-pairs"):
        generation_settings(cfg)
    (pairs / "generation.json").write_text(json.dumps({**round1, "model": "other-model"}))
    with pytest.raises(ConfigError, match="'other-model' but model.name is 'smollm2-135m'"):
        generation_settings(cfg)
