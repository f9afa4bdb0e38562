"""Rotary embedding (src/ioattn/decode/rotary.py) against hand-written rotations."""
import math

import pytest
import torch

from ioattn.decode.rotary import apply_rotary, rotary_positions


def _tables(T, half):
    angle = torch.rand(T, half, dtype=torch.float64) * 2 * math.pi
    return angle.cos(), angle.sin(), angle


@pytest.mark.parametrize("interleaved", [True, False], ids=["gptj", "neox"])
def test_rotation_by_hand(interleaved):
    # D = 6, rotary_dim = 4: two rotated pairs and two features that pass through.
    cos, sin, angle = _tables(10, 2)
    x = torch.randn(1, 2, 1, 6, dtype=torch.float64)
    pos = torch.tensor([[3, 7]])
    y = apply_rotary(x, cos, sin, pos, interleaved=interleaved)
    pairs = [(0, 1), (2, 3)] if interleaved else [(0, 2), (1, 3)]
    for t in range(2):
        for j, (a, b) in enumerate(pairs):
            # (x_a + i x_b) · e^{iθ}: the pair rotated by the angle of its position
            z = complex(x[0, t, 0, a], x[0, t, 0, b]) * complex(math.cos(angle[pos[0, t], j]),
                                                                math.sin(angle[pos[0, t], j]))
            assert math.isclose(y[0, t, 0, a].item(), z.real, abs_tol=1e-12)
            assert math.isclose(y[0, t, 0, b].item(), z.imag, abs_tol=1e-12)
        assert torch.equal(y[0, t, 0, 4:], x[0, t, 0, 4:])


def test_positions():
    seqlens = torch.tensor([0, 5], dtype=torch.int32)
    assert rotary_positions(seqlens, 3).tolist() == [[0, 1, 2], [5, 6, 7]]
    assert rotary_positions(seqlens, 3, same_position=True).tolist() == [[0, 0, 0], [5, 5, 5]]


def test_low_precision_rounds_once():
    # fp16 input: the rotation is computed in fp32 and rounded once.
    cos, sin, _ = _tables(8, 8)
    x = torch.randn(2, 3, 2, 16).half()
    pos = torch.randint(0, 8, (2, 3))
    y = apply_rotary(x, cos.half(), sin.half(), pos, interleaved=False)
    exact = apply_rotary(x.float(), cos.half().float(), sin.half().float(), pos, interleaved=False)
    assert y.dtype == torch.float16
    assert torch.equal(y, exact.half())
