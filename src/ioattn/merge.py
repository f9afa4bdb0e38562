"""Merge partial attention results computed over disjoint sets of keys.

If ``(out_a, lse_a)`` is softmax attention over key set A and ``(out_b, lse_b)`` over a
disjoint set B, attention over A ∪ B is their lse-weighted average:

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

A row that sees no key in a part has lse −inf there and contributes nothing; a row that sees
no key at all stays (out 0, lse −inf). Split-KV decoding and ring attention use this too.
"""
import torch


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Merge two partial results.

    Args:
        out_a, out_b: ``[B, T, H, D]`` partial outputs (any float dtype).
        lse_a, lse_b: ``[B, H, T]`` fp32 natural-log log-sum-exp of each part.

    Returns:
        ``(out, lse)``: out ``[B, T, H, D]`` in out_a's dtype, lse ``[B, H, T]`` fp32.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    # Where both parts are empty lse is −inf and lse_x − lse would be NaN: use 0 weights.
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    w_a = torch.where(finite, torch.exp(lse_a - safe), torch.zeros_like(lse))
    w_b = torch.where(finite, torch.exp(lse_b - safe), torch.zeros_like(lse))
    # [B, H, T] -> [B, T, H, 1] to broadcast over the head dim
    w_a = w_a.transpose(1, 2).unsqueeze(-1)
    w_b = w_b.transpose(1, 2).unsqueeze(-1)
    # Accumulate in fp32 at least (fp64 stays fp64).
    acc = torch.promote_types(out_a.dtype, torch.float32)
    out = w_a.to(acc) * out_a.to(acc) + w_b.to(acc) * out_b.to(acc)
    return out.to(out_a.dtype), lse
