"""The one-pass backward (src/ioattn/flash/bwd_fused.py): accuracy against the dense reference and
agreement with the portable backward, and where the dispatch sends a call.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors with element-wise atomics
(the interpreter has no bulk reduction); the `gpu` tests run both ways of adding dQ compiled.
"""
import dataclasses

import pytest
import torch

from ioattn.flash.bwd_dq_cast import BLOCK, dq_cast
from ioattn.flash.bwd_fused import flash_bwd_fused
from ioattn.flash.bwd_preprocess import bwd_preprocess
from ioattn.flash.config import FusedBwdConfig, get_fused_bwd_config
from ioattn.flash.fwd import flash_fwd_triton
from ioattn.testing import make_qkv

from .cases import DEVICE, DTYPES, SMEM_BYTES, case_id
from .test_bwd import check_bwd
from .test_bwd_tma import CASES as TMA_CASES, GPU_CASES as TMA_GPU_CASES, versus_portable

# Small tiles for the interpreter: M < N, so a key block meets the diagonal in two row blocks.
SMALL = FusedBwdConfig(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)


fused_vs_portable = versus_portable(flash_bwd_fused)


@pytest.mark.parametrize("dq_t", [False, True], ids=["dS.k", "kT.dST"])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("case", TMA_CASES, ids=case_id)
def test_bwd_fused(case, dtype, dq_t):
    check_bwd(*case, DTYPES[dtype], config=dataclasses.replace(SMALL, dq_t=dq_t), bwd=fused_vs_portable)


@pytest.mark.parametrize("device_desc", [False, True], ids=["host-desc", "device-desc"])
def test_bwd_fused_strided(device_desc):
    # q, k, v views of [B, H, T, D] storage, dout every other D-block of a wider tensor; with
    # per-head descriptors made in the kernel too.
    cfg = dataclasses.replace(SMALL, device_desc=device_desc)
    check_bwd(2, 37, 45, 4, 2, 64, True, None, torch.float16, layout="bhtd", dout_strided=True, config=cfg,
              bwd=fused_vs_portable)


@pytest.mark.parametrize("case", [c for c in TMA_CASES if c[3] != c[4]] + [(1, 40, 33, 6, 2, 32, True, None)],
                         ids=case_id)
def test_bwd_fused_gqa_expanded(case):
    # GQA through the MHA kernel (expand_kv): K and V repeated to the query heads, dK and dV
    # summed over each group after; MQA (one KV head) and Tq != Tk among the cases.
    check_bwd(*case, torch.float16, config=dataclasses.replace(SMALL, dq_t=True, expand_kv=True),
              bwd=fused_vs_portable)


@pytest.mark.parametrize("expand_kv", [False, True])
def test_bwd_fused_expand_kv_reaches_the_kernel(monkeypatch, expand_kv):
    # expand_kv runs the kernel over K, V and their gradients at the query heads' count (6 here),
    # without it over the KV heads (2): the kernel's own GQA. Both pass the accuracy rule.
    from ioattn.flash import bwd_fused

    heads = []
    real = bwd_fused.fused_pass

    def spy(q, k, v, dout, lse, delta, dk, dv, *rest):
        heads.append((k.shape[2], v.shape[2], dk.shape[2], dv.shape[2]))
        return real(q, k, v, dout, lse, delta, dk, dv, *rest)

    monkeypatch.setattr(bwd_fused, "fused_pass", spy)
    dq, dk, dv = check_bwd(1, 40, 33, 6, 2, 32, True, None, torch.float16,
                           config=dataclasses.replace(SMALL, dq_t=True, expand_kv=expand_kv), bwd=fused_vs_portable)
    assert heads and set(heads) == {(6,) * 4 if expand_kv else (2,) * 4}
    assert dk.shape[2] == dv.shape[2] == 2 and dq.shape[2] == 6
    # The expanded gradients are not kept alive by dq: its storage holds dq alone.
    if expand_kv:
        assert dq.untyped_storage().nbytes() == dq.numel() * dq.element_size()


