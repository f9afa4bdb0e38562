"""The attention implementations a benchmark compares, all with one signature.

Each peer takes q ``[B, T, H, D]``, k/v ``[B, T, Hkv, D]`` and ``causal`` and returns the output
``[B, T, H, D]``; the benchmarks use Tq = Tk, where every causal convention agrees.
"""
import math

import torch
import torch.nn.functional as F


def ioattn(q, k, v, causal):
    from ioattn import flash_attn_func
    return flash_attn_func(q, k, v, causal=causal)


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


def make_inputs(case, device):
    """Fresh random-normal q, k, v (and dout when the case runs the backward) for ``case``."""
    from ioattn.testing import make_qkv

    q, k, v = make_qkv(case.B, case.T, case.T, case.H, case.Hkv, case.D, dtype=case.torch_dtype,
                       device=device, requires_grad=case.mode == "fwdbwd")
    dout = torch.randn_like(q) if case.mode == "fwdbwd" else None
    return q, k, v, dout


def make_call(peer: str, case, inputs):
    """A no-argument callable doing one timed unit of work: the forward, or forward + backward.

    It returns what it computed (the output, and dq, dk, dv after a backward) so that the same
    callable also serves the correctness check.
    """
    fn = PEERS[peer]
    q, k, v, dout = inputs
    if case.mode == "fwd":
        return lambda: (fn(q, k, v, case.causal),)

    def fwdbwd():
        out = fn(q, k, v, case.causal)
        # autograd.grad rather than backward(): nothing accumulates in .grad between repetitions
        return (out, *torch.autograd.grad(out, (q, k, v), dout))
    return fwdbwd
