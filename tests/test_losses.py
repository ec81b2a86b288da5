"""Loss maths against hand-computed values."""

import math

import pytest
import torch

from qdpo_ray.train.losses import chunked_token_logps, kd_loss, preference_loss, sequence_logps, token_logps


def test_sequence_logps_masks_prompt_and_padding():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
    labels = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])  # first position is prompt
    assert sequence_logps(logits, labels, mask).item() == pytest.approx(math.log(0.8) + math.log(0.6), abs=1e-6)


def test_sigmoid_qdpo_hand_computed():
    pc, pr, rc, rr = (torch.tensor([x]) for x in (-10.0, -12.0, -11.0, -11.0))
    out = preference_loss(pc, pr, rc, rr, beta=0.1)
    # h = 0.1 * ((−10+11) − (−12+11)) = 0.2 ;  loss = −log σ(0.2) = log(1 + e^−0.2)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1) and out.rejected_rewards.item() == pytest.approx(-0.1)
    # At step 0 (policy == reference) the loss is log 2 and the rewards are 0.
    zero = preference_loss(rc, rr, rc, rr)
    assert zero.loss.item() == pytest.approx(math.log(2)) and zero.chosen_rewards.item() == 0


def test_cdpo_and_ipo_hand_computed():
    pc, pr, rc, rr = (torch.tensor([x]) for x in (-10.0, -12.0, -11.0, -11.0))
    eps = 0.1
    c = preference_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=eps)
    expect = (1 - eps) * math.log1p(math.exp(-0.2)) + eps * math.log1p(math.exp(0.2))
    assert c.loss.item() == pytest.approx(expect, abs=1e-6)
    i = preference_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo", chosen_len=torch.tensor([4.0]),
                        rejected_len=torch.tensor([2.0]))
    assert i.loss.item() == pytest.approx((1 / 4 - (-1) / 2 - 5.0) ** 2, abs=1e-5)


def test_gradient_pushes_chosen_up_rejected_down():
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-5.0], requires_grad=True)
    preference_loss(pc, pr, torch.tensor([-5.0]), torch.tensor([-5.0])).loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descending the loss raises log π(y_w), lowers log π(y_l)


def test_kd_loss():
    t = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    s = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]))
    mask = torch.tensor([[1.0, 1.0]])
    expect = (0 + 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)) / 2
    assert kd_loss(s, t, mask).item() == pytest.approx(expect, abs=1e-6)
    assert kd_loss(t, t, mask).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_token_logps_equal_plain_with_gradients(chunk, bias):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True) if bias else None
    y = torch.randint(0, 50, (37,), generator=g)
    up = torch.randn(37, generator=g)  # an arbitrary upstream gradient
    ins = (h, w, b) if bias else (h, w)
    plain = token_logps(torch.nn.functional.linear(h, w, b).unsqueeze(0), y.unsqueeze(0))[0]
    g_plain = torch.autograd.grad((plain * up).sum(), ins)
    chunked = chunked_token_logps(h, w, b, y, chunk=chunk)
    g_chunked = torch.autograd.grad((chunked * up).sum(), ins)
    assert chunked.dtype == torch.float32 and chunked.shape == (37,)
    assert torch.allclose(chunked, plain, atol=1e-5, rtol=0)
    for a, c in zip(g_plain, g_chunked):
        assert torch.allclose(a, c, atol=1e-5, rtol=0)


def test_chunked_token_logps_empty_and_no_grad():
    w = torch.randn(10, 4, requires_grad=True)
    h = torch.zeros(0, 4, requires_grad=True)
    out = chunked_token_logps(h, w, None, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)
    out.sum().backward()  # still connected: an all-prompt micro-batch must not fail in backward
    with torch.no_grad():
        x = torch.randn(3, 4)
        y = torch.tensor([1, 2, 3])
        assert torch.allclose(chunked_token_logps(x, w, None, y, chunk=2),
                              torch.log_softmax(x @ w.T, -1).gather(1, y[:, None])[:, 0], atol=1e-6)
