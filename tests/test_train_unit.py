"""Batch layout, schedules and data order of the trainer, without Ray."""

import pytest

from qdpo_ray.config import TrainConfig
from qdpo_ray.train.batch import collate, truncate
from qdpo_ray.train.trainer import _batches, lr_lambda


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