def test_bwd_fused_through_the_custom_op(monkeypatch):
    # torch.compile runs the backward as the custom op ioattn::flash_bwd, which may not return
    # outputs that alias each other or its inputs (torch checks): the one-pass backward's dq, dk
    # and dv through it, deterministic=False, against the eager call's.
    from ioattn.flash import bwd_fused, ops

    monkeypatch.setenv("IOATTN_BACKEND", "triton")
    fused = _spy(monkeypatch, bwd_fused, "flash_bwd_fused")
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    T = 4096 if DEVICE == "cuda" else 45  # on the GPU, long enough for the table's one-pass entry
    q, k, v = make_qkv(1, T, T, 2, 2, 64, dtype=dtype, device=DEVICE)
    out, lse = ops.flash_fwd(q, k, v, None, None, 0.125, True, 0, -1, -1, 0.0, 0.0, None, False)
    dout = torch.randn_like(q)
    grads = ops.flash_bwd(dout, q, k, v, out, lse, None, None, 0.125, True, 0, -1, -1, 0.0, 0.0, None, False)
    assert fused, "the one-pass backward ran"
    assert len({g.untyped_storage().data_ptr() for g in grads}) == 3
    eager = ops._bwd_impl(dout, q, k, v, out, lse, None, None, 0.125, True, 0, -1, -1, 0.0, 0.0, None, False)
    for g, e in zip(grads, eager):
        assert (g.float() - e.float()).abs().max() <= 1e-2 * e.float().abs().max()


def test_preprocess_zeroes_dq_acc():
    # The one-pass backward's dQ buffer is zeroed by the preprocess launch: NaN-filled here, so a
    # missed element stays NaN; delta beside it as without the buffer. D = 40 pads to 64 columns.
    torch.manual_seed(0)
    out, dout = (torch.randn(2, 37, 3, 40, device=DEVICE, dtype=torch.float16) for _ in range(2))
    delta = torch.full((2, 3, 37), float("nan"), device=DEVICE)
    dq_acc = torch.full(out.shape, float("nan"), device=DEVICE)
    bwd_preprocess(out, dout, delta, 64, dq_acc=dq_acc)
    want = (out.float() * dout.float()).sum(-1).transpose(1, 2)
    torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-4)
    assert torch.all(dq_acc == 0)


