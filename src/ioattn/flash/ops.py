"""torch.library custom ops for the flash family: forward and backward, with fake (meta)
implementations so torch.compile traces through them without graph breaks, and autograd
registered on the forward op. In eager mode the same implementations run behind a plain
autograd.Function instead (see :func:`attention`).

The ops take already-validated tensors (see checks.py) and pick a backend by device
(dispatch.py). Empty problems (B, H or Tq = 0, or Tk = 0) are answered here, so the launchers
never see a zero-sized grid: Tk = 0 means every row sees no key, giving out 0 and lse −inf.

The optional tensors (ALiBi slopes, SDPA's attn_mask expanded to ``[B, H, Tq, Tk]``) come after
q, k, v; every op carries the same scalar options after them, in this order: softmax_scale,
causal, diag_offset, window_left, window_right, softcap, dropout_p (see the launchers for their
meaning), then the dropout seed: a 0-d int64 CPU tensor from :func:`draw_seed`, or None without
dropout. A tensor and not an int, so that torch.compile keeps the draw in the graph and each call
gets a fresh seed instead of one baked in as a constant; it is saved for the backward, which
regenerates the forward's mask from it. Last comes ``deterministic``, the backward's: False lets
it add dQ with atomics where that is faster (bwd_fused.py).
"""
from typing import Optional

import torch
from torch import Tensor

from .dispatch import kernels_for


