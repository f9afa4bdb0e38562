"""The attention implementations a benchmark compares, all with one signature.

Each peer takes q ``[B, T, H, D]``, k/v ``[B, T, Hkv, D]``, ``causal`` and ``window`` (the causal
sliding window's keys before each query, −1 = none) and returns the output ``[B, T, H, D]``; the
benchmarks use Tq = Tk, where every causal convention agrees.
"""
import math

import torch
import torch.nn.functional as F


def ioattn(q, k, v, causal, window=-1):
    from ioattn import flash_attn_func
    return flash_attn_func(q, k, v, causal=causal, window_size=(window, -1))


def _hidden(T, window, device):
    """``[T, T]`` bool: the pairs a causal (windowed) mask hides."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    hidden = j > i
    if window >= 0:
        hidden |= j < i - window
    return hidden


def naive(q, k, v, causal, window=-1):
    """softmax(Q Kᵀ · scale) V written plainly in the input dtype, scores materialized."""
    group = q.shape[2] // k.shape[2]
    # [B, H, T, D]; each KV head serves `group` consecutive query heads
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (qh @ kh.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # [B, H, T, T]
    if causal:
        scores = scores.masked_fill(_hidden(scores.shape[-1], window, q.device), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ vh).transpose(1, 2)


def sdpa(q, k, v, causal, window=-1):
    """torch's scaled_dot_product_attention with its default backend choice, on [B, H, T, D] views.
    A window is given to it the only way it takes one: as a [T, T] boolean mask."""
    mask = None
    if window >= 0:
        mask = ~_hidden(q.shape[1], window, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=causal and mask is None, enable_gqa=q.shape[2] != k.shape[2],
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
        return lambda: (fn(q, k, v, case.causal, case.window),)

    def fwdbwd():
        out = fn(q, k, v, case.causal, case.window)
        # autograd.grad rather than backward(): nothing accumulates in .grad between repetitions
        return (out, *torch.autograd.grad(out, (q, k, v), dout))
    return fwdbwd
