"""SDPA's attn_mask: the Triton kernels (interpreter / GPU) and the CPU backend against the dense
reference by the accuracy rule, forward and every gradient; the public function against torch's
own SDPA; bad masks rejected before any launch.

Masks are read tile by tile through their strides, so the cases cover broadcast shapes (stride
0), a transposed (non-contiguous) mask, bool and float, and rows the mask hides entirely (out 0,
lse −inf, no NaN in any gradient).
"""
import pytest
import torch

from ioattn import scaled_dot_product_attention
from ioattn.flash.bwd import flash_bwd_triton
from ioattn.flash.checks import check_attn_mask
from ioattn.flash.cpu import flash_bwd_cpu, flash_fwd_cpu
from ioattn.flash.fwd import flash_fwd_triton
from ioattn.flash.reference import attention_ref
from ioattn.testing import assert_close, make_qkv

from .cases import DEVICE, reference_dtype


def make_mask(kind, B, H, Tq, Tk, device):
    """A fresh random mask of one of the shapes SDPA users pass."""
    if kind == "float-2d":  # [Tq, Tk] additive bias
        return torch.randn(Tq, Tk, device=device)
    if kind == "float-transposed":  # a non-contiguous [Tq, Tk] view
        return torch.randn(Tk, Tq, device=device).t()
    if kind == "bool-padding":  # [B, 1, 1, Tk]: batch b attends to its first n_b keys
        lengths = torch.randint(1, Tk + 1, (B,), device=device)
        return (torch.arange(Tk, device=device) < lengths[:, None])[:, None, None, :]
    if kind == "bool-full":  # [B, H, Tq, Tk], with rows hidden entirely
        m = torch.rand(B, H, Tq, Tk, device=device) > 0.4
        m[0, -1, Tq // 2] = False
        m[-1, 0, 0] = False
        return m
    if kind == "float-heads-inf":  # [1, H, 1, Tk] with -inf: whole keys hidden per head
        m = torch.randn(1, H, 1, Tk, device=device)
        return m.masked_fill(torch.rand(1, H, 1, Tk, device=device) < 0.3, float("-inf"))
    raise ValueError(kind)


KINDS = ["float-2d", "float-transposed", "bool-padding", "bool-full", "float-heads-inf"]


def check_masked(fwd, bwd, B, Tq, Tk, H, Hkv, D, dtype, kind, device=DEVICE):
    q, k, v = make_qkv(B, Tq, Tk, H, Hkv, D, dtype=dtype, device=device)
    mask = make_mask(kind, B, H, Tq, Tk, device)
    if mask.is_floating_point():
        mask = mask.to(dtype)
    am = check_attn_mask(mask, q, k)
    scale = D**-0.5
    dout = torch.randn(B, Tq, H, D, device=device).to(dtype)
    out, lse = fwd(q, k, v, scale, False, 0, attn_mask=am)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, scale, False, 0, attn_mask=am)

    rdt = reference_dtype(dtype, device)
    ref_in = [x.detach().to(rdt).requires_grad_() for x in (q, k, v)]
    base_in = [x.detach().requires_grad_() for x in (q, k, v)]
    kw = dict(softmax_scale=scale, diag_offset=0, attn_mask=mask, upcast=False)
    ref, ref_lse = attention_ref(*ref_in, **kw)
    base, base_lse = attention_ref(*base_in, **kw)
    assert_close("out", out, ref, base)
    assert_close("lse", lse, ref_lse, base_lse)
    for name, g, gr, gb in zip(("dq", "dk", "dv"), (dq, dk, dv),
                               torch.autograd.grad(ref, ref_in, dout.to(rdt)),
                               torch.autograd.grad(base, base_in, dout)):
        assert_close(name, g, gr, gb, factor=3.0)
    hidden = ref_lse == float("-inf")
    if kind == "bool-full":
        assert hidden.any()
    # Hidden rows: exactly 0 out, lse −inf, dq 0 (assert_close already rules out NaN anywhere).
    assert torch.equal(lse[hidden], ref_lse[hidden])
    assert (out.transpose(1, 2)[hidden] == 0).all() and (dq.transpose(1, 2)[hidden] == 0).all()


