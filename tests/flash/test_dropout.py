"""Dropout: the Triton kernels' mask (src/ioattn/flash/dropout.py), the CPU backend's
(cpu_blocked.keep_mask) and ``dropout_p`` through the public functions.

ioattn.testing.dropout_mask reproduces a backend's keep mask densely; with it the dense reference
gives the exact expected out, lse and gradients, checked with the accuracy rule on the Triton
kernels (in the interpreter without a GPU, fp16/fp32) and on the CPU backend (fp32/bf16/fp16).
Then the mask's statistics, unbiasedness, reproducibility from torch.manual_seed, and each
public entry point (varlen's dropout test lives in test_varlen.py).
"""
import math

import pytest
import torch

from ioattn import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                    scaled_dot_product_attention)
from ioattn.flash import cpu_blocked
from ioattn.flash.bwd import flash_bwd_triton
from ioattn.flash.config import BwdConfig
from ioattn.flash.cpu import flash_bwd_cpu, flash_fwd_cpu
from ioattn.flash.fwd import flash_fwd_triton
from ioattn.flash.ops import draw_seed
from ioattn.flash.reference import attention_ref
from ioattn.testing import assert_attention_close, dropout_mask, make_qkv

from .cases import DEVICE

TRITON = "triton" if DEVICE == "cuda" else "triton-interpreter"
LAUNCHERS = {"cpu": (flash_fwd_cpu, flash_bwd_cpu), TRITON: (flash_fwd_triton, flash_bwd_triton)}


def _slopes(alibi, B, H, device):
    if alibi is None:
        return None
    return (torch.rand((H,) if alibi == "H" else (B, H), device=device) * 0.5 + 2**-8).float()


def check_dropout(backend, B, Tq, Tk, H, Hkv, D, dtype, *, causal=False, diag_offset=None, p=0.17,
                  window=(-1, -1), softcap=0.0, alibi=None, config=None):
    """A backend's forward and backward with dropout against the reference given its mask."""
    device = "cpu" if backend == "cpu" else DEVICE
    q, k, v = make_qkv(B, Tq, Tk, H, Hkv, D, dtype=dtype, device=device, requires_grad=True)
    dout = torch.randn_like(q)
    offset = Tk - Tq if diag_offset is None else diag_offset
    scale = 1.0 / math.sqrt(D)
    slopes = _slopes(alibi, B, H, device)
    seed = int(draw_seed(p))
    kw = dict(window=window, softcap=softcap, alibi_slopes=slopes, dropout_p=p, seed=seed)
    fwd, bwd = LAUNCHERS[backend]
    extra = {} if config is None else dict(config=config)
    with torch.no_grad():
        out, lse = fwd(q, k, v, scale, causal, offset, **kw)
        grads = bwd(dout, q, k, v, out, lse, scale, causal, offset, **kw, **extra)

    keep = dropout_mask(seed, B, H, Tq, Tk, p, backend=backend, device=device)
    ref_kw = dict(softmax_scale=scale, causal=causal, diag_offset=offset, window=window,
                  softcap=softcap, alibi_slopes=slopes, dropout_p=p, dropout_mask=keep)
    ref, ref_lse = attention_ref(q, k, v, **ref_kw)
    base, base_lse = attention_ref(q, k, v, upcast=False, **ref_kw)
    assert_attention_close(out, lse, grads, ref, ref_lse, base, base_lse, (q, k, v), dout)
    return keep


# (B, Tq, Tk, H, Hkv, D, options): GQA with Tq < Tk, rows that see no key (Tq > Tk, causal
# bottom-right), a window with softcap and ALiBi, MQA at head dim 256.
TRITON_CASES = [
    (2, 40, 50, 4, 2, 40, dict(causal=True)),
    (1, 70, 45, 2, 1, 64, dict(causal=True)),
    (1, 50, 70, 4, 2, 32, dict(window=(12, 5), softcap=3.0, alibi="BH")),
    (1, 17, 33, 2, 1, 256, dict(p=0.5)),
]


