"""The accuracy rule itself (src/ioattn/testing.py): what passes, what must not."""
import math

import torch

from ioattn.testing import check_close, max_err


def test_nan_never_passes():
    ref = torch.randn(8, dtype=torch.float64)
    out = ref.float().clone()
    out[3] = float("nan")
    assert not check_close("x", out, ref, ref.float()).ok


def test_equal_infinities_are_exact():
    ref = torch.tensor([-math.inf, 1.0], dtype=torch.float64)
    assert max_err(torch.tensor([-math.inf, 1.0]), ref) == 0.0
    assert max_err(torch.tensor([0.0, 1.0]), ref) == math.inf


def test_floor_scales_with_the_reference_not_its_infinities():
    # The floor is 1e-5 per unit of the largest finite |ref| (at least 1), for fp32 outputs.
    small = torch.tensor([0.25, -0.5, 0.0], dtype=torch.float64)
    assert check_close("x", small.float(), small, small.float()).bound == 1e-5
    big = torch.tensor([-math.inf, 6.0, -2.0], dtype=torch.float64)
    assert math.isclose(check_close("x", big.float(), big, big.float()).bound, 6e-5)
    # an error within 3x plain PyTorch plus that floor passes; past it, it fails
    off = big.float() + torch.tensor([0.0, 1e-4, 0.0])
    base = big.float() + torch.tensor([0.0, 0.0, 2e-5])
    c = check_close("x", off, big, base, factor=3)
    assert math.isclose(c.bound, 3 * c.base_err + 6e-5) and c.ok
    assert not check_close("x", off, big, big.float(), factor=3).ok