@pytest.mark.parametrize("n", [1, BLOCK - 3, 2 * BLOCK + 37])
# bf16 on the GPU only: Triton's interpreter rounds fp32 to bf16 toward zero (the GPU to nearest).
@pytest.mark.parametrize("dtype", ["fp16", pytest.param("bf16", marks=pytest.mark.gpu), "fp32"])
def test_dq_cast(n, dtype):
    # The last step of the one-pass backward: bit-equal to torch's fp32 product rounded to dq's
    # dtype, a partial last block included; dq starts NaN, so an element left unwritten fails.
    # Values spread over the range where bf16 and fp16 round differently, with a NaN and an inf.
    torch.manual_seed(n)
    dq_acc = torch.randn(n, device=DEVICE) * torch.logspace(-6, 4, n, device=DEVICE)
    dq_acc[n // 2] = float("nan")
    if n > 2:
        dq_acc[1] = float("inf")
    dq = torch.full((n,), float("nan"), dtype=DTYPES[dtype], device=DEVICE)
    dq_cast(dq_acc, dq, 0.0883883)
    want = torch.mul(dq_acc, 0.0883883).to(DTYPES[dtype])
    assert torch.equal(dq.isnan(), want.isnan())
    assert torch.equal(dq.nan_to_num(), want.nan_to_num())


def test_dq_cast_rejects_mismatched_buffers():
    with pytest.raises(ValueError, match="dq_acc, dq"):
        dq_cast(torch.zeros(8, 4, device=DEVICE).t(), torch.empty(4, 8, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="dq_acc, dq"):
        dq_cast(torch.zeros(9, device=DEVICE), torch.empty(8, device=DEVICE), 1.0)


def test_bwd_fused_empty_rows():
    # Tq > Tk, bottom-right: rows 0..34 see no key, so nothing is added to their dq.
    dq, _, _ = check_bwd(1, 45, 10, 2, 1, 32, True, None, torch.float16, config=SMALL, bwd=fused_vs_portable)
    assert torch.all(dq[:, :35] == 0)


def test_bwd_fused_nan_in_nan_out():
    # A NaN in one key row reaches the dq of every row that sees it, not a silent number.
    q, k, v = make_qkv(1, 37, 45, 2, 1, 32, dtype=torch.float16, device=DEVICE)
    k[0, 40, 0, 3] = float("nan")
    dout = torch.randn_like(q)
    out, lse = flash_fwd_triton(q, k, v, 32**-0.5, True, 8)
    dq, dk, dv = flash_bwd_fused(dout, q, k, v, out, lse, 32**-0.5, True, 8, config=SMALL)
    # Row i sees key 40 iff 40 <= i + 8. Rows that share a tile with it but do not see it may
    # be NaN too (their P is 0, and 0 · NaN in the dot is NaN), as in the portable kernels;
    # rows 0..15 never meet its key block.
    assert torch.isnan(dq[0, 32:]).any(dim=-1).all() and not torch.isnan(dq[0, :16]).any()
    assert torch.isnan(dk[0, 40]).any() and torch.isnan(dv[0]).any()


BRANCHES = [(D, dt, c, T) for D in (64, 128, 256) for dt in ("fp16", "bf16") for c in (False, True)
            for T in (0, 512, 1024, 2048, 4096, 16384, 131072)]


@pytest.mark.parametrize("interpret", [False, True], ids=["compiled", "interpret"])
def test_fused_bwd_config_branches(interpret):
    for D, dtype, causal, seqlen in BRANCHES:
        cfg = get_fused_bwd_config(D, DTYPES[dtype], causal, interpret=interpret, seqlen=seqlen)
        if cfg is None:
            continue
        assert not (interpret and cfg.tma_reduce), "the interpreter has no bulk reduction"
        for block in (cfg.BLOCK_M, cfg.BLOCK_N):
            assert block >= 16 and block & (block - 1) == 0, cfg
        # K and V once, Q and dO per stage, the dQ tile (fp32) once.
        smem = (2 * cfg.BLOCK_N + 2 * cfg.num_stages * cfg.BLOCK_M) * D * 2 + cfg.BLOCK_M * D * 4
        assert smem <= SMEM_BYTES, (D, dtype, cfg)


def _gpu_config(D, causal):
    """The config the GPU picks for long sequences, or where it picks none (D = 128) the
    fastest one the sweep found."""
    return (get_fused_bwd_config(D, torch.bfloat16, causal, interpret=False, seqlen=0)
            or FusedBwdConfig(64, 128, 8, 2, tma_reduce=True))


@pytest.mark.gpu
@pytest.mark.parametrize("dq_t", [False, True], ids=["dS.k", "kT.dST"])
@pytest.mark.parametrize("tma_reduce", [False, True], ids=["atomic", "bulk"])
@pytest.mark.parametrize("case", [c for c in TMA_GPU_CASES if c[5] in (64, 128)], ids=case_id)
def test_bwd_fused_gpu(case, tma_reduce, dq_t):
    cfg = dataclasses.replace(_gpu_config(case[5], case[6]), tma_reduce=tma_reduce, dq_t=dq_t)
    check_bwd(*case, torch.bfloat16, config=cfg, bwd=fused_vs_portable)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_bwd_fused_gpu_device_desc(D):
    for tma_reduce in (False, True):
        cfg = dataclasses.replace(_gpu_config(D, True), device_desc=True, tma_reduce=tma_reduce)
        check_bwd(2, 1000, 1100, 8, 2, D, True, None, torch.bfloat16, config=cfg, bwd=fused_vs_portable)


def check_dkdv_repeat(config, causal=True):
    """Only dQ's adds race; dK and dV are each written once by one program, so over runs they
    repeat bit for bit, and dQ agrees to fp32 rounding of the sums (then one rounding to bf16)."""
    q, k, v = make_qkv(2, 1000, 1000, 8, 2, 128, dtype=torch.bfloat16, device=DEVICE)
    dout = torch.randn_like(q)
    out, lse = flash_fwd_triton(q, k, v, 128**-0.5, causal, 0)
    first = flash_bwd_fused(dout, q, k, v, out, lse, 128**-0.5, causal, 0, config=config)
    for _ in range(5):
        dq, dk, dv = flash_bwd_fused(dout, q, k, v, out, lse, 128**-0.5, causal, 0, config=config)
        assert torch.equal(dk, first[1]) and torch.equal(dv, first[2])
        assert (dq.float() - first[0].float()).abs().max() <= 1e-2 * first[0].float().abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in TMA_GPU_CASES if c[5] in (64, 128) and c[3] != c[4]]
                         + [(2, 2048, 2048, 16, 2, 128, True, None), (1, 1000, 1000, 8, 1, 64, False, None)],
                         ids=case_id)