def _id(case):
    *shape, options = case
    return "B{}-Tq{}-Tk{}-H{}-Hkv{}-D{}".format(*shape) + "".join(f"-{k}{v}" for k, v in options.items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", TRITON_CASES, ids=_id)
def test_triton(case, dtype):
    *shape, options = case
    check_dropout(TRITON, *shape, dtype, **options)


def test_triton_other_tiles():
    # Backward tiles unlike the forward's 32 x 32 (and unlike each other): the mask is a function
    # of (row, key), not of the tile walk, so the dK/dV pass (transposed) and the dQ pass agree.
    cfg = BwdConfig(BLOCK_M1=16, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=16, num_warps=4, num_stages=1)
    check_dropout(TRITON, 1, 77, 50, 4, 2, 40, torch.float16, causal=True, diag_offset=0, config=cfg)


CPU_CASES = [
    (2, 63, 63, 4, 2, 40, dict(causal=True)),
    (2, 17, 63, 4, 1, 72, dict()),
    (2, 63, 17, 4, 2, 40, dict(causal=True)),
    (1, 300, 300, 4, 2, 64, dict(causal=True, window=(50, -1), softcap=10.0, alibi="H")),
    (1, 40, 40, 2, 2, 256, dict(p=0.5)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", CPU_CASES, ids=_id)
def test_cpu(case, dtype):
    *shape, options = case
    check_dropout("cpu", *shape, dtype, **options)


def test_cpu_small_blocks(monkeypatch):
    # 16-row blocks: each block hashes its own slice of the counters, and together they must
    # make the dense mask that the reference is given.
    monkeypatch.setattr(cpu_blocked, "BLOCK_M", 16)
    check_dropout("cpu", 2, 100, 90, 4, 2, 40, torch.float32, causal=True, window=(31, -1))


@pytest.mark.parametrize("backend,p", [("cpu", 0.2), ("cpu", 0.5), (TRITON, 0.2)])
def test_kept_fraction(backend, p):
    # ~1M entries (B1 H4 T512): the dropped fraction is within 1% of p (relative: 0.002 at
    # p = 0.2, five standard deviations of the binomial).
    device = "cpu" if backend == "cpu" else DEVICE
    keep = dropout_mask(draw_seed(p), 1, 4, 512, 512, p, backend=backend, device=device)
    dropped = 1.0 - keep.float().mean().item()
    assert abs(dropped - p) <= 0.01 * p, dropped
    # No structure along rows or keys: every row's and every key's dropped fraction is plausible.
    for dim in (-1, -2):
        per_line = 1.0 - keep.float().mean(dim)
        sigma = math.sqrt(p * (1 - p) / 512)
        assert (per_line - p).abs().max() < 6 * sigma


def test_output_unbiased():
    # E[out with dropout] = out without: the mean over 1000 seeds is within 6 standard errors of
    # it, entry by entry (exactness for a given mask is what the reference tests check).
    q, k, v = make_qkv(1, 8, 12, 2, 2, 8, dtype=torch.float64)
    exact = flash_attn_func(q, k, v, causal=True)
    runs = torch.stack([flash_attn_func(q, k, v, dropout_p=0.3, causal=True) for _ in range(1000)])
    stderr = runs.std(0) / math.sqrt(len(runs))
    assert ((runs.mean(0) - exact).abs() <= 6 * stderr + 1e-12).all()
    assert not torch.equal(runs[0], runs[1])


def _inputs(backend, monkeypatch, B=2, Tq=20, Tk=33, H=4, Hkv=2, D=40):
    """Fixed inputs and dout on ``backend`` (fp32 on CPU, fp16 on the Triton kernels)."""
    monkeypatch.setenv("IOATTN_BACKEND", "cpu" if backend == "cpu" else "triton")
    dtype = torch.float32 if backend == "cpu" else torch.float16
    gen = torch.Generator().manual_seed(1234)
    q, k, v = make_qkv(B, Tq, Tk, H, Hkv, D, dtype=dtype, generator=gen)
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    device = "cpu" if backend == "cpu" else DEVICE
    return [x.to(device).requires_grad_() for x in (q, k, v)] + [dout.to(device)]


def _run(backend, monkeypatch, seed, p=0.25, grad=True):
    """flash_attn_func's out and gradients after ``torch.manual_seed(seed)``."""
    q, k, v, dout = _inputs(backend, monkeypatch)
    torch.manual_seed(seed)
    with torch.set_grad_enabled(grad):
        out = flash_attn_func(q, k, v, dropout_p=p, causal=True)
    return (out, *torch.autograd.grad(out, (q, k, v), dout)) if grad else (out,)


@pytest.mark.parametrize("backend", ["cpu", TRITON])
def test_same_seed_same_bits(monkeypatch, backend):
    first = _run(backend, monkeypatch, 7)
    assert all(torch.equal(a, b) for a, b in zip(first, _run(backend, monkeypatch, 7)))
    other = _run(backend, monkeypatch, 8)
    assert all(not torch.equal(a, b) for a, b in zip(first, other))
    # Inference drops too (flash-attn and torch apply dropout whenever p > 0), with the same mask.
    assert torch.equal(first[0], _run(backend, monkeypatch, 7, grad=False)[0])


def test_no_dropout_draws_nothing():
    # p = 0 draws no seed: torch's random stream is the same as if attention had not run.
    q, k, v = make_qkv(1, 5, 5, 2, 2, 16, dtype=torch.float32)
    torch.manual_seed(3)
    flash_attn_func(q, k, v, dropout_p=0.0)
    after = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(4))


def _check_public(fn, backend, monkeypatch, *, diag_offset=None, p=0.25):
    """``fn(q, k, v, p)`` -> ``(out, lse or None)`` in [B, T, H, D]: the public path (seed drawn
    from torch's generator, custom op, autograd) uses the mask of the seed that the same
    torch.manual_seed draws."""
    q, k, v, dout = _inputs(backend, monkeypatch)
    torch.manual_seed(7)
    seed = draw_seed(p)
    torch.manual_seed(7)
    out, lse = fn(q, k, v, p)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    (B, Tq, H, _), Tk = q.shape, k.shape[1]
    keep = dropout_mask(seed, B, H, Tq, Tk, p, backend=backend, device=q.device)
    kw = dict(causal=True, diag_offset=diag_offset, dropout_p=p, dropout_mask=keep)
    ref, ref_lse = attention_ref(q, k, v, **kw)
    base, base_lse = attention_ref(q, k, v, upcast=False, **kw)
    if lse is None:
        lse, ref_lse, base_lse = ref_lse, ref_lse, base_lse
    assert_attention_close(out, lse, grads, ref, ref_lse, base, base_lse, (q, k, v), dout)


@pytest.mark.parametrize("backend", ["cpu", TRITON])
def test_flash_attn_func(monkeypatch, backend):
    def fn(q, k, v, p):
        out, lse, probs = flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=True)
        assert probs is None
        return out, lse

    _check_public(fn, backend, monkeypatch)


@pytest.mark.parametrize("backend", ["cpu", TRITON])
def test_sdpa(monkeypatch, backend):
    # torch's layout and top-left causal alignment; GQA.
    def fn(q, k, v, p):
        out = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           dropout_p=p, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2), None

    _check_public(fn, backend, monkeypatch, diag_offset=0)


