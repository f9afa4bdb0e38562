"""The attention implementations a benchmark compares, all with one signature.

Each peer takes q ``[B, T, H, D]``, k/v ``[B, T, Hkv, D]`` and ``causal`` and returns the output
``[B, T, H, D]``; the benchmarks use Tq = Tk, where every causal convention agrees.
"""
import math

import torch
import torch.nn.functional as F


def ioattn_func():
    """``ioattn.flash_attn_func``, the function under test."""
    from ioattn import flash_attn_func
    return flash_attn_func


def backend_for(t: torch.Tensor) -> str:
    """Which ioattn backend a call on ``t`` uses: "triton", "triton-interpreter" or "cpu"."""
    try:
        from ioattn.flash.api import backend_for as api_backend_for
    except ImportError:
        api_backend_for = None
    if api_backend_for is not None:
        return api_backend_for(t)
    from ioattn import _env
    # Mirrors the dispatch rule of DESIGN.md, for trees where the API module predates backend_for.
    if t.device.type == "cuda":
        return "triton"
    return "triton-interpreter" if _env.backend() == "triton" and _env.interpret() else "cpu"


def ioattn(q, k, v, causal):
    return ioattn_func()(q, k, v, causal=causal)


def naive(q, k, v, causal):
    """softmax(Q Kᵀ · scale) V written plainly in the input dtype, scores materialized."""
    group = q.shape[2] // k.shape[2]
    # [B, H, T, D]; each KV head serves `group` consecutive query heads
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (qh @ kh.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # [B, H, T, T]
    if causal:
        T = scores.shape[-1]
        hidden = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ vh).transpose(1, 2)


def sdpa(q, k, v, causal):
    """torch's scaled_dot_product_attention with its default backend choice, on [B, H, T, D] views."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        is_causal=causal, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


PEERS = {"ioattn": ioattn, "sdpa": sdpa, "naive": naive}
