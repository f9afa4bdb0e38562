"""Peers that need nothing beyond torch: ioattn itself, naive attention and torch SDPA, the
latter with its default backend choice or pinned to one backend.

Each ``build_*(case)`` returns ``attend(q, k, v)`` taking q ``[B, T, H, D]``, k/v
``[B, T, Hkv, D]`` and returning the output ``[B, T, H, D]``.
"""
import math
import warnings

import torch
import torch.nn.functional as F

from . import PeerSkip


def build_ioattn(case):
    from ioattn import flash_attn_func

    return lambda q, k, v: flash_attn_func(q, k, v, causal=case.causal,
                                           window_size=(case.window, -1))


def _hidden(T, window, device):
    """``[T, T]`` bool: the pairs a causal (windowed) mask hides."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    hidden = j > i
    if window >= 0:
        hidden |= j < i - window
    return hidden


def build_naive(case):
    """softmax(Q Kᵀ · scale) V written plainly in the input dtype, scores materialized."""
    def attend(q, k, v):
        group = q.shape[2] // k.shape[2]
        # [B, H, T, D]; each KV head serves `group` consecutive query heads
        qh = q.transpose(1, 2)
        kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
        vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
        scores = (qh @ kh.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # [B, H, T, T]
        if case.causal:
            scores = scores.masked_fill(_hidden(scores.shape[-1], case.window, q.device),
                                        float("-inf"))
        return (torch.softmax(scores, dim=-1) @ vh).transpose(1, 2)
    return attend


def _sdpa(q, k, v, case):
    """SDPA on [B, H, T, D] views. A window is given to it the only way it takes one: as a
    [T, T] boolean mask."""
    mask = None
    if case.window >= 0:
        mask = ~_hidden(q.shape[1], case.window, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=case.causal and mask is None, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def build_sdpa(case):
    """torch's scaled_dot_product_attention with its default backend choice."""
    return lambda q, k, v: _sdpa(q, k, v, case)


# How torch says that no kernel of the chosen backend takes the case (CUDA, then CPU wording)
_REFUSALS = ("No available kernel", "No viable backend")


def _why_not(backend, q, k, v, case) -> str:
    """torch's own reasons, given as warnings, for refusing ``backend`` on this case."""
    from torch.nn.attention import sdpa_kernel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([backend]):
                _sdpa(q, k, v, case)
        except RuntimeError:
            pass
    reasons = [str(w.message).splitlines()[0] for w in caught]
    # The first warnings say which backend was passed over and why; later ones repeat it
    return "; ".join(reasons[:2])[:240] or "no reason given"


def sdpa_backend(name: str):
    """A builder for SDPA pinned to one backend (``SDPBackend.<name>``); a case the backend
    refuses (a shape, GQA, an explicit mask) raises :class:`PeerSkip` with torch's reasons."""
    def build(case):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, name)

        def attend(q, k, v):
            try:
                with sdpa_kernel([backend]):
                    return _sdpa(q, k, v, case)
            except RuntimeError as e:
                if not any(m in str(e) for m in _REFUSALS):
                    raise
                raise PeerSkip(f"{name} refuses this case: {_why_not(backend, q, k, v, case)}") from None
        return attend
    return build
