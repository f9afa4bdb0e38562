"""The CPU backend: torch's own CPU flash-attention kernel, driven to cover the ioattn contract.

torch ships a FlashAttention-2 style CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``):
Q is cut into row blocks, K/V into column blocks, the softmax runs online, and the backward
recomputes P from the saved lse, so nothing of size Tq×Tk is ever allocated. It is the kernel
behind ``torch.nn.functional.scaled_dot_product_attention`` on CPU, so this backend runs at SDPA's
speed wherever SDPA covers the case (bf16/fp16 backward aside, see below). What it lacks is any
causal alignment other than top-left; `_plan` reduces the contract's arbitrary ``diag_offset`` to
at most two calls, merged by lse.

GQA/MQA: the kernel maps query head h to KV head ``h // (H // Hkv)`` itself (checked against
SDPA's ``enable_gqa``). Its forward is as fast as with K/V expanded, with no copy, so it beats
folding the groups into the sequence axis (a copy of q and of out) or looping over them (G
calls). Its backward, though, runs one task per (batch, KV head): see `_expand_kv_bwd`.

bf16/fp16: the kernel's forward accumulates in fp32 and is accurate; its backward accumulates
dk/dv in the input dtype across query blocks and, from T ≈ 2048 on, breaks the accuracy rule
(dv 3.6× the error of plain PyTorch in bf16, growing with T; the same errors on AVX2 and AMX
hosts). So the backward always runs in fp32 on upcast copies (linear memory): on an AVX2 host
that is also ~10× faster than the native bf16/fp16 backward, on an AMX host ~1.8× slower. The
forward runs upcast only for fp16 on CPUs without native fp16 matmul (see `_upcast_fwd`).

SDPA's attn_mask: torch's kernel takes an additive mask of the query's dtype and broadcasts it
itself, so a mask goes in compact (`_compact_mask`: broadcast dims back to size 1, bool turned
into 0/−inf at that size, never expanded to B·H·Tq·Tk). Rows the mask hides entirely come back as
out 0 with lse 0; the contract wants lse −inf there, and the backward gets 0 back. A mask with
dropout runs the blocked path below, which reads the mask block by block.

Sliding window, softcap, ALiBi, dropout: a window's right bound alone is causal at a shifted
offset, so it stays on torch's kernel; a left bound, softcap, ALiBi or dropout, which the kernel
cannot express (its dropout draws a mask the backward cannot regenerate), run the blocked
plain-torch implementation of cpu_blocked.py (`_route` decides).
"""
import functools

import torch

from .. import _utils
from ..merge import merge_partials
from .cpu_blocked import blocked_bwd, blocked_fwd

# torch's generated Python binding of the forward costs ~3 µs less per call than torch.ops;
# the backward has none, and its .default overload skips the overload resolution of the packet.
_fwd = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu",
               torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default)
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


def _route(Tq: int, Tk: int, causal: bool, diag_offset: int, window, softcap, alibi_slopes,
           dropout_p=0.0):
    """``(left, right)`` window bounds for the blocked path, or None for torch's kernel.

    Causal is the window's right bound 0; a bound that no (query, key) pair reaches is dropped
    (−1). Without a left bound, softcap or ALiBi, the mask ``j <= i + diag_offset + right`` is
    causal at offset ``diag_offset + right``, which `_plan` turns into kernel calls; so only a
    left bound, softcap, ALiBi or dropout leave torch's kernel.
    """
    left, right = window
    if causal:
        right = 0
    # Query i sees key j iff i + diag_offset − left <= j <= i + diag_offset + right
    if left >= Tq - 1 + diag_offset:
        left = -1
    if right >= Tk - 1 - diag_offset:
        right = -1
    if left < 0 and softcap == 0 and alibi_slopes is None and dropout_p == 0:
        return None
    return left, right


def _kernel_mask(causal: bool, diag_offset: int, window):
    """``(causal, diag_offset)`` for `_plan` when `_route` keeps torch's kernel."""
    right = 0 if causal else window[1]
    return (True, diag_offset + right) if right >= 0 else (False, diag_offset)


