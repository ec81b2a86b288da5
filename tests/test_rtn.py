"""The RTN maths against hand-computed values, error bounds, and compressed-tensors' own quantizer."""

import pytest
import torch

from qdpo_ray.quant.rtn import QuantSpec, compute_qparams, dequantize, fake_quantize, quantize, quantization_error


def test_hand_computed_asymmetric_4bit():
    # One channel, min -1, max 2: s = 3/15 = 0.2, z = round(-8 - (-1)/0.2) = round(-3) = -3.
    w = torch.tensor([[-1.0, 0.0, 0.5, 0.31, 2.0]])
    spec = QuantSpec(bits=4)
    s, z = compute_qparams(w, spec)
    assert torch.allclose(s, torch.tensor([[0.2]]))
    assert z.item() == -3
    q = quantize(w, s, z, spec)
    # w/s + z = [-8, -3, -0.5, -1.45, 7] → round half to even: -0.5 → -0 and -1.45 → -1
    assert q.tolist() == [[-8.0, -3.0, -0.0, -1.0, 7.0]]
    assert torch.allclose(dequantize(q, s, z, spec), torch.tensor([[-1.0, 0.0, 0.6, 0.4, 2.0]]))


def test_hand_computed_symmetric_and_all_positive():
    spec = QuantSpec(bits=4, symmetric=True)
    w = torch.tensor([[0.7, -0.35, 0.1]])
    s, z = compute_qparams(w, spec)
    assert torch.allclose(s, torch.tensor([[0.1]])) and z.item() == 0  # 0.7 / 7
    assert torch.allclose(fake_quantize(w, spec), torch.tensor([[0.7, -0.4, 0.1]]))  # -3.5 → -4 (even)
    # All-positive channel: min is clamped to 0 so that 0.0 stays representable.
    s2, z2 = compute_qparams(torch.tensor([[1.0, 1.5, 3.0]]), QuantSpec(bits=2))
    assert torch.allclose(s2, torch.tensor([[1.0]])) and z2.item() == -2


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_bound(bits, group_size, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(64, 128) * torch.rand(64, 1)
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    s, z = compute_qparams(w, spec)
    q = quantize(w, s, z, spec)
    assert q.min() >= spec.q_min and q.max() <= spec.q_max
    assert torch.equal(q, q.round())
    # RTN without clipping: every weight within half a step of its grid point.
    assert quantization_error(w, spec).max() <= 0.5 + 1e-4
    # Asymmetric uses the whole grid: each group's extremes hit q_min or q_max.
    if not symmetric:
        qg = q.reshape(64, -1, group_size or 128)
        assert ((qg.amin(-1) == spec.q_min) | (qg.amax(-1) == spec.q_max)).all()


def test_error_shrinks_with_bits():
    torch.manual_seed(0)
    w = torch.randn(128, 256)
    errs = [(fake_quantize(w, QuantSpec(bits=b)) - w).pow(2).mean().item() for b in (2, 3, 4, 6, 8)]
    assert all(a > 3 * b for a, b in zip(errs, errs[1:]))
    assert (fake_quantize(w, QuantSpec(bits=4, group_size=32)) - w).pow(2).mean() < errs[2]


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        compute_qparams(torch.randn(4, 100), QuantSpec(bits=4, group_size=64))


@pytest.mark.parametrize("group_size,symmetric", [(None, False), (32, False), (None, True)])
def test_same_integers_as_compressed_tensors(group_size, symmetric):
    """One rounding convention: our integers equal compressed-tensors' quantize() on the same qparams."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize

    torch.manual_seed(1)
    w = torch.randn(96, 128)
    spec = QuantSpec(bits=4, group_size=group_size, symmetric=symmetric)
    s, z = compute_qparams(w, spec)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric,
                            strategy="group" if group_size else "channel", group_size=group_size)
    ct = ct_quantize(w, s, z.to(torch.int8), args, dtype=torch.float32)
    assert torch.equal(ct, quantize(w, s, z, spec))
