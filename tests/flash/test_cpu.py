"""Accuracy of the CPU backend (src/ioattn/flash/cpu.py) against the dense reference.

Every case checks out, lse, dq, dk and dv with the accuracy rule: error vs an fp64 reference at
most 2× (3× for gradients) that of plain PyTorch in the input dtype, on NaN-poisoned outputs.
"""
import math

import pytest
import torch

from ioattn.flash import cpu, cpu_blocked
from ioattn.flash.cpu import flash_bwd_cpu, flash_fwd_cpu
from ioattn.flash.reference import attention_ref, visible_mask
from ioattn.testing import assert_close, make_qkv

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _leaf(x, dtype=None):
    return x.detach().to(dtype or x.dtype).requires_grad_()


def _assert_lse(lse, ref, base):
    # −inf marks rows that see no key: it must sit exactly where the reference has it, and the
    # accuracy rule applies to the finite entries (−inf − −inf would be NaN).
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)), "lse: −inf rows differ"
    finite = torch.isfinite(ref)
    assert_close("lse", lse[finite], ref[finite], base[finite], factor=2)


def _check(B, Tq, Tk, H, Hkv, D, dtype, causal, diag_offset=None, *, scale=None,
           layout="bthd", dout_strided=False, **features):
    # features: window, softcap, alibi_slopes, passed to the backend and to the reference alike
    q, k, v = make_qkv(B, Tq, Tk, H, Hkv, D, dtype=dtype, layout=layout)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    offset = Tk - Tq if diag_offset is None else diag_offset
    if dout_strided:
        # [B, H, T, 2D] storage, every other D-block: neither [B, T, H, D] nor its transpose
        dout = torch.randn(B, H, Tq, 2 * D).to(dtype)[..., :D].transpose(1, 2)
    else:
        dout = torch.randn(B, Tq, H, D).to(dtype)

    out, lse = flash_fwd_cpu(q, k, v, scale, causal, offset, **features)
    dq, dk, dv = flash_bwd_cpu(dout, q, k, v, out, lse, scale, causal, offset, **features)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (B, H, Tq) and lse.dtype == torch.float32
    for g, x in zip((dq, dk, dv), (q, k, v)):
        assert g.shape == x.shape and g.dtype == dtype

    kw = dict(softmax_scale=scale, causal=causal, diag_offset=offset, **features)
    ref_in = [_leaf(x, torch.float64) for x in (q, k, v)]
    base_in = [_leaf(x) for x in (q, k, v)]
    ref_out, ref_lse = attention_ref(*ref_in, upcast=True, **kw)
    base_out, base_lse = attention_ref(*base_in, upcast=False, **kw)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout.double())
    base_grads = torch.autograd.grad(base_out, base_in, dout)

    assert_close("out", out, ref_out, base_out, factor=2)
    _assert_lse(lse, ref_lse, base_lse)
    for name, g, r, b in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, base_grads):
        assert_close(name, g, r, b, factor=3)


def _id(shape, causal):
    B, Tq, Tk, H, Hkv, D = shape
    return f"B{B}-Tq{Tq}-Tk{Tk}-H{H}-Hkv{Hkv}-D{D}-{'causal' if causal else 'full'}"


# A covering set: every T in {1, 17, 63, 128, 257, 1000} and every D in {16, 40, 64, 72, 96,
# 128, 256} appears, with MHA, GQA 8:2, MQA, Tq == Tk, Tq < Tk and Tq > Tk.
SHAPES = [
    (1, 1, 1, 2, 2, 16),
    (2, 17, 17, 4, 4, 40),
    (2, 63, 63, 4, 2, 72),
    (1, 128, 128, 8, 2, 64),
    (1, 257, 257, 4, 1, 96),
    (1, 1000, 1000, 2, 2, 128),
    (1, 128, 128, 2, 2, 256),
    (2, 63, 17, 4, 2, 40),
    (2, 17, 63, 4, 2, 40),
    (1, 1, 257, 8, 2, 64),
    (1, 257, 1, 4, 4, 16),
    (1, 128, 1000, 8, 2, 64),
    (1, 1000, 257, 4, 1, 72),
]
CASES = [(s, c) for s in SHAPES for c in (False, True)]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape,causal", CASES, ids=[_id(*c) for c in CASES])
def test_shapes(shape, causal, dtype):
    _check(*shape, dtype, causal)