@functools.cache
def _upcast_fwd(dtype: torch.dtype) -> bool:
    """Whether the forward should run in fp32 for inputs of ``dtype``.

    Only fp16 on CPUs without oneDNN fp16 support. Measured native vs upcast forward, H=8,
    D=64..128, T=256..2048: on an AVX2 host fp16 runs 1.4-2.0× faster upcast, while bf16 runs
    0.8-1.07× (so bf16 stays native, as in SDPA); on an AMX host (oneDNN fp16 and bf16) native
    is up to 1.5× faster for fp16 and 2-4× for bf16.
    """
    if dtype != torch.float16:
        return False
    try:
        return not torch.ops.mkldnn._is_mkldnn_fp16_supported()
    except (AttributeError, RuntimeError):
        return True


def _compact_mask(attn_mask, dtype):
    """SDPA's mask, expanded to ``[B, H, Tq, Tk]`` by checks.py, as torch's kernel wants it:
    additive, in ``dtype``, with every broadcast (stride 0) dim narrowed back to size 1.
    Also returns the ``[B|1, H|1, Tq, 1]`` bool of rows the mask hides entirely."""
    for dim in range(4):
        if attn_mask.stride(dim) == 0 and attn_mask.shape[dim] > 1:
            attn_mask = attn_mask.narrow(dim, 0, 1)
    if attn_mask.dtype == torch.bool:
        hidden = ~attn_mask.any(dim=-1, keepdim=True)
        mask = torch.zeros(attn_mask.shape, dtype=dtype).masked_fill_(~attn_mask, float("-inf"))
    else:
        mask = attn_mask.to(dtype)
        hidden = (mask == float("-inf")).all(dim=-1, keepdim=True)
    return mask, hidden


def _masked_fwd(q, k, v, softmax_scale, attn_mask):
    """The forward with SDPA's attn_mask (no causal, window, softcap or ALiBi with it: SDPA has
    none of them, and torch's own SDPA refuses is_causal with a mask)."""
    dtype = q.dtype
    if _upcast_fwd(dtype):
        q, k, v = q.float(), k.float(), v.float()
    mask, hidden = _compact_mask(attn_mask, q.dtype)
    out, lse = _fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False,
                    attn_mask=mask, scale=softmax_scale)
    lse = lse.contiguous().masked_fill_(hidden.squeeze(-1), float("-inf"))
    return out.transpose(1, 2).to(dtype), lse


def _masked_bwd(dout, q, k, v, out, lse, softmax_scale, attn_mask):
    """Backward of `_masked_fwd`, in fp32 for fp16/bf16 as below; hidden rows get lse 0 back
    (their P is exp(−inf − 0) = 0, so dq = 0 there and nothing reaches dk, dv)."""
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        dout, q, k, v, out = dout.float(), q.float(), k.float(), v.float(), out.float()
    mask, _ = _compact_mask(attn_mask, q.dtype)
    lse = lse.masked_fill(lse == float("-inf"), 0.0)
    grads = _bwd(*(x.transpose(1, 2) for x in (dout, q, k, v, out)), lse, 0.0, False,
                 attn_mask=mask, scale=softmax_scale)
    return tuple(g.transpose(1, 2).to(dtype) for g in grads)


def _expand_kv_bwd(B: int, H: int, Hkv: int) -> bool:
    """Whether the backward should run on K/V expanded to H heads (then sum dk/dv per group).

    The kernel's GQA backward parallelizes over B·Hkv only (dk/dv of a KV head are written by
    one task). Measured, fp32, D=64, T=1024: 16 threads, B=1, 8:2 heads, native 20.6 ms vs
    expanded 6.4 ms; B=4, 32:8 heads (32 tasks), native 25.8 vs 32.0; 2 threads, B=1, 8:2 native
    29.5 vs 33.7, MQA 8:1 native 33.5 vs 30.1. Expanding costs G× the K/V memory (linear in T).
    """
    return H != Hkv and B * Hkv < torch.get_num_threads()


def _mask_alone(attn_mask, causal, window, softcap, alibi_slopes, dropout_p) -> bool:
    """Whether torch's kernel runs the call with SDPA's mask; with dropout the blocked path does."""
    if attn_mask is None:
        return False
    if causal or window != (-1, -1) or softcap or alibi_slopes is not None:
        raise NotImplementedError("the CPU backend runs attn_mask without causal, window, softcap "
                                  "or ALiBi (SDPA, its one caller, has none of them)")
    return not dropout_p


