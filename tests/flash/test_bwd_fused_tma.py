"""The one-pass Hopper backward with atomic dQ (src/ioattn/flash/bwd_fused_tma.py): the accuracy
rule against the dense reference, and agreement with the two-pass TMA backward.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (its atomics too); the `gpu`
tests run it compiled on the H200 with the tiles the sweep tries.
"""
import dataclasses

import pytest
import torch

from ioattn.flash.bwd_fused_tma import flash_bwd_fused_tma
from ioattn.flash.bwd_tma import flash_bwd_tma
from ioattn.flash.config import get_tma_bwd_config

from .cases import DTYPES, case_id
from .test_bwd import check_bwd
from .test_bwd_tma import CASES, GPU_CASES


def fused_vs_two_pass(dout, q, k, v, out, lse, scale, causal, offset, *, config=None, window, softcap,
                      alibi_slopes):
    """flash_bwd_triton's signature for check_bwd: the one-pass backward, also checked against the
    two-pass one on the same inputs (the same math, summed in another order)."""
    assert tuple(window) == (-1, -1) and not softcap and alibi_slopes is None
    interpret = q.device.type == "cpu"
    config = config or get_tma_bwd_config(q.shape[-1], q.dtype, causal, interpret=interpret)
    got = flash_bwd_fused_tma(dout.contiguous(), q, k, v, out, lse, scale, causal, offset, config=config)
    two_pass = flash_bwd_tma(dout, q, k, v, out, lse, scale, causal, offset, config=config)
    tol = 1e-5 if q.dtype == torch.float32 else 2e-2
    for name, a, b in zip(("dq", "dk", "dv"), got, two_pass):
        diff = float((a.float() - b.float()).abs().max())
        assert diff <= tol * float(b.float().abs().max()) + 1e-6, f"{name}: differs from two-pass by {diff:.2e}"
    return got


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bwd_fused_tma(case, dtype):
    check_bwd(*case, DTYPES[dtype], bwd=fused_vs_two_pass)


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [(64, 64, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2)], ids=str)
@pytest.mark.parametrize("case", [c for c in GPU_CASES if c[5] <= 128], ids=case_id)
def test_bwd_fused_tma_gpu(case, tiles):
    config = dataclasses.replace(get_tma_bwd_config(case[5], torch.bfloat16, case[6], interpret=False),
                                 BLOCK_M1=tiles[0], BLOCK_N1=tiles[1], warps1=tiles[2], stages1=tiles[3])
    check_bwd(*case, torch.bfloat16, config=config, bwd=fused_vs_two_pass)
