"""torch.library custom ops for the flash family: forward and backward, with fake (meta)
implementations so torch.compile traces through them without graph breaks, and autograd
registered on the forward op. In eager mode the same implementations run behind a plain
autograd.Function instead (see :func:`attention`).

The ops take already-validated tensors (see checks.py) and pick a backend by device
(dispatch.py). Empty problems (B, H or Tq = 0, or Tk = 0) are answered here, so the launchers
never see a zero-sized grid: Tk = 0 means every row sees no key, giving out 0 and lse −inf.
"""
import torch
from torch import Tensor

from .dispatch import kernels_for


def _fwd_impl(q, k, v, softmax_scale, causal, diag_offset):
    B, Tq, H, D = q.shape
    if q.numel() == 0 or k.shape[1] == 0:
        out = torch.zeros(B, Tq, H, D, dtype=q.dtype, device=q.device)
        lse = torch.full((B, H, Tq), float("-inf"), dtype=torch.float32, device=q.device)
        return out, lse
    fwd, _ = kernels_for(q.device)
    out, lse = fwd(q, k, v, softmax_scale, causal, diag_offset)
    # The fake impl promises contiguous outputs; compiled graphs rely on those strides.
    return out.contiguous(), lse.contiguous()


def _bwd_impl(dout, q, k, v, out, lse, softmax_scale, causal, diag_offset):
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    _, bwd = kernels_for(q.device)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = bwd(dout, q, k, v, out, lse, softmax_scale, causal, diag_offset)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@torch.library.custom_op("ioattn::flash_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def flash_fwd(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, causal: bool,
              diag_offset: int) -> tuple[Tensor, Tensor]:
    return _fwd_impl(q, k, v, softmax_scale, causal, diag_offset)


@flash_fwd.register_fake
def _(q, k, v, softmax_scale, causal, diag_offset):
    B, Tq, H, D = q.shape
    return q.new_empty(B, Tq, H, D), q.new_empty(B, H, Tq, dtype=torch.float32)


@torch.library.custom_op("ioattn::flash_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def flash_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              softmax_scale: float, causal: bool, diag_offset: int) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd_impl(dout, q, k, v, out, lse, softmax_scale, causal, diag_offset)


@flash_bwd.register_fake
def _(dout, q, k, v, out, lse, softmax_scale, causal, diag_offset):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, causal, diag_offset = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale, ctx.causal, ctx.diag_offset = softmax_scale, causal, diag_offset
    # Gradients flow through `out` only; lse is returned for inspection (as in flash-attn).
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = flash_bwd(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.causal, ctx.diag_offset)
    return dq, dk, dv, None, None, None


flash_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The custom ops' autograd, without their dispatch: same implementations, same results."""

    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal, diag_offset):
        out, lse = _fwd_impl(q, k, v, softmax_scale, causal, diag_offset)
        _setup_context(ctx, (q, k, v, softmax_scale, causal, diag_offset), (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _bwd_impl(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.causal, ctx.diag_offset)
        return dq, dk, dv, None, None, None


def attention(q, k, v, softmax_scale: float, causal: bool, diag_offset: int):
    """``(out, lse)`` of validated inputs, differentiable in q, k, v.

    Under torch.compile this is the custom op, which the compiler can trace. In eager mode the
    op's dispatch costs ~60 µs a call (measured on CPU, torch 2.13: 85 µs vs 25 µs for the
    backend alone at T=16), seven times torch SDPA's whole call at small shapes, so eager calls
    go through a plain autograd.Function over the same implementations.
    """
    if torch.compiler.is_compiling():
        return flash_fwd(q, k, v, softmax_scale, causal, diag_offset)
    return _EagerAttention.apply(q, k, v, softmax_scale, causal, diag_offset)