def flash_fwd_cpu(q, k, v, softmax_scale: float, causal: bool, diag_offset: int, *,
                  window=(-1, -1), softcap: float = 0.0, alibi_slopes=None, attn_mask=None,
                  dropout_p: float = 0.0, seed: int = 0):
    """Attention forward on CPU tensors (inputs already validated by the caller).

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, Hkv, D]``; last dim contiguous, one dtype.
        softmax_scale: multiplies ``q @ k^T``.
        causal, diag_offset: query i sees key j iff ``j <= i + diag_offset`` (when causal).
        window: ``(left, right)``: query i sees keys
            ``[i + diag_offset - left, i + diag_offset + right]``, −1 = unbounded.
        softcap: if > 0, scores become ``softcap · tanh(s / softcap)``.
        alibi_slopes: fp32 ``[H]`` or ``[B, H]``; adds ``−slope · |i + diag_offset − j|``.
        attn_mask: SDPA's mask expanded to ``[B, H, Tq, Tk]`` (bool or additive), alone or with
            dropout.
        dropout_p, seed: when ``dropout_p > 0``, probabilities are kept with probability
            ``1 - dropout_p`` by a mask hashed from ``seed`` (cpu_blocked.keep_mask) and the kept
            ones scaled by ``1 / (1 - dropout_p)``; lse is unchanged.

    Returns:
        ``(out, lse)``: out ``[B, Tq, H, D]`` in q's dtype, lse fp32 ``[B, H, Tq]`` contiguous.
    """
    if _mask_alone(attn_mask, causal, window, softcap, alibi_slopes, dropout_p):
        return _masked_fwd(q, k, v, softmax_scale, attn_mask)
    B, Tq, H, D = q.shape
    dtype = q.dtype
    if softcap or alibi_slopes is not None or window != (-1, -1) or dropout_p:
        bounds = _route(Tq, k.shape[1], causal, diag_offset, window, softcap, alibi_slopes, dropout_p)
        if bounds is not None:
            return blocked_fwd(q, k, v, softmax_scale, diag_offset, *bounds, softcap, alibi_slopes,
                               dropout_p, seed, attn_mask)
        causal, diag_offset = _kernel_mask(causal, diag_offset, window)
    r0, p, causal_a = _plan(Tq, k.shape[1], causal, diag_offset)
    if r0 == Tq:
        out = _utils.empty((B, Tq, H, D), dtype=dtype, device=q.device).zero_()
        lse = _utils.empty((B, H, Tq), dtype=torch.float32, device=q.device)
        return out, lse.fill_(float("-inf"))
    if _upcast_fwd(dtype):
        q, k, v = q.float(), k.float(), v.float()
    # The kernel takes [B, H, T, D]; transposed views of [B, T, H, D] are accepted as they are.
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if r0 == 0 and p == 0:
        # The common case, kept free of slicing: Python overhead shows at small shapes.
        out, lse = _fwd(qt, kt, vt, 0.0, causal_a, scale=softmax_scale)
        # The kernel's lse has [B, T, H] storage; callers index it per head.
        return out.transpose(1, 2).to(dtype), lse.contiguous()
    qt = qt[:, :, r0:]
    out, lse = _fwd(qt, kt[:, :, p:], vt[:, :, p:], 0.0, causal_a, scale=softmax_scale)
    out = out.transpose(1, 2)
    if p > 0:
        out_b, lse_b = _fwd(qt, kt[:, :, :p], vt[:, :, :p], 0.0, False, scale=softmax_scale)
        out, lse = merge_partials(out, lse, out_b.transpose(1, 2), lse_b)
    lse = lse.contiguous()
    if r0 == 0:
        return out.to(dtype), lse
    # Only now can r0 > 0 (then p == 0): pad the rows that see no key.
    out_all = _utils.empty((B, Tq, H, D), dtype=dtype, device=q.device)
    lse_all = _utils.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    out_all[:, :r0].zero_()
    out_all[:, r0:] = out
    lse_all[:, :, :r0].fill_(float("-inf"))
    lse_all[:, :, r0:] = lse
    return out_all, lse_all