# Causal alignments beyond flash-attn's bottom-right one: top-left (0, torch SDPA), negative
# offsets (the first rows see no key), offsets past Tk (every row sees every key), and an offset
# that hides every key from every row.
def _offsets(Tq, Tk):
    return sorted({-(Tq + 3), -5, -1, 0, 3, Tk - Tq, Tk - 2, Tk - 1, Tk, Tk + 7})


OFFSET_CASES = [(Tq, Tk, o) for Tq, Tk in ((17, 63), (63, 17), (40, 40)) for o in _offsets(Tq, Tk)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Tq,Tk,offset", OFFSET_CASES,
                         ids=[f"B2-Tq{a}-Tk{b}-H4-Hkv2-D40-off{o}" for a, b, o in OFFSET_CASES])
def test_diag_offset(Tq, Tk, offset, dtype):
    _check(2, Tq, Tk, 4, 2, 40, dtype, True, offset, scale=0.3)


def test_diag_offset_kept_draw():
    # A draw whose fp32 dq (2.42e-5, magnitude 5.6) crossed 3x plain PyTorch (4.68e-6) plus an
    # absolute 1e-5 floor: the floor is now per unit of the reference's magnitude.
    torch.manual_seed(301716068)
    _check(2, 40, 40, 4, 2, 40, torch.float32, True, 47, scale=0.3)


# Non-contiguous q/k/v ([B, H, T, D] storage) and dout on each code path: one call, padded
# empty rows (Tq > Tk), two merged calls (Tq < Tk).
STRIDED = [(2, 63, 63, 8, 2, 64), (2, 63, 17, 4, 2, 40), (2, 17, 63, 4, 1, 96)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", STRIDED, ids=[_id(s, True)[:-7] for s in STRIDED])
def test_strided(shape, causal, dtype):
    _check(*shape, dtype, causal, layout="bhtd", dout_strided=True)


@pytest.mark.parametrize("Tq,Tk,offset,calls", [
    (64, 64, 0, 1), (17, 63, 46, 2), (63, 17, -46, 1), (17, 63, 200, 1), (17, 63, -17, 0),
], ids=["square", "Tq<Tk", "Tq>Tk", "past-Tk", "no-key"])
def test_kernel_calls(monkeypatch, Tq, Tk, offset, calls):
    # The common square causal case must cost exactly what SDPA costs: one kernel call.
    seen = []
    real = cpu._fwd

    def counting(*args, **kwargs):
        seen.append(args[3:5])
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu, "_fwd", counting)
    q, k, v = make_qkv(1, Tq, Tk, 2, 2, 16, dtype=torch.float32)
    flash_fwd_cpu(q, k, v, 0.25, True, offset)
    assert len(seen) == calls


