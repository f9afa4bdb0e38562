"""The Hopper TMA backward (src/ioattn/flash/bwd_tma.py): accuracy against the dense reference and
agreement with the portable backward, when it applies, and how the dispatch picks it.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (which reads the 4D tensor
descriptors with their per-dimension bounds); the `gpu` tests run them compiled on the H200.
"""
import dataclasses
import itertools

import pytest
import torch

from ioattn import flash_attn_func
from ioattn.flash import dispatch
from ioattn.flash.bwd import flash_bwd_triton
from ioattn.flash import bwd_tma
from ioattn.flash.bwd_tma import flash_bwd_tma, tma_bwd_supported
from ioattn.flash.config import TmaBwdConfig, get_tma_bwd_config
from ioattn.flash.reference import attention_ref
from ioattn.testing import assert_attention_close, make_qkv

from .cases import DEVICE, DTYPES, SMEM_BYTES, case_id
from .test_bwd import check_bwd


def versus_portable(launcher):
    """flash_bwd_triton's signature for check_bwd: ``launcher`` (a Hopper backward, every feature
    off), also checked against the portable backward on the same inputs (same math, so they agree
    to rounding)."""
    def bwd(dout, q, k, v, out, lse, scale, causal, offset, *, config=None, window, softcap, alibi_slopes):
        assert tuple(window) == (-1, -1) and not softcap and alibi_slopes is None
        got = launcher(dout, q, k, v, out, lse, scale, causal, offset, config=config)
        portable = flash_bwd_triton(dout, q, k, v, out, lse, scale, causal, offset)
        # fp32 dots are exact in both; fp16 gradients are rounded once at the end, after sums
        # whose order differs with the tiles.
        tol = 1e-5 if q.dtype == torch.float32 else 2e-2
        for name, a, b in zip(("dq", "dk", "dv"), got, portable):
            diff = float((a.float() - b.float()).abs().max())
            assert diff <= tol * float(b.float().abs().max()) + 1e-6, f"{name}: differs from portable by {diff:.2e}"
        return got

    return bwd


tma_vs_portable = versus_portable(flash_bwd_tma)


# (B, Tq, Tk, H, Hkv, D, causal, diag_offset): odd T, Tq > Tk with rows that see no key, Tq < Tk,
# both causal alignments, MHA, GQA 4:2 and MQA.
CASES = [
    (1, 37, 37, 2, 2, 64, True, None),
    (2, 45, 37, 4, 2, 64, True, None),
    (1, 37, 45, 4, 1, 64, True, 0),
    (1, 45, 37, 4, 1, 32, True, 0),
    (2, 37, 45, 4, 2, 32, False, None),
    (1, 45, 45, 2, 1, 64, False, None),
]


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bwd_tma(case, dtype):
    check_bwd(*case, DTYPES[dtype], bwd=tma_vs_portable)


def test_bwd_tma_strided():
    # q, k, v views of [B, H, T, D] storage and a dout that is every other D-block of a wider
    # tensor: the descriptors take their strides as they are.
    check_bwd(2, 37, 45, 4, 2, 64, True, None, torch.float16, layout="bhtd", dout_strided=True,
              bwd=tma_vs_portable)


def test_bwd_tma_empty_rows():
    # Tq > Tk, bottom-right: rows 0..34 see no key, so their dq is exactly 0.
    dq, _, _ = check_bwd(1, 45, 10, 2, 1, 32, True, None, torch.float16, bwd=tma_vs_portable)
    assert torch.all(dq[:, :35] == 0)


