"""The pairs fidelity check's pieces that run without a GPU: the exact-fp32 switch, the resources a scorer
asks for, and the teacher-forced agreement itself on a real (tiny, random) Llama."""

import pytest
import torch


def test_exact_fp32_turns_tf32_off():
    from qdpo_ray.generate.fidelity import exact_fp32

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              torch.get_float32_matmul_precision())
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        assert exact_fp32() == {"cuda.matmul.allow_tf32": False, "cudnn.allow_tf32": False,
                                "float32_matmul_precision_highest": True}
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]
        torch.set_float32_matmul_precision(before[2])


def test_scorer_takes_a_gpu_only_when_the_engines_have_them():
    from qdpo_ray.generate.fidelity import scorer_resources

    assert scorer_resources(4.0, 0.0) == {"num_cpus": 4.0, "num_gpus": 0.0}  # CPU pool: as before
    assert scorer_resources(4.0, 1.0) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert scorer_resources(4.0, 0.25) == {"num_cpus": 1.0, "num_gpus": 1.0}  # fp32 needs a whole GPU


def test_greedy_agreement_counts_argmax_tokens(tiny_llama):
    from qdpo_ray.generate.fidelity import greedy_agreement

    prompts = [[5, 17, 33], [9, 4]]
    answers = []
    with torch.no_grad():
        for p in prompts:
            out = tiny_llama.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False,
                                      attention_mask=torch.ones(1, len(p), dtype=torch.long))
            answers.append(out[0, len(p):].tolist())
    assert greedy_agreement(tiny_llama, prompts, answers) == [(6, 6), (6, 6)]
    wrong = [answers[0][:3] + [(answers[0][3] + 1) % 512] + answers[0][4:], answers[1]]
    (m0, n0), (m1, n1) = greedy_agreement(tiny_llama, prompts, wrong)
    assert n0 == 6 and m0 < 6 and (m1, n1) == (6, 6)
    assert greedy_agreement(tiny_llama, prompts, [[], answers[1]])[0] == (0, 0)