@pytest.mark.parametrize("upcast", [False, True], ids=["native", "upcast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("Tq,Tk", [(128, 128), (17, 63), (63, 17)], ids=["square", "Tq<Tk", "Tq>Tk"])
def test_forward_precision_branch(monkeypatch, Tq, Tk, dtype, upcast):
    # The choice between the native low-precision forward and the fp32 one depends on the CPU;
    # force each so both are tested on any machine.
    monkeypatch.setattr(cpu, "_upcast_fwd", lambda dt: upcast)
    _check(2, Tq, Tk, 8, 2, 64, dtype, True)


@pytest.mark.parametrize("expand", [False, True], ids=["native", "expanded"])
@pytest.mark.parametrize("Tq,Tk,Hkv", [(63, 63, 2), (17, 63, 1), (63, 17, 2)],
                         ids=["square-GQA", "Tq<Tk-MQA", "Tq>Tk-GQA"])
def test_gqa_backward_branch(monkeypatch, Tq, Tk, Hkv, expand):
    # Whether the backward expands K/V depends on the thread count; force each branch.
    monkeypatch.setattr(cpu, "_expand_kv_bwd", lambda B, H, Hkv: expand)
    _check(2, Tq, Tk, 8, Hkv, 40, torch.bfloat16, True)


# Sliding window, softcap and ALiBi (flash-attn 2.x). Cases: (B, Tq, Tk, H, Hkv, D, causal,
# diag_offset or None for bottom-right, window, softcap, alibi) with alibi "H", "BH" or None.
# Tq = 300 spans three 128-row blocks, so band edges and empty rows fall inside a block.
FEATURE_CASES = [
    (2, 63, 63, 4, 2, 40, False, None, (10, -1), 0.0, None),
    (2, 63, 63, 4, 2, 40, False, None, (-1, 7), 0.0, None),
    (2, 63, 63, 4, 2, 40, False, None, (16, 5), 0.0, None),
    (2, 63, 63, 4, 1, 72, False, None, (0, 0), 0.0, None),
    (2, 63, 63, 4, 2, 40, False, None, (100, 80), 0.0, None),
    (2, 63, 63, 4, 2, 40, True, None, (20, -1), 0.0, None),
    (2, 63, 63, 4, 2, 40, True, None, (5, 3), 0.0, None),
    (1, 300, 300, 4, 2, 64, True, None, (100, -1), 0.0, None),
    (2, 17, 63, 4, 2, 40, False, None, (8, 4), 0.0, None),
    (2, 17, 63, 4, 2, 40, False, 0, (8, 4), 0.0, None),
    (2, 63, 17, 4, 1, 40, True, None, (8, -1), 0.0, None),
    (2, 63, 17, 4, 1, 40, True, 0, (8, -1), 0.0, None),
    # rows before 150 and after 166 see no key; the edges sit inside the second block
    (1, 300, 17, 4, 2, 40, False, -150, (0, 0), 0.0, None),
    (2, 63, 63, 4, 2, 40, False, None, (-1, -1), 5.0, None),
    (2, 17, 63, 4, 1, 72, True, None, (-1, -1), 2.0, None),
    (2, 63, 63, 4, 2, 40, True, None, (-1, -1), 0.0, "H"),
    (2, 63, 17, 4, 2, 40, False, None, (6, 2), 0.0, "BH"),
    (2, 17, 63, 8, 2, 72, True, 0, (12, -1), 0.0, "BH"),
    (1, 300, 300, 4, 1, 40, True, None, (50, -1), 10.0, "H"),
    (2, 63, 63, 4, 2, 40, False, None, (9, 4), 3.0, "BH"),
]


def _feature_id(case):
    B, Tq, Tk, H, Hkv, D, causal, offset, window, softcap, alibi = case
    parts = [f"B{B}-Tq{Tq}-Tk{Tk}-H{H}-Hkv{Hkv}-D{D}", "causal" if causal else "full",
             "br" if offset is None else f"off{offset}", f"w{window[0]}_{window[1]}"]
    if softcap:
        parts.append(f"cap{softcap:g}")
    if alibi:
        parts.append(f"alibi{alibi}")
    return "-".join(parts)


def _slopes(kind, B, H):
    # ALiBi's geometric slopes 2^(−8h/H), per batch too for "BH"
    slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1) / H)
    if kind == "BH":
        return slopes * torch.rand(B, 1).add(0.5)
    return None if kind is None else slopes


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", FEATURE_CASES, ids=[_feature_id(c) for c in FEATURE_CASES])
def test_features(case, dtype):
    B, Tq, Tk, H, Hkv, D, causal, offset, window, softcap, alibi = case
    _check(B, Tq, Tk, H, Hkv, D, dtype, causal, offset, window=window, softcap=softcap,
           alibi_slopes=_slopes(alibi, B, H))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Tq,Tk,offset", OFFSET_CASES,
                         ids=[f"B2-Tq{a}-Tk{b}-H4-Hkv2-D40-off{o}" for a, b, o in OFFSET_CASES])