def _lse_dtype(q):
    """lse is fp32, except for fp64 inputs (CPU only), where an fp32 lse would cap the accuracy
    of the recomputed probabilities, and so of every gradient, near 1e-7."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def draw_seed(dropout_p: float):
    """A fresh dropout seed, or None when ``dropout_p == 0`` (then nothing is drawn and torch's
    random stream is left as it was).

    Drawn from torch's default CPU generator whatever the device: ``torch.manual_seed(s)`` seeds
    it, so the same seed gives the same result on every run and device kind, and the kernels get
    it as a host int without a device synchronization. 62 random bits with bit 62 set: Triton
    types every such int as int64, so a new seed never compiles a new kernel variant.

    Under torch.compile the draw stays in the graph. With the aot_eager backend it is torch's
    own draw, so compiled and eager calls agree bit for bit after the same manual_seed; inductor
    compiles it with its own generator (seen on CPU, torch 2.13): still fresh per call and
    repeatable under manual_seed, but another seed than eager's.
    """
    if dropout_p == 0:
        return None
    return torch.randint(1 << 62, (), dtype=torch.int64) + (1 << 62)


def _seed_value(seed) -> int:
    """The seed as an int, from None (no dropout), an int or a 0-d tensor."""
    return 0 if seed is None else int(seed)


def _fwd_impl(q, k, v, alibi_slopes, attn_mask, softmax_scale, causal, diag_offset, window_left,
              window_right, softcap, dropout_p, seed, deterministic=True):
    # ``deterministic`` is the backward's (saved with the options); the forward has no atomics.
    B, Tq, H, D = q.shape
    if q.numel() == 0 or k.shape[1] == 0:
        out = torch.zeros(B, Tq, H, D, dtype=q.dtype, device=q.device)
        lse = torch.full((B, H, Tq), float("-inf"), dtype=_lse_dtype(q), device=q.device)
        return out, lse
    fwd, _ = kernels_for(q.device)
    out, lse = fwd(q, k, v, softmax_scale, causal, diag_offset, window=(window_left, window_right),
                   softcap=softcap, alibi_slopes=alibi_slopes, attn_mask=attn_mask, dropout_p=dropout_p,
                   seed=_seed_value(seed))
    # The fake impl promises contiguous outputs; compiled graphs rely on those strides.
    return out.contiguous(), lse.contiguous()


def _bwd_impl(dout, q, k, v, out, lse, alibi_slopes, attn_mask, softmax_scale, causal, diag_offset,
              window_left, window_right, softcap, dropout_p, seed, deterministic=True):
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    _, bwd = kernels_for(q.device)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = bwd(dout, q, k, v, out, lse, softmax_scale, causal, diag_offset,
                     window=(window_left, window_right), softcap=softcap, alibi_slopes=alibi_slopes,
                     attn_mask=attn_mask, dropout_p=dropout_p, seed=_seed_value(seed), deterministic=deterministic)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@torch.library.custom_op("ioattn::flash_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def flash_fwd(q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Optional[Tensor],
              attn_mask: Optional[Tensor], softmax_scale: float, causal: bool, diag_offset: int,
              window_left: int, window_right: int, softcap: float, dropout_p: float,
              dropout_seed: Optional[Tensor], deterministic: bool) -> tuple[Tensor, Tensor]:
    return _fwd_impl(q, k, v, alibi_slopes, attn_mask, softmax_scale, causal, diag_offset, window_left,
                     window_right, softcap, dropout_p, dropout_seed, deterministic)


@flash_fwd.register_fake
def _(q, k, v, alibi_slopes, attn_mask, *options):
    B, Tq, H, D = q.shape
    return q.new_empty(B, Tq, H, D), q.new_empty(B, H, Tq, dtype=_lse_dtype(q))


@torch.library.custom_op("ioattn::flash_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def flash_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              alibi_slopes: Optional[Tensor], attn_mask: Optional[Tensor], softmax_scale: float,
              causal: bool, diag_offset: int, window_left: int, window_right: int, softcap: float,
              dropout_p: float, dropout_seed: Optional[Tensor], deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd_impl(dout, q, k, v, out, lse, alibi_slopes, attn_mask, softmax_scale, causal,
                     diag_offset, window_left, window_right, softcap, dropout_p, dropout_seed, deterministic)


@flash_bwd.register_fake
def _(dout, q, k, v, out, lse, alibi_slopes, attn_mask, *options):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, alibi_slopes, attn_mask, *options, seed, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, attn_mask, seed)
    ctx.options = tuple(options)
    ctx.deterministic = deterministic
    # Gradients flow through `out` only; lse is returned for inspection (as in flash-attn).
    ctx.mark_non_differentiable(lse)
    # Otherwise autograd fills a zero gradient for lse (an allocation and a fill launch per
    # backward) that nothing reads; a missing dout becomes zeros in _grads.
    ctx.set_materialize_grads(False)


def _grads(ctx, dout, bwd):
    q, k, v, out, lse, alibi_slopes, attn_mask, seed = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, alibi_slopes, attn_mask, *ctx.options, seed, ctx.deterministic)
    # No gradient for the ALiBi slopes (flash-attn gives none either), the mask (checks.py
    # rejects one that requires grad), the scalar options, the seed or the deterministic flag.
    return (dq, dk, dv, None, None) + (None,) * len(ctx.options) + (None, None)


def _backward(ctx, dout, dlse):
    return _grads(ctx, dout, flash_bwd)


flash_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The custom ops' autograd, without their dispatch: same implementations, same results."""

    @staticmethod
    def forward(ctx, q, k, v, alibi_slopes, attn_mask, *options):
        out, lse = _fwd_impl(q, k, v, alibi_slopes, attn_mask, *options)
        _setup_context(ctx, (q, k, v, alibi_slopes, attn_mask, *options), (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        return _grads(ctx, dout, _bwd_impl)


def attention(q, k, v, softmax_scale: float, causal: bool, diag_offset: int, *,
              window=(-1, -1), softcap: float = 0.0, alibi_slopes=None, attn_mask=None,
              dropout_p: float = 0.0, deterministic: bool = True):
    """``(out, lse)`` of validated inputs, differentiable in q, k, v. With ``dropout_p > 0`` a
    fresh seed is drawn per call (:func:`draw_seed`), in inference too. ``deterministic=False``
    lets the backward add dQ with atomics where that is faster (bwd_fused.py).

    Under torch.compile this is the custom op, which the compiler can trace. In eager mode the
    op's dispatch costs ~60 µs a call (measured on CPU, torch 2.13: 85 µs vs 25 µs for the
    backend alone at T=16), seven times torch SDPA's whole call at small shapes, so eager calls
    go through a plain autograd.Function over the same implementations, or straight to the
    implementation when no gradient is wanted.
    """
    args = (q, k, v, alibi_slopes, attn_mask, float(softmax_scale), bool(causal), int(diag_offset),
            int(window[0]), int(window[1]), float(softcap), float(dropout_p), draw_seed(dropout_p),
            bool(deterministic))
    if torch.compiler.is_compiling():
        return flash_fwd(*args)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EagerAttention.apply(*args)
    # Inference: nothing to save for a backward, so skip autograd's bookkeeping too.
    return _fwd_impl(*args)
