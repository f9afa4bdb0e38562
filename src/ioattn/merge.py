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
    # B's share exp(lse_b) / (exp(lse_a) + exp(lse_b)) is a sigmoid of the difference; it is
    # 0 or 1 where one part is empty (lse −inf), and NaN only where both are, whose rows are 0
    # in both parts anyway, so any weight will do there.
    w_b = torch.sigmoid(lse_b - lse_a).nan_to_num_(0.0)
    # Accumulate in fp32 at least (fp64 stays fp64); [B, H, T] -> [B, T, H, 1] over the head dim.
    acc = torch.promote_types(out_a.dtype, torch.float32)
    w_b = w_b.transpose(1, 2).unsqueeze(-1).to(acc)
    out = torch.lerp(out_a.to(acc), out_b.to(acc), w_b)
    return out.to(out_a.dtype), lse


def merge_partials_many(outs, lses):
    """Merge N partial results over pairwise disjoint key sets at once (ring attention's steps
    taken together; split-KV decoding's Triton combine applies the same rule and is tested
    against this).

    Args:
        outs: ``[N, *S, D]`` partial outputs (any float dtype), e.g. ``S = (B, T, H)``.
        lses: ``[N, *S]`` their log-sum-exps, natural log, in the same layout without ``D`` (pass
            a transposed view when lse is kept as ``[B, H, T]``).

    Returns:
        ``(out, lse)``: out ``[*S, D]`` in outs' dtype, lse ``[*S]`` fp32 (fp64 for fp64 lses).
        Parts with lse −inf contribute nothing; a row with −inf in every part gives (0, −inf).
    """
    acc = torch.promote_types(outs.dtype, torch.float32)
    lse = torch.logsumexp(lses.to(torch.promote_types(lses.dtype, torch.float32)), dim=0)
    # exp(lse_i - lse) is each part's share of the softmax mass; it is NaN only where every part is
    # empty (−inf − −inf), whose partial outputs are 0 anyway, so any weight will do there.
    w = torch.exp(lses - lse).nan_to_num_(0.0).to(acc)
    out = (w.unsqueeze(-1) * outs.to(acc)).sum(0)
    return out.to(outs.dtype), lse