@pytest.mark.parametrize("backend", ["cpu", TRITON])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_with_attn_mask(monkeypatch, backend, kind):
    # Mask and dropout together (a padded training batch): the Triton kernels apply both in the
    # kernel, the CPU backend leaves torch's kernel for the blocked path, which reads the mask
    # block by block. Batch 1's last key columns are hidden, and its row 3 sees no key at all.
    q, k, v, dout = _inputs(backend, monkeypatch)
    (B, Tq, H, _), Tk = q.shape, k.shape[1]
    gen = torch.Generator().manual_seed(11)
    if kind == "bool":
        mask = torch.rand(B, 1, Tq, Tk, generator=gen) > 0.3
        mask[1, :, :, Tk - 7:] = False
        mask[1, :, 3] = False
    else:
        mask = torch.randn(B, H, Tq, Tk, generator=gen)
        mask[1, :, 3] = float("-inf")
    mask = mask.to(q.device)
    p = 0.25
    torch.manual_seed(7)
    seed = draw_seed(p)
    torch.manual_seed(7)
    out = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, dropout_p=p, enable_gqa=True).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert out[1, 3].abs().max() == 0
    keep = dropout_mask(seed, B, H, Tq, Tk, p, backend=backend, device=q.device)
    kw = dict(diag_offset=0, attn_mask=mask, dropout_p=p, dropout_mask=keep)
    ref, ref_lse = attention_ref(q, k, v, **kw)
    base, base_lse = attention_ref(q, k, v, upcast=False, **kw)
    assert_attention_close(out, ref_lse, grads, ref, ref_lse, base, base_lse, (q, k, v), dout)


