"""Accuracy of the Triton backward (src/ioattn/flash/bwd.py) against the dense reference.

Without a GPU these run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET);
with one they run compiled. Every case runs the Triton forward, then checks dq, dk and dv against
the reference's autograd with the same dout: error at most 3× that of plain PyTorch in the input
dtype, on NaN-poisoned outputs.
"""
import math

import pytest
import torch

from ioattn import flash_attn_func
from ioattn.flash.bwd import flash_bwd_triton
from ioattn.flash.config import BwdConfig, get_bwd_config, padded_head_dim
from ioattn.flash.fwd import flash_fwd_triton
from ioattn.flash.reference import attention_ref
from ioattn.testing import assert_close, make_qkv

from .cases import (DEVICE, DTYPES, FEATURE_CASES, GPU_CASES, GPU_FEATURE_CASES, GPU_FP32_CASES, SMEM_BYTES,
                    case_id, feature_id, reference_dtype)


def leaf(x, dtype):
    return x.detach().to(dtype).requires_grad_()


def make_slopes(alibi, B, H):
    """ALiBi slopes of shape ``[H]`` (alibi="H") or ``[B, H]`` ("BH"), or None."""
    if alibi is None:
        return None
    shape = (H,) if alibi == "H" else (B, H)
    # Positive, and spread over the range real models use (2^-8 .. 2^-1 for 8 heads).
    return (torch.rand(shape, device=DEVICE) * 0.5 + 2**-8).float()


def check_bwd(B, Tq, Tk, H, Hkv, D, causal, diag_offset, dtype, *, layout="bthd",
              dout_strided=False, config=None, window=(-1, -1), softcap=0.0, alibi=None, bwd=flash_bwd_triton):
    """Run the Triton forward and ``bwd`` (a launcher with flash_bwd_triton's signature) and check
    dq, dk, dv with the accuracy rule; returns them."""
    q, k, v = make_qkv(B, Tq, Tk, H, Hkv, D, dtype=dtype, device=DEVICE, layout=layout)
    scale = 1.0 / math.sqrt(D)
    offset = Tk - Tq if diag_offset is None else diag_offset
    features = dict(window=window, softcap=softcap, alibi_slopes=make_slopes(alibi, B, H))
    if dout_strided:
        # [B, H, T, 2D] storage, every other D-block: neither [B, T, H, D] nor its transpose.
        dout = torch.randn(B, H, Tq, 2 * D, device=DEVICE).to(dtype)[..., :D].transpose(1, 2)
    else:
        dout = torch.randn(B, Tq, H, D, device=DEVICE).to(dtype)

    out, lse = flash_fwd_triton(q, k, v, scale, causal, offset, **features)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, scale, causal, offset, config=config, **features)
    for g, x in zip((dq, dk, dv), (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype and g.is_contiguous()

    kw = dict(softmax_scale=scale, causal=causal, diag_offset=offset, **features)
    rdt = reference_dtype(dtype, DEVICE)
    ref_in = [leaf(x, rdt) for x in (q, k, v)]
    base_in = [leaf(x, dtype) for x in (q, k, v)]
    ref_out, _ = attention_ref(*ref_in, upcast=False, **kw)
    base_out, _ = attention_ref(*base_in, upcast=False, **kw)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout.to(rdt))
    base_grads = torch.autograd.grad(base_out, base_in, dout)
    for name, g, r, b in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, base_grads):
        assert_close(name, g, r, b, factor=3)
    return dq, dk, dv


# A covering set for the interpreter: T in {1, 17, 63, 128, 257}, D in {8, 16, 40, 64, 72, 96,
# 128, 256}, MHA / GQA 8:2 / MQA, Tq == Tk, Tq < Tk, Tq > Tk (rows with no visible key), both
# causal alignments (diag_offset None = Tk - Tq as flash-attn, 0 as SDPA) and odd offsets.
CASES = [
    (1, 1, 1, 1, 1, 16, False, None),
    (1, 1, 17, 2, 1, 64, True, None),
    (2, 17, 17, 2, 2, 40, True, None),
    (1, 17, 17, 1, 1, 8, True, None),
    (1, 63, 17, 4, 2, 72, True, None),
    (1, 17, 63, 4, 1, 96, True, None),
    (1, 63, 63, 8, 2, 64, False, None),
    (1, 128, 128, 2, 2, 128, True, None),
    (1, 63, 128, 2, 2, 256, True, 0),
    (1, 128, 63, 2, 1, 64, True, 0),
    (1, 17, 40, 2, 2, 40, True, -20),
    (1, 17, 40, 1, 1, 16, True, 100),
    (2, 63, 17, 2, 2, 256, False, None),
    (1, 257, 257, 1, 1, 64, True, None),
]


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bwd(case, dtype):
    check_bwd(*case, DTYPES[dtype])


@pytest.mark.parametrize("case", [(2, 63, 17, 4, 2, 40, True, None), (1, 33, 70, 2, 1, 96, True, 0)],
                         ids=case_id)
def test_bwd_strided(case):
    check_bwd(*case, torch.float16, layout="bhtd", dout_strided=True)


