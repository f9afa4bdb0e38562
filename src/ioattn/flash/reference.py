"""Dense reference attention: the specification every backend is tested against.

It materializes the full ``[B, H, Tq, Tk]`` score matrix, so it is for tests and checks only.
"""
import math

import torch


def visible_mask(Tq: int, Tk: int, *, causal: bool, diag_offset: int, window=(-1, -1),
                 device=None) -> torch.Tensor:
    """``[Tq, Tk]`` bool: which keys each query sees.

    Query i sees key j iff ``i + diag_offset - left <= j <= i + diag_offset + right`` where
    ``(left, right) = window`` and −1 leaves that side unbounded; ``causal`` forces right = 0.
    The flash-attn functions use ``diag_offset = Tk - Tq`` (bottom-right alignment; causal with
    Tq=2, Tk=5 gives rows ``11110`` and ``11111``); torch's SDPA uses ``diag_offset = 0``
    (top-left).
    """
    left, right = window
    if causal:
        right = 0
    i = torch.arange(Tq, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if right >= 0:
        keep &= j <= i + diag_offset + right
    if left >= 0:
        keep &= j >= i + diag_offset - left
    return keep


def attention_ref(q, k, v, *, softmax_scale=None, causal=False, diag_offset=None, window=(-1, -1),
                  softcap=0.0, alibi_slopes=None, attn_mask=None, dropout_p=0.0, dropout_mask=None,
                  upcast=True):
    """Reference attention with the ioattn contract.

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, Hkv, D]`` with ``H % Hkv == 0``.
        softmax_scale: defaults to ``1/sqrt(D)``.
        causal: mask keys after the (aligned) diagonal.
        diag_offset: alignment of the diagonal (see :func:`visible_mask`); default ``Tk - Tq``.
        window: ``(left, right)`` sliding window around the aligned diagonal, −1 = unbounded.
        softcap: if > 0, scores become ``softcap · tanh(s / softcap)`` (before the ALiBi bias).
        alibi_slopes: fp32 ``[H]`` or ``[B, H]``; adds ``−slope · |i + diag_offset − j|``.
        attn_mask: torch SDPA's mask, broadcastable to ``[B, H, Tq, Tk]``: bool (False hides the
            key) or float (added to the scaled scores, after softcap and ALiBi).
        dropout_p, dropout_mask: with a bool keep mask ``[B, H, Tq, Tk]``, the probabilities
            (after the softmax) become ``P ∘ mask / (1 − dropout_p)``, as flash-attn's dropout;
            lse is unchanged. The backends' masks come from :func:`ioattn.testing.dropout_mask`.
        upcast: compute in fp64 on CPU or for fp32 inputs, else fp32 (the reference) when True; in the inputs'
            own dtype when False (the "plain PyTorch" baseline of the accuracy rule).

    Returns:
        ``(out, lse)``: out ``[B, Tq, H, D]`` in q's dtype (fp64/fp32 when upcast), lse fp32
        ``[B, H, Tq]`` (natural log). Rows that see no key give out 0 and lse −inf.
        Differentiable in q, k, v.
    """
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    if diag_offset is None:
        diag_offset = Tk - Tq
    if upcast:
        # fp64 on CPU, and for fp32 inputs anywhere (an fp32 reference cannot judge fp32 inputs)
        wide = q.device.type == "cpu" or q.dtype in (torch.float32, torch.float64)
        dt = torch.float64 if wide else torch.float32
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    group = H // Hkv
    # [B, H, T, D]; each KV head serves `group` consecutive query heads
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (qh @ kh.transpose(-1, -2)) * softmax_scale  # [B, H, Tq, Tk]
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        i = torch.arange(Tq, device=q.device)[:, None]
        j = torch.arange(Tk, device=q.device)[None, :]
        # The bias in fp32 at least (as flash-attn adds it): in bf16, distances past 256 would
        # round to steps of 4 or more and make the low-precision baseline meaninglessly loose.
        bias_dtype = torch.promote_types(scores.dtype, torch.float32)
        dist = (i + diag_offset - j).abs().to(bias_dtype)  # [Tq, Tk]
        slopes = alibi_slopes.to(bias_dtype).expand(B, H)[:, :, None, None]
        scores = (scores.to(bias_dtype) - slopes * dist).to(scores.dtype)
    keep = visible_mask(Tq, Tk, causal=causal, diag_offset=diag_offset, window=window, device=q.device)
    scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    lse = torch.logsumexp(scores.float(), dim=-1)  # [B, H, Tq]
    # Rows with no visible key: every score is −inf and softmax would give NaN (in the output
    # and in the gradients); the contract says 0, so give those rows finite scores, then zero them.
    row_empty = (scores == float("-inf")).all(dim=-1, keepdim=True)  # [B, H, Tq, 1]
    scores = scores.masked_fill(row_empty, 0.0)
    probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(row_empty, 0.0)
    if dropout_mask is not None:
        probs = probs.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    out = (probs @ vh).transpose(1, 2)  # [B, Tq, H, D]
    return out, lse
