"""The CPU backend: torch's own CPU flash-attention kernel, driven to cover the ioattn contract.

torch ships a FlashAttention-2 style CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``):
Q is cut into row blocks, K/V into column blocks, the softmax runs online, and the backward
recomputes P from the saved lse, so nothing of size Tq×Tk is ever allocated. Using it makes this
backend exactly as fast as ``torch.nn.functional.scaled_dot_product_attention`` on CPU wherever
SDPA covers the case. What it lacks is any causal alignment other than top-left; `_plan` reduces
the contract's arbitrary ``diag_offset`` to at most two calls, merged by lse.

GQA/MQA needs nothing here: the kernel maps query head h to KV head ``h // (H // Hkv)`` itself
(checked against SDPA's ``enable_gqa``; forward and backward run as fast as with K/V expanded, and
the profiler shows no expanded copy), which beats folding the groups into the sequence axis
(a copy of q and of out) or looping over the groups (G calls).
"""
import torch

from .. import _utils
from ..merge import merge_partials

# The .default overloads skip the overload resolution of the packet, a few µs per call.
_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _plan(Tq: int, Tk: int, causal: bool, diag_offset: int):
    """Split the visible part of the ``[Tq, Tk]`` score matrix into top-left-causal pieces.

    Query i sees keys ``[0, min(Tk, i + diag_offset + 1))``. Returns ``(r0, p, causal_a)``:

    - rows ``[0, r0)`` see no key (out 0, lse −inf);
    - rows ``[r0, Tq)`` × keys ``[p, Tk)`` is one kernel call, top-left causal if ``causal_a``:
      local row t sees local key u iff ``u <= t`` (so rows past ``Tk - p`` see the whole range);
    - rows ``[r0, Tq)`` × keys ``[0, p)``, when ``p > 0``, is a second, non-causal call: every
      row from r0 on sees all of those keys.

    Causal with ``Tq == Tk`` and offset 0 (or with bottom-right offset and ``Tq >= Tk``) is thus
    one call; flash-attn's ``Tq < Tk`` is two calls and a merge.
    """
    if not causal or diag_offset >= Tk - 1:
        return 0, 0, False
    return min(max(-diag_offset, 0), Tq), max(diag_offset, 0), True


def flash_fwd_cpu(q, k, v, softmax_scale: float, causal: bool, diag_offset: int):
    """Attention forward on CPU tensors (inputs already validated by the caller).

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, Hkv, D]``; last dim contiguous, one dtype.
        softmax_scale: multiplies ``q @ k^T``.
        causal, diag_offset: query i sees key j iff ``j <= i + diag_offset`` (when causal).

    Returns:
        ``(out, lse)``: out ``[B, Tq, H, D]`` in q's dtype, lse fp32 ``[B, H, Tq]`` contiguous.
    """
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    r0, p, causal_a = _plan(Tq, Tk, causal, diag_offset)
    if r0 == Tq:
        out = _utils.empty((B, Tq, H, D), dtype=q.dtype, device=q.device).zero_()
        lse = _utils.empty((B, H, Tq), dtype=torch.float32, device=q.device)
        return out, lse.fill_(float("-inf"))
    # The kernel takes [B, H, T, D]; transposed views of [B, T, H, D] are accepted as they are.
    qt, kt, vt = q.transpose(1, 2)[:, :, r0:], k.transpose(1, 2), v.transpose(1, 2)
    out, lse = _fwd(qt, kt[:, :, p:], vt[:, :, p:], 0.0, causal_a, scale=softmax_scale)
    out = out.transpose(1, 2)
    if p > 0:
        out_b, lse_b = _fwd(qt, kt[:, :, :p], vt[:, :, :p], 0.0, False, scale=softmax_scale)
        out, lse = merge_partials(out, lse, out_b.transpose(1, 2), lse_b)
    # The kernel's lse has [B, T, H] storage; callers index it per head.
    lse = lse.contiguous()
    if r0 == 0:
        return out, lse
    # Only now can r0 > 0 (then p == 0): pad the rows that see no key.
    out_all = _utils.empty((B, Tq, H, D), dtype=q.dtype, device=q.device)
    lse_all = _utils.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    out_all[:, :r0].zero_()
    out_all[:, r0:] = out
    lse_all[:, :, :r0].fill_(float("-inf"))
    lse_all[:, :, r0:] = lse
    return out_all, lse_all


def flash_bwd_cpu(dout, q, k, v, out, lse, softmax_scale: float, causal: bool, diag_offset: int):
    """Attention backward on CPU tensors, from the ``(out, lse)`` of :func:`flash_fwd_cpu`.

    Each piece of `_plan` runs the kernel's backward with the *final* out and lse of its rows:
    the kernel recomputes P = exp(s − lse) and Δ = rowsum(dO∘O) from them, so they are the global
    P and Δ restricted to the piece. Hence dq is the sum over pieces and dk/dv of each key range
    come from the one piece that holds it. Rows that see no key are never passed to the kernel
    (it would give NaN for an lse of −inf): their dq is 0 and they add nothing to dk/dv.

    Returns:
        ``(dq, dk, dv)`` with the shapes and dtypes of q, k, v.
    """
    Tq, Tk = q.shape[1], k.shape[1]
    r0, p, causal_a = _plan(Tq, Tk, causal, diag_offset)
    if r0 == Tq:
        return tuple(_utils.empty(x.shape, dtype=x.dtype, device=x.device).zero_() for x in (q, k, v))
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    rows = (dout.transpose(1, 2)[:, :, r0:], q.transpose(1, 2)[:, :, r0:])
    saved = (out.transpose(1, 2)[:, :, r0:], lse[:, :, r0:], 0.0)
    dq, dk, dv = _bwd(*rows, kt[:, :, p:], vt[:, :, p:], *saved, causal_a, scale=softmax_scale)
    dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    if p > 0:
        dq_b, dk_b, dv_b = _bwd(*rows, kt[:, :, :p], vt[:, :, :p], *saved, False, scale=softmax_scale)
        dq = dq + dq_b.transpose(1, 2)
        dk = torch.cat((dk_b.transpose(1, 2), dk), dim=1)
        dv = torch.cat((dv_b.transpose(1, 2), dv), dim=1)
    if r0 == 0:
        return dq, dk, dv
    # Only now can r0 > 0 (then p == 0): rows that see no key get dq = 0.
    dq_all = _utils.empty(q.shape, dtype=q.dtype, device=q.device)
    dq_all[:, :r0].zero_()
    dq_all[:, r0:] = dq
    return dq_all, dk, dv