def test_bwd_empty_rows():
    # Tq > Tk, bottom-right: rows 0..30 see no key, so their dq is exactly 0.
    dq, _, _ = check_bwd(1, 40, 9, 2, 1, 32, True, None, torch.float16)
    assert torch.all(dq[:, :31] == 0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bwd_nondefault_config(causal):
    # Unequal tiles in both kernels exercise the masked/unmasked split on both sides.
    cfg = BwdConfig(BLOCK_M1=16, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=16, num_warps=4, num_stages=1)
    check_bwd(1, 50, 77, 2, 1, 40, causal, None, torch.float16, config=cfg)
    cfg = BwdConfig(BLOCK_M1=64, BLOCK_N1=16, BLOCK_M2=16, BLOCK_N2=64, num_warps=4, num_stages=1)
    check_bwd(1, 77, 50, 4, 2, 40, causal, 0, torch.float16, config=cfg)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("case", FEATURE_CASES, ids=feature_id)
def test_bwd_features(case, dtype):
    *base, window, softcap, alibi = case
    check_bwd(*base, DTYPES[dtype], window=window, softcap=softcap, alibi=alibi)


def test_bwd_window_unseen_rows_and_keys():
    # Row i sees keys [i - 46, i - 36]: rows 0..35 and 86..129 see none, so their dq is exactly 0.
    dq, _, _ = check_bwd(1, 130, 40, 2, 1, 32, False, -40, torch.float16, window=(6, 4))
    assert torch.all(dq[:, :36] == 0) and torch.all(dq[:, 86:] == 0)
    # Row i sees keys [i + 80, i + 95]: no row sees keys 0..79 (whole key tiles the dK/dV kernel
    # skips), so their dk and dv are exactly 0.
    _, dk, dv = check_bwd(1, 40, 130, 2, 1, 32, False, None, torch.float16, window=(10, 5))
    assert torch.all(dk[:, :80] == 0) and torch.all(dv[:, :80] == 0)


@pytest.mark.parametrize("window", [(7, -1), (-1, 7), (20, 0)], ids=lambda w: f"win{w[0]}_{w[1]}")
def test_bwd_window_nondefault_config(window):
    # Unequal tiles in both kernels put the band's edges at every position inside a block.
    cfg = BwdConfig(BLOCK_M1=16, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=16, num_warps=4, num_stages=1)
    check_bwd(1, 77, 50, 2, 1, 40, False, None, torch.float16, window=window, config=cfg)
    cfg = BwdConfig(BLOCK_M1=64, BLOCK_N1=16, BLOCK_M2=16, BLOCK_N2=64, num_warps=4, num_stages=1)
    check_bwd(1, 50, 77, 4, 2, 40, False, 0, torch.float16, window=window, config=cfg)


BWD_BRANCHES = [(d, dt, c) for d in (8, 40, 64, 72, 128, 256) for dt in DTYPES for c in (False, True)]


@pytest.mark.parametrize("interpret", [False, True], ids=["compiled", "interpret"])
def test_bwd_config_branches(interpret):
    for D, dtype, causal in BWD_BRANCHES:
        cfg = get_bwd_config(D, DTYPES[dtype], causal, interpret=interpret)
        HEAD_DIM = padded_head_dim(D)
        for block in (cfg.BLOCK_M1, cfg.BLOCK_N1, cfg.BLOCK_M2, cfg.BLOCK_N2):
            assert block >= 16 and block & (block - 1) == 0, cfg
        # dK/dV: K and V held once, Q and dO once per pipeline stage; dQ: the mirror image.
        elem = DTYPES[dtype].itemsize
        stages = max(cfg.num_stages, 1)
        smem1 = (2 * cfg.BLOCK_N1 + 2 * stages * cfg.BLOCK_M1) * HEAD_DIM * elem
        smem2 = (2 * cfg.BLOCK_M2 + 2 * stages * cfg.BLOCK_N2) * HEAD_DIM * elem
        assert max(smem1, smem2) <= SMEM_BYTES, (D, dtype, cfg, smem1, smem2)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_bwd_gpu_configs_run(D, dtype):
    # The configs the GPU will pick, run here too (in the interpreter without a GPU).
    cfg = get_bwd_config(D, DTYPES[dtype], True, interpret=False)
    check_bwd(1, 130, 150, 2, 1, D, True, None, DTYPES[dtype], config=cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_bwd_gpu(case, dtype):
    check_bwd(*case, DTYPES[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_FP32_CASES, ids=case_id)
def test_bwd_gpu_fp32(case):
    check_bwd(*case, torch.float32)


@pytest.mark.gpu
def test_bwd_gpu_strided():
    check_bwd(2, 1000, 1200, 8, 2, 128, True, None, torch.bfloat16, layout="bhtd", dout_strided=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_FEATURE_CASES, ids=feature_id)
def test_bwd_gpu_features(case):
    *base, window, softcap, alibi = case
    check_bwd(*base, torch.bfloat16, window=window, softcap=softcap, alibi=alibi)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [(-1, -1), (200, 0)], ids=["causal", "window"])
def test_bwd_gpu_deterministic(window):
    # deterministic=True promises bitwise-identical gradients: 50 backward passes through the
    # public API on the same inputs must agree bit for bit (a moving result is a race).
    q, k, v = make_qkv(2, 1000, 1000, 8, 2, 128, dtype=torch.bfloat16, device=DEVICE,
                       requires_grad=True)
    dout = torch.randn_like(q)

    def grads():
        out = flash_attn_func(q, k, v, causal=True, window_size=window, deterministic=True)
        return torch.autograd.grad(out, (q, k, v), dout)

    first = grads()
    for _ in range(49):
        for a, b in zip(first, grads()):
            assert torch.equal(a, b)