def test_packed_functions_match_unpacked():
    # The packed entry points pass dropout_p on: same seed, same bits as flash_attn_func.
    qkv = torch.randn(2, 19, 3, 4, 40)
    torch.manual_seed(5)
    out = flash_attn_qkvpacked_func(qkv, dropout_p=0.3, causal=True)
    torch.manual_seed(5)
    assert torch.equal(out, flash_attn_func(*qkv.unbind(2), dropout_p=0.3, causal=True))
    torch.manual_seed(5)
    out = flash_attn_kvpacked_func(qkv[:, :, 0], qkv[:, :, 1:, :2], dropout_p=0.3)
    torch.manual_seed(5)
    assert torch.equal(out, flash_attn_func(qkv[:, :, 0], qkv[:, :, 1, :2], qkv[:, :, 2, :2], dropout_p=0.3))


def test_torch_compile_fullgraph():
    # The seed is drawn inside the graph (a 0-d tensor into the custom op), so the compiled
    # function draws a fresh one per call, the same one eager draws after the same manual_seed.
    q, k, v = make_qkv(2, 24, 40, 4, 2, 32, dtype=torch.float32, requires_grad=True)

    def f(q, k, v):
        return flash_attn_func(q, k, v, dropout_p=0.2, causal=True).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn, seed in ((f, 11), (compiled, 11), (compiled, 12)):
        torch.manual_seed(seed)
        loss = fn(q, k, v)
        results.append((loss, *torch.autograd.grad(loss, (q, k, v))))
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b)
    assert not torch.equal(results[1][0], results[2][0])


# bf16 at GPU sizes: GQA, MQA at head dim 256 with a two-sided window, softcap with ALiBi at
# p = 0.5, rows that see no key (Tq > Tk).
GPU_CASES = [
    (2, 1000, 1000, 8, 2, 128, dict(causal=True)),
    (1, 700, 1500, 4, 1, 256, dict(window=(200, 50))),
    (2, 1024, 1024, 8, 8, 64, dict(causal=True, softcap=30.0, alibi="H", p=0.5)),
    (1, 1500, 700, 4, 2, 96, dict(causal=True)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_id)
def test_triton_gpu_bf16(case):
    *shape, options = case
    check_dropout(TRITON, *shape, torch.bfloat16, **options)


@pytest.mark.gpu
def test_kept_fraction_gpu():
    # 67M entries: within 1% of p = 0.1 is 27 standard deviations; 6 are asserted as well.
    p, n = 0.1, 2 * 8 * 2048 * 2048
    keep = dropout_mask(draw_seed(p), 2, 8, 2048, 2048, p, backend=TRITON, device=DEVICE)
    dropped = 1.0 - keep.float().mean().item()
    assert abs(dropped - p) < min(0.01 * p, 6 * math.sqrt(p * (1 - p) / n)), dropped


@pytest.mark.gpu
def test_counters_past_2_32_gpu():
    # 17 identical heads of T = 16384: head 16's counters start at 16 · 2^28 = 2^32, so with
    # 32-bit counters its mask, and then its output, would repeat head 0's bit for bit.
    T, D = 16384, 64
    q, k, v = (torch.randn(1, T, 1, D, device=DEVICE, dtype=torch.bfloat16).expand(1, T, 17, D)
               for _ in range(3))
    out = flash_attn_func(q, k, v, dropout_p=0.5)
    assert not torch.equal(out[:, :, 0], out[:, :, 16])


@pytest.mark.gpu
def test_same_seed_same_bits_gpu():
    # Five forward + backward passes after the same manual_seed agree bit for bit.
    q, k, v = make_qkv(2, 1000, 1000, 8, 2, 128, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    dout = torch.randn_like(q)

    def run():
        torch.manual_seed(3)
        out = flash_attn_func(q, k, v, dropout_p=0.1, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    first = run()
    for _ in range(4):
        assert all(torch.equal(a, b) for a, b in zip(first, run()))