def flash_bwd_cpu(dout, q, k, v, out, lse, softmax_scale: float, causal: bool, diag_offset: int,
                  *, window=(-1, -1), softcap: float = 0.0, alibi_slopes=None, attn_mask=None,
                  dropout_p: float = 0.0, seed: int = 0):
    """Attention backward on CPU tensors, from the ``(out, lse)`` of :func:`flash_fwd_cpu`
    (same ``window``, ``softcap``, ``alibi_slopes``, ``dropout_p`` and ``seed``; no gradient to
    the slopes).

    Each piece of `_plan` runs the kernel's backward with the *final* out and lse of its rows:
    the kernel recomputes P = exp(s − lse) and Δ = rowsum(dO∘O) from them, so they are the global
    P and Δ restricted to the piece. Hence dq is the sum over pieces and dk/dv of each key range
    come from the one piece that holds it. Rows that see no key are never passed to the kernel
    (it would give NaN for an lse of −inf): their dq is 0 and they add nothing to dk/dv.

    Returns:
        ``(dq, dk, dv)`` with the shapes and dtypes of q, k, v.
    """
    if _mask_alone(attn_mask, causal, window, softcap, alibi_slopes, dropout_p):
        return _masked_bwd(dout, q, k, v, out, lse, softmax_scale, attn_mask)
    B, Tq, H, _ = q.shape
    Hkv = k.shape[2]
    dtype = q.dtype
    if softcap or alibi_slopes is not None or window != (-1, -1) or dropout_p:
        bounds = _route(Tq, k.shape[1], causal, diag_offset, window, softcap, alibi_slopes, dropout_p)
        if bounds is not None:
            return blocked_bwd(dout, q, k, v, out, lse, softmax_scale, diag_offset, *bounds,
                               softcap, alibi_slopes, dropout_p, seed, attn_mask)
        causal, diag_offset = _kernel_mask(causal, diag_offset, window)
    r0, p, causal_a = _plan(Tq, k.shape[1], causal, diag_offset)
    if r0 == Tq:
        return tuple(_utils.empty(x.shape, dtype=dtype, device=x.device).zero_() for x in (q, k, v))
    if dtype in (torch.float16, torch.bfloat16):
        dout, q, k, v, out = dout.float(), q.float(), k.float(), v.float(), out.float()
    dot, qt, kt, vt, ot = (x.transpose(1, 2) for x in (dout, q, k, v, out))
    expand = _expand_kv_bwd(B, H, Hkv)
    if expand:
        kt, vt = kt.repeat_interleave(H // Hkv, dim=1), vt.repeat_interleave(H // Hkv, dim=1)
    if r0 > 0:
        dot, qt, ot, lse = dot[:, :, r0:], qt[:, :, r0:], ot[:, :, r0:], lse[:, :, r0:]
    if p > 0:
        dq_b, dk_b, dv_b = _bwd(dot, qt, kt[:, :, :p], vt[:, :, :p], ot, lse, 0.0, False,
                                scale=softmax_scale)
        kt, vt = kt[:, :, p:], vt[:, :, p:]
    dq, dk, dv = _bwd(dot, qt, kt, vt, ot, lse, 0.0, causal_a, scale=softmax_scale)
    dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    if p > 0:
        dq = dq + dq_b.transpose(1, 2)
        dk = torch.cat((dk_b.transpose(1, 2), dk), dim=1)
        dv = torch.cat((dv_b.transpose(1, 2), dv), dim=1)
    if expand:
        # [B, Tk, H, D] -> [B, Tk, Hkv, G, D]: the G query heads of a KV head are adjacent
        dk, dv = dk.unflatten(2, (Hkv, H // Hkv)).sum(3), dv.unflatten(2, (Hkv, H // Hkv)).sum(3)
    if r0 == 0:
        return dq.to(dtype), dk.to(dtype), dv.to(dtype)
    # Only now can r0 > 0 (then p == 0): rows that see no key get dq = 0.
    dq_all = _utils.empty(q.shape, dtype=dtype, device=q.device)
    dq_all[:, :r0].zero_()
    dq_all[:, r0:] = dq
    return dq_all, dk.to(dtype), dv.to(dtype)