def test_features_diag_offset(Tq, Tk, offset, dtype):
    # Every alignment of test_diag_offset, with a two-sided window, softcap and ALiBi.
    _check(2, Tq, Tk, 4, 2, 40, dtype, False, offset, scale=0.3, window=(6, 2), softcap=5.0,
           alibi_slopes=_slopes("BH", 2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", STRIDED, ids=[_id(s, True)[:-7] for s in STRIDED])
def test_features_strided(shape, dtype):
    _check(*shape, dtype, True, layout="bhtd", dout_strided=True, window=(9, -1), softcap=5.0)


@pytest.mark.parametrize("window,causal", [((5, 9), False), ((0, 0), False), ((31, -1), True)],
                         ids=["w5_9", "w0_0", "w31-causal"])
def test_features_small_blocks(monkeypatch, window, causal):
    # 16-row blocks: many blocks, each with its own key range, with and without masks.
    monkeypatch.setattr(cpu_blocked, "BLOCK_M", 16)
    _check(2, 100, 90, 4, 2, 40, torch.float32, causal, None, window=window, softcap=4.0,
           alibi_slopes=_slopes("H", 2, 4))


@pytest.mark.parametrize("Tq,Tk,offset", [(300, 300, 0), (100, 300, 200), (300, 100, -200)])
@pytest.mark.parametrize("window", [(0, 0), (40, 3), (-1, 10), (25, -1)], ids=str)
def test_key_range(Tq, Tk, offset, window):
    # Every key a row of the block sees lies in [lo, hi), and [lo, hi) is no wider than the
    # band the block's rows span: the work per block grows with the window, not with T.
    left, right = window
    keep = visible_mask(Tq, Tk, causal=False, diag_offset=offset, window=window)
    for i0 in range(0, Tq, 64):
        i1 = min(i0 + 64, Tq)
        lo, hi = cpu_blocked.key_range(i0, i1, Tk, offset, left, right)
        seen = keep[i0:i1].any(dim=0).nonzero().flatten()
        if len(seen):
            assert lo <= seen.min() and seen.max() < hi
        if left >= 0 and right >= 0:
            assert hi - lo <= i1 - i0 + left + right


def test_block_rows_budget():
    # Blocks shrink when one block's scores would pass the budget, but not below MIN_BLOCK_M.
    assert cpu_blocked.block_rows(1, 8, 2048, 256, 0, 4) == cpu_blocked.BLOCK_M
    assert cpu_blocked.block_rows(8, 32, 8192, -1, -1, 4) < cpu_blocked.BLOCK_M
    assert cpu_blocked.block_rows(64, 64, 1 << 20, -1, 0, 8) == cpu_blocked.MIN_BLOCK_M


@pytest.mark.parametrize("features,calls", [
    (dict(window=(-1, 5)), 2), (dict(window=(100, 100)), 1), (dict(window=(10, -1)), 0),
    (dict(softcap=5.0), 0), (dict(alibi_slopes=torch.ones(2)), 0),
], ids=["right-only", "wider-than-T", "left", "softcap", "alibi"])
def test_feature_routing(monkeypatch, features, calls):
    # Only a left bound, softcap or ALiBi leave torch's kernel: a right bound alone is causal
    # at a shifted offset, and a bound past every key is no bound.
    seen = []
    real = cpu._fwd
    monkeypatch.setattr(cpu, "_fwd", lambda *a, **kw: seen.append(1) or real(*a, **kw))
    q, k, v = make_qkv(1, 40, 60, 2, 2, 16, dtype=torch.float32)
    flash_fwd_cpu(q, k, v, 0.25, False, 20, **features)
    assert len(seen) == calls


def test_blocked_keeps_inputs():
    # The blocked path scales rows of q; it must never do so in place (fp32, MHA: views).
    q, k, v = make_qkv(1, 40, 40, 2, 2, 16, dtype=torch.float32)
    dout = torch.randn_like(q)
    saved = [x.clone() for x in (q, k, v, dout)]
    out, lse = flash_fwd_cpu(q, k, v, 0.25, True, 0, window=(4, -1), softcap=3.0)
    flash_bwd_cpu(dout, q, k, v, out, lse, 0.25, True, 0, window=(4, -1), softcap=3.0)
    assert all(torch.equal(x, y) for x, y in zip((q, k, v, dout), saved))


def test_features_fp64():
    # fp64 runs in fp64 throughout (lse too, as on torch's kernel path): near-exact gradients.
    q, k, v = make_qkv(2, 70, 90, 4, 2, 24, dtype=torch.float64)
    dout = torch.randn(2, 70, 4, 24, dtype=torch.float64)
    kw = dict(window=(12, 3), softcap=4.0, alibi_slopes=_slopes("BH", 2, 4))
    out, lse = flash_fwd_cpu(q, k, v, 0.2, False, 20, **kw)
    grads = flash_bwd_cpu(dout, q, k, v, out, lse, 0.2, False, 20, **kw)
    ref_in = [_leaf(x) for x in (q, k, v)]
    ref_out, _ = attention_ref(*ref_in, softmax_scale=0.2, diag_offset=20, **kw)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout)
    for x, r in zip((out, *grads), (ref_out, *ref_grads)):
        torch.testing.assert_close(x, r, rtol=1e-10, atol=1e-10)