def test_bwd_fused_gpu_gqa_expanded(case):
    # The Gluon row-held kernel's table config with GQA expanded to its query heads.
    D, causal = case[5], case[6]
    cfg = get_fused_bwd_config(D, torch.bfloat16, causal, interpret=False, seqlen=16384, gluon=True)
    check_bwd(*case, torch.bfloat16, config=dataclasses.replace(cfg, expand_kv=True), bwd=fused_vs_portable)


@pytest.mark.gpu
def test_bwd_fused_gpu_dkdv_deterministic():
    check_dkdv_repeat(_gpu_config(128, True))


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*args, **kw):
        calls.append(kw.get("config"))
        return real(*args, **kw)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("api", ["flash_attn_func", "sdpa"])
def test_dispatch_deterministic(monkeypatch, api):
    # flash_attn_func's default (deterministic=False) and SDPA's (torch's deterministic-algorithms
    # flag off) may take the one-pass backward; deterministic=True, or the flag on, never do.
    # Either way the gradients pass the accuracy rule.
    from ioattn import flash_attn_func, scaled_dot_product_attention
    from ioattn.flash import bwd_fused, bwd_tma
    from ioattn.flash.reference import attention_ref
    from ioattn.testing import assert_close

    monkeypatch.setenv("IOATTN_BACKEND", "triton")
    fused, two_pass = _spy(monkeypatch, bwd_fused, "flash_bwd_fused"), _spy(monkeypatch, bwd_tma, "flash_bwd_tma")
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    # On the GPU a sequence long enough for the table (D = 64, full: T >= 4096).
    T = 4096 if DEVICE == "cuda" else 45
    q, k, v = make_qkv(1, T, T, 2, 1, 64, dtype=dtype, device=DEVICE, requires_grad=True)
    dout = torch.randn_like(q)
    ref, _ = attention_ref(q, k, v)
    base, _ = attention_ref(q, k, v, upcast=False)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    base_grads = torch.autograd.grad(base, (q, k, v), dout)

    def grads(**deterministic):
        if api == "flash_attn_func":
            out = flash_attn_func(q, k, v, **deterministic)
        else:
            flag = deterministic.get("deterministic", False)
            monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: flag)
            out = scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), enable_gqa=True)
            out = out.transpose(1, 2)
        for name, g, r, b in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout), ref_grads,
                                 base_grads):
            assert_close(name, g, r, b, factor=3)

    grads()  # the default
    assert len(fused) == 1 and two_pass == []
    grads(deterministic=False)
    assert len(fused) == 2 and two_pass == []
    grads(deterministic=True)
    assert len(fused) == 2 and len(two_pass) == 1