@pytest.mark.parametrize("device_desc", [False, True], ids=["host-desc", "device-desc"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bwd_tma_tiles(causal, device_desc):
    # Each pass's M larger than its N and the reverse, so the diagonal crosses blocks at every
    # position in both; the dK/dV pass with either kind of descriptor.
    cfg = TmaBwdConfig(BLOCK_M1=32, BLOCK_N1=16, warps1=4, stages1=1, BLOCK_M2=16, BLOCK_N2=32, warps2=4, stages2=1,
                       device_desc1=device_desc)
    check_bwd(1, 45, 37, 4, 2, 32, causal, None, torch.float16, config=cfg, bwd=tma_vs_portable)
    check_bwd(1, 37, 45, 2, 1, 32, causal, 0, torch.float16, config=cfg, bwd=tma_vs_portable)


def test_bwd_tma_device_desc_strided():
    # Per-head descriptors made in the kernel from [B, H, T, D] storage: their own strides.
    cfg = dataclasses.replace(get_tma_bwd_config(64, torch.float16, True, interpret=True), device_desc1=True)
    check_bwd(2, 37, 45, 4, 2, 64, True, None, torch.float16, layout="bhtd", dout_strided=True, config=cfg,
              bwd=tma_vs_portable)


@pytest.mark.parametrize("seqlen", [1024, 0], ids=["short", "long"])
@pytest.mark.parametrize("D", [64, 128])
def test_bwd_tma_gpu_configs_run(D, seqlen):
    # The configs the GPU will pick for short and long sequences, run here too on a shape
    # shorter than a tile.
    cfg = get_tma_bwd_config(D, torch.float16, True, interpret=False, seqlen=seqlen)
    check_bwd(1, 45, 37, 2, 1, D, True, None, torch.float16, config=cfg, bwd=tma_vs_portable)


BRANCHES = [(D, dt, c) for D in (64, 128, 256) for dt in ("fp16", "bf16") for c in (False, True)]


@pytest.mark.parametrize("interpret", [False, True], ids=["compiled", "interpret"])
def test_tma_bwd_config_branches(interpret):
    for (D, dtype, causal), seqlen in itertools.product(BRANCHES, (0, 1024, 16384)):
        cfg = get_tma_bwd_config(D, DTYPES[dtype], causal, interpret=interpret, seqlen=seqlen)
        for block in (cfg.BLOCK_M1, cfg.BLOCK_N1, cfg.BLOCK_M2, cfg.BLOCK_N2):
            assert block >= 16 and block & (block - 1) == 0, cfg
        # dK/dV: K and V once, Q and dO per stage; dQ: Q and dO once, K and V per stage.
        smem1 = (2 * cfg.BLOCK_N1 + 2 * cfg.stages1 * cfg.BLOCK_M1) * D * 2
        smem2 = (2 * cfg.BLOCK_M2 + 2 * cfg.stages2 * cfg.BLOCK_N2) * D * 2
        assert max(smem1, smem2) <= SMEM_BYTES, (D, dtype, cfg)


def _inputs(D=64, dtype=torch.float16):
    return make_qkv(1, 37, 45, 4, 2, D, dtype=dtype, device=DEVICE)


def test_tma_bwd_supported():
    q, k, v = _inputs()
    assert tma_bwd_supported(q, k, v)
    # Every feature off, and only those it knows to be off.
    for feature in (dict(window=(8, -1)), dict(window=(-1, 0)), dict(softcap=5.0),
                    dict(alibi_slopes=torch.ones(4)), dict(attn_mask=torch.ones(1, 4, 37, 45, dtype=torch.bool)),
                    dict(dropout_p=0.1), dict(varlen=True), dict(some_new_feature=1)):
        assert not tma_bwd_supported(q, k, v, **feature), feature
    assert tma_bwd_supported(q, k, v, some_new_feature=None)
    # A dropout seed without dropout changes nothing.
    assert tma_bwd_supported(q, k, v, dropout_p=0.0, seed=1234)
    assert not tma_bwd_supported(q, k, v, dropout_p=0.1, seed=1234)
    # fp16/bf16 and D in (64, 128, 256) only.
    assert not tma_bwd_supported(*_inputs(dtype=torch.float32))
    assert not tma_bwd_supported(*_inputs(D=40))
    assert not tma_bwd_supported(*_inputs(D=32))


def test_tma_bwd_supported_alignment():
    q, k, v = _inputs()
    # A base 2 bytes past an aligned one.
    q_shifted = torch.randn(q.numel() + 1, dtype=q.dtype, device=q.device)[1:].view(q.shape)
    assert not tma_bwd_supported(q_shifted, k, v)
    # A head stride of 65 elements (130 bytes) is not a multiple of 16 bytes.
    k_odd = torch.randn(1, 45, 2, 65, dtype=k.dtype, device=k.device)[..., :64]
    assert not tma_bwd_supported(q, k_odd, v)
    # Last dim not contiguous.
    v_t = torch.randn(1, 45, 64, 2, dtype=v.dtype, device=v.device).transpose(2, 3)
    assert not tma_bwd_supported(q, k, v_t)
    # Any other strides that are 16-byte multiples are fine ([B, H, T, D] storage).
    q_bhtd, k_bhtd, v_bhtd = make_qkv(1, 37, 45, 4, 2, 64, dtype=torch.float16, device=DEVICE, layout="bhtd")
    assert tma_bwd_supported(q_bhtd, k_bhtd, v_bhtd)


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter rule is for CPU tensors")
def test_tma_bwd_supported_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not tma_bwd_supported(*_inputs())


def _spy_tma_bwd(monkeypatch):
    """Record each call of the TMA backward launcher that the dispatch makes."""
    calls = []
    real = bwd_tma.flash_bwd_tma

    def spy(*args, **kw):
        calls.append(args[6:9])
        return real(*args, **kw)

    monkeypatch.setattr(bwd_tma, "flash_bwd_tma", spy)
    return calls


def _dispatched_bwd(q, k, v, dout, **features):
    """Forward then backward through dispatch.kernels_for, as the custom ops call them."""
    fwd, bwd = dispatch.kernels_for(q.device)
    out, lse = fwd(q, k, v, 0.125, True, 8, **features)
    return bwd(dout, q, k, v, out, lse, 0.125, True, 8, **features)


def test_dispatch_switch(monkeypatch):
    # On by default, the covered calls go to the TMA backward; with IOATTN_TMA=0 or a feature on
    # (softcap, dropout) the portable backward runs, bit for bit as when called directly.
    calls = _spy_tma_bwd(monkeypatch)
    monkeypatch.setenv("IOATTN_BACKEND", "triton")
    monkeypatch.setenv("IOATTN_TMA", "0")
    q, k, v = _inputs()
    dout = torch.randn_like(q)
    features = dict(window=(-1, -1), softcap=0.0, alibi_slopes=None, attn_mask=None, dropout_p=0.0, seed=0)
    base = _dispatched_bwd(q, k, v, dout, **features)
    assert calls == []
    monkeypatch.delenv("IOATTN_TMA")
    got = _dispatched_bwd(q, k, v, dout, **features)
    assert calls == [(0.125, True, 8)]
    for a, b in zip(got, base):
        assert (a.float() - b.float()).abs().max() < 1e-2
    for on in (dict(softcap=5.0), dict(dropout_p=0.2, seed=1 << 62)):
        got = _dispatched_bwd(q, k, v, dout, **{**features, **on})
        from ioattn.flash.fwd import flash_fwd_triton

        out, lse = flash_fwd_triton(q, k, v, 0.125, True, 8, **{**features, **on})
        want = flash_bwd_triton(dout, q, k, v, out, lse, 0.125, True, 8, **{**features, **on})
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert len(calls) == 1


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attn_func_with_tma(monkeypatch, causal):
    # The public function with the TMA kernels (IOATTN_TMA=1, the default): forward and backward through the ops, dK/dV summed
    # over the GQA group, against the reference.
    monkeypatch.setenv("IOATTN_BACKEND", "triton")
    monkeypatch.setenv("IOATTN_TMA", "1")
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    q, k, v = make_qkv(2, 45, 37, 4, 2, 64, dtype=dtype, device=DEVICE, requires_grad=True)
    assert tma_bwd_supported(q, k, v)
    dout = torch.randn_like(q)
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, ref_lse = attention_ref(q, k, v, causal=causal)
    base, base_lse = attention_ref(q, k, v, upcast=False, causal=causal)
    assert_attention_close(out, lse, grads, ref, ref_lse, base, base_lse, (q, k, v), dout)


GPU_CASES = [
    (2, 1000, 1000, 8, 2, 64, True, None),
    (2, 1000, 1000, 8, 8, 64, False, None),
    (1, 2048, 1500, 8, 2, 128, True, None),
    (2, 777, 1200, 8, 1, 128, False, 0),
    (1, 1024, 1024, 4, 2, 256, True, None),
    (1, 700, 900, 4, 4, 256, False, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_bwd_tma_gpu(case):
    q, k, v = make_qkv(*case[:6], dtype=torch.bfloat16, device=DEVICE)
    assert tma_bwd_supported(q, k, v), "the H200 should take the TMA path"
    check_bwd(*case, torch.bfloat16, bwd=tma_vs_portable)


@pytest.mark.gpu
def test_bwd_tma_gpu_deterministic():
    # No atomics: repeated runs on the same inputs agree bit for bit.
    q, k, v = make_qkv(2, 1000, 1000, 8, 2, 128, dtype=torch.bfloat16, device=DEVICE)
    dout = torch.randn_like(q)
    from ioattn.flash.fwd import flash_fwd_triton

    out, lse = flash_fwd_triton(q, k, v, 128**-0.5, True, 0)
    first = flash_bwd_tma(dout, q, k, v, out, lse, 128**-0.5, True, 0)
    for _ in range(10):
        for a, b in zip(first, flash_bwd_tma(dout, q, k, v, out, lse, 128**-0.5, True, 0)):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128, 256])
def test_bwd_tma_gpu_device_desc(D):
    # The dK/dV pass with per-head descriptors made on the GPU (needs Triton's scratch allocator).
    cfg = dataclasses.replace(get_tma_bwd_config(D, torch.bfloat16, True, interpret=False), device_desc1=True)
    check_bwd(2, 1000, 1100, 8, 2, D, True, None, torch.bfloat16, config=cfg, bwd=tma_vs_portable)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128, 256])
def test_bwd_tma_gpu_every_config_field(D):
    # Each pass's own warps and stages reach its launch: a config that differs from the default
    # in the dQ pass only still gives the same gradients.
    cfg = get_tma_bwd_config(D, torch.bfloat16, True, interpret=False)
    other = dataclasses.replace(cfg, warps2=4, stages2=2, BLOCK_M2=64)
    check_bwd(1, 1000, 1000, 4, 2, D, True, None, torch.bfloat16, config=other, bwd=tma_vs_portable)
