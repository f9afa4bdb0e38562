"""Accuracy of the Triton forward (src/ioattn/flash/fwd.py) against the dense reference.

Without a GPU these run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET);
with one they run compiled. Every case checks out and lse with the accuracy rule: error vs a
high-precision reference at most 2× that of plain PyTorch in the input dtype, on NaN-poisoned outputs.
"""
import math

import pytest
import torch

from ioattn.flash.config import FwdConfig, get_fwd_config, padded_head_dim
from ioattn.flash.fwd import flash_fwd_triton
from ioattn.flash.reference import attention_ref
from ioattn.testing import assert_close, make_qkv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Shared memory a Hopper block may use (H100/H200: 227 KB).
SMEM_BYTES = 227 * 1024


def case_id(case):
    B, Tq, Tk, H, Hkv, D, causal, diag_offset = case
    mode = "causal" if causal else "full"
    if causal and diag_offset is not None:
        mode += f"-diag{diag_offset}"
    return f"B{B}-Tq{Tq}-Tk{Tk}-H{H}-Hkv{Hkv}-D{D}-{mode}"


def reference_dtype(dtype, device):
    # fp32 inputs need a finer reference than themselves; attention_ref's upcast gives fp32 on GPU.
    return torch.float64 if dtype == torch.float32 or device == "cpu" else torch.float32


def assert_lse(lse, ref, base):
    # -inf marks rows that see no key: it must sit exactly where the reference has it, and the
    # accuracy rule applies to the finite entries (-inf - -inf would be NaN).
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)), "lse: -inf rows differ"
    finite = torch.isfinite(ref)
    assert_close("lse", lse[finite], ref[finite], base[finite], factor=2)


def check_fwd(B, Tq, Tk, H, Hkv, D, causal, diag_offset, dtype, *, layout="bthd", config=None):
    q, k, v = make_qkv(B, Tq, Tk, H, Hkv, D, dtype=dtype, device=DEVICE, layout=layout)
    scale = 1.0 / math.sqrt(D)
    offset = Tk - Tq if diag_offset is None else diag_offset
    out, lse = flash_fwd_triton(q, k, v, scale, causal, offset, config=config)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (B, H, Tq) and lse.dtype == torch.float32 and lse.is_contiguous()

    kw = dict(softmax_scale=scale, causal=causal, diag_offset=offset)
    rdt = reference_dtype(dtype, DEVICE)
    ref_out, ref_lse = attention_ref(q.to(rdt), k.to(rdt), v.to(rdt), upcast=False, **kw)
    base_out, base_lse = attention_ref(q, k, v, upcast=False, **kw)
    assert_close("out", out, ref_out, base_out, factor=2)
    assert_lse(lse, ref_lse, base_lse)
    return out, lse


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
def test_fwd(case, dtype):
    check_fwd(*case, DTYPES[dtype])


@pytest.mark.parametrize("case", [(2, 63, 17, 4, 2, 40, True, None), (1, 33, 70, 2, 1, 96, True, 0)],
                         ids=case_id)
def test_fwd_strided(case):
    check_fwd(*case, torch.float16, layout="bhtd")


def test_fwd_empty_rows_are_zero():
    # Tq > Tk, bottom-right: rows 0..Tq-Tk-1 see no key and must be exactly (0, -inf).
    out, lse = check_fwd(1, 40, 9, 2, 1, 32, True, None, torch.float16)
    assert torch.all(out[:, :31] == 0) and torch.all(torch.isneginf(lse[:, :, :31]))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fwd_nondefault_config(causal):
    # Tall-and-narrow tiles (BLOCK_M != BLOCK_N) exercise the split of masked and unmasked blocks.
    check_fwd(1, 50, 77, 2, 1, 40, causal, None, torch.float16, config=FwdConfig(16, 64, 4, 1))
    check_fwd(1, 77, 50, 2, 1, 40, causal, 0, torch.float16, config=FwdConfig(64, 16, 4, 1))


FWD_BRANCHES = [(d, dt, c) for d in (8, 40, 64, 72, 128, 256) for dt in DTYPES for c in (False, True)]


@pytest.mark.parametrize("interpret", [False, True], ids=["compiled", "interpret"])
def test_fwd_config_branches(interpret):
    for D, dtype, causal in FWD_BRANCHES:
        cfg = get_fwd_config(D, DTYPES[dtype], causal, interpret=interpret)
        HEAD_DIM = padded_head_dim(D)
        for block in (cfg.BLOCK_M, cfg.BLOCK_N):
            assert block >= 16 and block & (block - 1) == 0, cfg
        # Q tile once, K and V tiles once per pipeline stage.
        elem = DTYPES[dtype].itemsize
        smem = (cfg.BLOCK_M + 2 * max(cfg.num_stages, 1) * cfg.BLOCK_N) * HEAD_DIM * elem
        assert smem <= SMEM_BYTES, (D, dtype, cfg, smem)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_fwd_gpu_configs_run(D, dtype):
    # The configs the GPU will pick, run here too (in the interpreter without a GPU).
    cfg = get_fwd_config(D, DTYPES[dtype], True, interpret=False)
    check_fwd(1, 130, 150, 1, 1, D, True, None, DTYPES[dtype], config=cfg)


GPU_CASES = [
    (2, 1000, 1000, 8, 2, 64, True, None),
    (1, 4096, 4096, 8, 8, 128, True, None),
    (1, 4096, 4096, 4, 1, 64, False, None),
    (2, 1000, 1500, 8, 8, 128, True, 0),
    (1, 2048, 512, 8, 1, 128, True, None),
    (2, 777, 777, 4, 4, 96, False, None),
    (2, 1024, 1024, 4, 2, 256, True, None),
    (1, 1000, 3000, 4, 4, 40, True, None),
    (1, 3000, 1000, 4, 4, 72, True, 0),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_fwd_gpu(case, dtype):
    check_fwd(*case, DTYPES[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(1, 700, 900, 4, 2, 64, True, None), (1, 513, 513, 2, 2, 128, False, None),
                                  (1, 300, 300, 2, 1, 256, True, 0)], ids=case_id)
def test_fwd_gpu_fp32(case):
    check_fwd(*case, torch.float32)


@pytest.mark.gpu
def test_fwd_gpu_strided():
    check_fwd(2, 1000, 1200, 8, 2, 128, True, None, torch.bfloat16, layout="bhtd")