# Odd sizes that cross tile edges, GQA and MQA; the interpreter keeps them small.
SHAPES = [(2, 37, 45, 4, 2, 16), (1, 70, 33, 3, 1, 40)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_triton_mask(shape, kind, dtype):
    if DEVICE == "cpu" and dtype == torch.float32 and shape != SHAPES[0]:
        pytest.skip("the interpreter is slow: fp32 on one shape")
    check_masked(flash_fwd_triton, flash_bwd_triton, *shape, dtype, kind)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(2, 1000, 777, 8, 2, 128), (1, 300, 513, 4, 4, 64), (1, 200, 200, 2, 1, 256)],
                         ids=str)
def test_triton_mask_gpu(shape, kind):
    check_masked(flash_fwd_triton, flash_bwd_triton, *shape, torch.bfloat16, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cpu_mask(kind, dtype):
    check_masked(flash_fwd_cpu, flash_bwd_cpu, 2, 70, 45, 4, 2, 40, dtype, kind, device="cpu")


@pytest.mark.parametrize("kind", ["float-2d", "bool-padding", "float-transposed"])
def test_sdpa_mask_matches_torch(kind):
    """Through the public function (default backend of the device), GQA, against torch's SDPA."""
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    B, H, Hkv, Tq, Tk, D = 2, 4, 2, 33, 50, 32
    q, k, v = (torch.randn(B, h, T, D, device=DEVICE, dtype=dtype, requires_grad=True)
               for h, T in ((H, Tq), (Hkv, Tk), (Hkv, Tk)))
    mask = make_mask(kind, B, H, Tq, Tk, DEVICE)
    mask = mask.to(dtype) if mask.is_floating_point() else mask
    dout = torch.randn(B, H, Tq, D, device=DEVICE, dtype=dtype)
    ours = scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours, theirs, **tol)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), dout), torch.autograd.grad(theirs, (q, k, v), dout)):
        torch.testing.assert_close(a, b, **tol)


def test_mask_gradcheck_fp64_cpu():
    """Finite differences through the public function with a float mask (CPU backend, fp64)."""
    q, k, v = (torch.randn(1, 2, T, 8, dtype=torch.float64, requires_grad=True) for T in (5, 7, 7))
    mask = torch.randn(5, 7, dtype=torch.float64).masked_fill(torch.rand(5, 7) < 0.3, float("-inf"))
    mask[:, 0] = 0.0  # every row keeps one key: gradcheck needs no hidden rows
    assert torch.autograd.gradcheck(
        lambda q, k, v: scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, k, v))


def test_mask_under_torch_compile():
    q, k, v = (torch.randn(2, 4, 24, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 24, 24, device=DEVICE) > 0.3

    def f(q, k, v):
        return scaled_dot_product_attention(q, k, v, attn_mask=mask).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    loss, loss_eager = compiled(q, k, v), f(q, k, v)
    torch.testing.assert_close(loss, loss_eager)
    for g, ge in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(loss_eager, (q, k, v))):
        torch.testing.assert_close(g, ge)


def test_bad_masks_are_rejected():
    q, k, v = (torch.randn(2, 4, T, 16, device=DEVICE) for T in (8, 10, 10))
    cases = [
        (torch.ones(8, 9, dtype=torch.bool, device=DEVICE), ValueError, "does not broadcast"),
        (torch.ones(3, 4, 8, 10, dtype=torch.bool, device=DEVICE), ValueError, "does not broadcast"),
        (torch.ones(1, 2, 4, 8, 10, device=DEVICE), ValueError, "does not broadcast"),
        (torch.ones(8, 10, dtype=torch.int32, device=DEVICE), TypeError, "bool or floating"),
        (torch.zeros(8, 10, device=DEVICE, requires_grad=True), ValueError, "requires grad"),
        ([[0.0] * 10] * 8, TypeError, "torch.Tensor"),
        (torch.zeros(8, 10, device="meta"), ValueError, "device"),
    ]
    for mask, err, msg in cases:
        with pytest.raises(err, match=msg):
            scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with pytest.raises(ValueError, match="is_causal"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(8, 10, device=DEVICE), is_causal=True)
