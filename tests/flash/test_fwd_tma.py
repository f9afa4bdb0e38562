"""Accuracy of the Hopper TMA forward (src/ioattn/flash/fwd_tma.py), when it applies, and the
switch that dispatches to it.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (which implements tensor
descriptors, zero-filling out of bounds per dimension), in fp16 and fp32 (bf16 dots are not
exact there); the `gpu` tests run it compiled in bf16/fp16 on the H200. Outputs are NaN-poisoned
(conftest), so a tile the TMA store skipped fails.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

import ioattn
from ioattn.flash import fwd_tma
from ioattn.flash.config import TmaFwdConfig, get_tma_fwd_config
from ioattn.flash.fwd_tma import flash_fwd_tma, tma_supported
from ioattn.flash.tma import TMA_HEAD_DIMS, TensorDescriptor, head_major_desc
from ioattn.testing import make_qkv

from tests.compile_child import child_report

from . import cases
from .cases import DEVICE, DTYPES, SMEM_BYTES, case_id
from .test_fwd import check_fwd


def tma_fwd(q, k, v, scale, causal, offset, *, config=None, window, softcap, alibi_slopes):
    """flash_fwd_tma behind check_fwd's launcher signature (it has none of the features)."""
    assert tuple(window) == (-1, -1) and not softcap and alibi_slopes is None
    return flash_fwd_tma(q, k, v, scale, causal, offset, config=config)


def check_tma(*case, **kw):
    return check_fwd(*case, fwd=tma_fwd, **kw)


# Odd lengths (partial first and last tiles), Tq < Tk and Tq > Tk with both causal alignments
# (bottom-right leaves rows that see no key when Tq > Tk; offset -20 hides whole tiles), GQA 4:2
# and MQA, D 16..64.
CASES = [
    (1, 37, 37, 2, 2, 64, False, None),
    (2, 37, 45, 4, 2, 64, True, None),
    (1, 45, 37, 4, 1, 32, True, None),
    (1, 45, 37, 2, 2, 16, True, 0),
    (1, 37, 45, 2, 1, 16, True, 0),
    (1, 45, 70, 2, 1, 32, True, -20),
    (2, 45, 37, 2, 1, 32, False, None),
]


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fwd_tma(case, dtype):
    check_tma(*case, DTYPES[dtype])


def test_fwd_tma_empty_rows_are_zero():
    out, lse = check_tma(1, 45, 9, 2, 1, 32, True, None, torch.float16)
    assert torch.all(out[:, :36] == 0) and torch.all(torch.isneginf(lse[:, :, :36]))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fwd_tma_nondefault_config(causal):
    # Unequal tiles put the diagonal at every position inside a block; warp_specialize is only
    # a compiler hint, which the interpreter ignores, but the launcher must pass it through.
    check_tma(1, 50, 77, 2, 1, 32, causal, None, torch.float16, config=TmaFwdConfig(16, 64, 4, 2))
    check_tma(1, 77, 50, 2, 1, 32, causal, 0, torch.float16, config=TmaFwdConfig(64, 16, 4, 1, True))


def packed_qkv(B, T, H, D, dtype):
    """q, k, v as views of one ``[B, T, 3, H, D]`` buffer: strides 3·H·D, k and v offset by
    H·D elements (16-byte aligned when H·D·2 bytes is)."""
    qkv = torch.randn(B, T, 3, H, D, device=DEVICE).to(dtype)
    return qkv.unbind(2)


def test_fwd_tma_strided():
    q, k, v = packed_qkv(2, 37, 2, 64, torch.float16)
    assert not q.is_contiguous() and tma_supported(q, k, v, 0.125)
    check_tma(2, 37, 37, 2, 2, 64, True, None, torch.float16, qkv=(q, k, v))
    check_tma(1, 45, 37, 4, 2, 32, True, None, torch.float16, layout="bhtd")


@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
def test_head_major_desc_matches_checked_constructor(layout):
    # head_major_desc fills the descriptor in without the constructor's checks: it must equal the
    # checked one field by field (a field added to TensorDescriptor would show up here).
    q, _, _ = make_qkv(2, 37, 45, 4, 2, 64, dtype=torch.float16, device=DEVICE, layout=layout)
    checked = TensorDescriptor.from_tensor(q.transpose(1, 2), [1, 1, 32, 64])
    fast = head_major_desc(q, 32)
    cases.assert_same_descriptor(fast, checked, TensorDescriptor)
    assert list(fast.shape) == [2, 4, 37, 64]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_tma_supported(dtype, monkeypatch):
    dt = DTYPES[dtype]
    q, k, v = make_qkv(1, 20, 30, 4, 2, 64, dtype=dt, device=DEVICE)
    assert tma_supported(q, k, v, 0.125)
    assert tma_supported(*make_qkv(1, 20, 30, 2, 1, 128, dtype=dt, device=DEVICE, layout="bhtd"), 0.1)
    # Features the kernel does not have, and unknown ones (dropout) run the portable kernel.
    for features in (dict(window=(8, -1)), dict(window=(-1, 0)), dict(softcap=5.0),
                     dict(alibi_slopes=torch.ones(4, device=DEVICE)),
                     dict(attn_mask=torch.ones(1, 4, 20, 30, dtype=torch.bool, device=DEVICE)),
                     dict(dropout_p=0.1)):
        assert not tma_supported(q, k, v, 0.125, **features), features
    assert not tma_supported(q, k, v, 0.0) and not tma_supported(q, k, v, -0.125)
    for D in (40, 96, 32):
        assert D not in TMA_HEAD_DIMS and not tma_supported(*make_qkv(1, 8, 8, 2, 2, D, dtype=dt, device=DEVICE), 0.1)
    assert not tma_supported(q.float(), k.float(), v.float(), 0.125)
    assert not tma_supported(q, k.half() if dt == torch.bfloat16 else k.bfloat16(), v, 0.125)
    # TMA alignment: a base 2 bytes off, a row stride of 65 elements, a non-contiguous last dim.
    flat = torch.randn(1 + 20 * 4 * 64, device=DEVICE).to(dt)
    assert not tma_supported(flat[1:].view(1, 20, 4, 64), k, v, 0.125)
    wide = torch.randn(1, 20, 4, 65, device=DEVICE).to(dt)[..., :64]
    assert not tma_supported(wide, k, v, 0.125)
    assert not tma_supported(q, k, v.transpose(1, 3).contiguous().transpose(1, 3), 0.125)
    if not q.is_cuda:
        # CPU tensors only in the interpreter.
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not tma_supported(q, k, v, 0.125)


def test_dispatch_switch(monkeypatch):
    """Covered calls run the TMA kernel by default; with IOATTN_TMA=0 or a feature on, the
    portable kernel runs."""
    calls = []
    real = fwd_tma.flash_fwd_tma

    def spy(*args, **kw):
        calls.append(args[3:6])
        return real(*args, **kw)

    monkeypatch.setattr(fwd_tma, "flash_fwd_tma", spy)
    monkeypatch.setenv("IOATTN_BACKEND", "triton")
    monkeypatch.setenv("IOATTN_TMA", "0")
    q, k, v = make_qkv(1, 33, 40, 2, 1, 64, device=DEVICE)
    base = ioattn.flash_attn_func(q, k, v, causal=True)
    assert calls == []
    monkeypatch.delenv("IOATTN_TMA")
    out = ioattn.flash_attn_func(q, k, v, causal=True)
    assert calls == [(1 / 8, True, 7)]
    want, _ = real(q, k, v, 1 / 8, True, 7)
    assert torch.equal(out, want)
    assert (out.float() - base.float()).abs().max() < 1e-2
    ioattn.flash_attn_func(q, k, v, causal=True, softcap=5.0)
    ioattn.flash_attn_func(q, k, v, causal=True, dropout_p=0.1)
    assert len(calls) == 1


@pytest.mark.parametrize("interpret", [False, True], ids=["compiled", "interpret"])
def test_tma_config_branches(interpret):
    for D in (16, 32) + TMA_HEAD_DIMS:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for causal in (False, True):
                for seqlen in (0, 1024, 16384):
                    cfg = get_tma_fwd_config(D, dtype, causal, interpret=interpret, seqlen=seqlen)
                    for block in (cfg.BLOCK_M, cfg.BLOCK_N):
                        assert 16 <= block <= 256 and block & (block - 1) == 0, cfg
                    # Q once, K and V once per stage.
                    smem = (cfg.BLOCK_M + 2 * max(cfg.num_stages, 1) * cfg.BLOCK_N) * D * dtype.itemsize
                    assert smem <= SMEM_BYTES, (D, cfg, smem)


@pytest.mark.parametrize("seqlen", [1024, 0], ids=["short", "long"])
@pytest.mark.parametrize("D", TMA_HEAD_DIMS)
def test_fwd_tma_gpu_configs_run(D, seqlen):
    # The tiles the GPU will pick for short and long sequences, run here too (in the
    # interpreter without a GPU).
    for causal in (False, True):
        cfg = get_tma_fwd_config(D, torch.float16, causal, interpret=False, seqlen=seqlen)
        check_tma(1, 130, 150, 1, 1, D, causal, None, torch.float16, config=cfg)


def test_fwd_tma_table_configs_compile():
    # The table's Triton TMA configs compile for sm_90a without spilling (no GPU needed).
    report = child_report("tests.flash.tma_ptxas")
    assert len(report) == 8 and all(r["spills"] == 0 for r in report.values()), report


# The portable kernel's GPU cases that the TMA kernel covers, and full attention at D 128 and 256.
GPU_CASES = [c for c in cases.GPU_CASES if c[5] in TMA_HEAD_DIMS] + [
    (2, 777, 900, 8, 2, 128, False, None),
    (2, 777, 777, 4, 4, 256, False, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_fwd_tma_gpu(case, dtype):
    check_tma(*case, DTYPES[dtype])


@pytest.mark.gpu
def test_fwd_tma_gpu_strided():
    check_tma(2, 1000, 1000, 8, 8, 128, True, None, torch.bfloat16, qkv=packed_qkv(2, 1000, 8, 128, torch.bfloat16))
    check_tma(2, 1000, 1200, 8, 2, 64, True, None, torch.bfloat16, layout="bhtd")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("D", TMA_HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fwd_tma_gpu_sweep_configs(D, causal):
    # Every candidate of the sweep that compiles must also pass the accuracy rule, at an odd
    # shape with Tq != Tk and GQA (the sweep compares with the portable kernel on the paper grid).
    path = Path(__file__).parents[2] / "benchmarks" / "sweep_fwd_tma.py"
    spec = importlib.util.spec_from_file_location("sweep_fwd_tma", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    for cfg in sweep.candidates(D):
        try:
            check_tma(1, 1000, 1100, 4, 2, D, causal, None, torch.bfloat16, config=cfg)
        except AssertionError:
            raise
        except Exception as e:  # does not compile or fit: the sweep reports these too
            print(f"{cfg}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}")
