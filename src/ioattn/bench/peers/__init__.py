"""The attention implementations a benchmark compares, as data: one :class:`Peer` per name.

A peer's ``build(case)`` returns ``attend(q, k, v)``: q ``[B, T, H, D]``, k/v ``[B, T, Hkv, D]``
in, the output ``[B, T, H, D]`` out. Whatever a peer prepares once per case (a block mask, a
compiled function) happens in ``build``, outside the timed calls. The benchmarks use Tq = Tk,
where every causal convention agrees. A peer that cannot run here says why (``unavailable``);
one that cannot run a given case raises :class:`PeerSkip` with the reason.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch


class PeerSkip(Exception):
    """This peer does not run this case (a shape or feature it lacks); the message says why."""


@dataclass(frozen=True)
class Peer:
    name: str
    doc: str
    build: Callable
    # device ("cpu" or "cuda") -> None if the peer runs there, else the reason it does not
    unavailable: Callable[[str], Optional[str]] = lambda device: None


def _cuda_only(device: str) -> Optional[str]:
    return None if device == "cuda" else "needs a CUDA GPU"


# Imported after PeerSkip, which they take from here
from . import fa4, flex, plain  # noqa: E402

PEERS = {p.name: p for p in (
    Peer("ioattn", "this library's flash_attn_func", plain.build_ioattn),
    Peer("sdpa", "torch SDPA, default backend choice (cuDNN on the H200)", plain.build_sdpa),
    Peer("sdpa-cudnn", "torch SDPA pinned to the cuDNN backend", plain.sdpa_backend("CUDNN_ATTENTION"),
         _cuda_only),
    Peer("sdpa-flash", "torch SDPA pinned to its FlashAttention-2 backend",
         plain.sdpa_backend("FLASH_ATTENTION"), _cuda_only),
    Peer("sdpa-efficient", "torch SDPA pinned to the memory-efficient backend",
         plain.sdpa_backend("EFFICIENT_ATTENTION"), _cuda_only),
    Peer("flex", "FlexAttention, torch.compile'd, causal as a block mask", flex.build_flex,
         flex.unavailable),
    Peer("fa4", "FlashAttention-4 (flash_attn.cute)", fa4.build_fa4, fa4.unavailable),
    Peer("naive", "softmax(QK^T)V in plain torch, scores materialized", plain.build_naive),
)}

# What `ioattn bench` compares without --peers. On a GPU: the peers of the anchors (sdpa is
# left out there: it is sdpa-cudnn under another name); on a CPU only these three run.
DEFAULT_PEERS = {
    "cuda": ("ioattn", "sdpa-cudnn", "sdpa-flash", "flex", "fa4", "naive"),
    "cpu": ("ioattn", "sdpa", "naive"),
}


def split_available(names, device: str) -> tuple:
    """(the peers of ``names`` that run on ``device``, {peer: why not} for the others)."""
    runs, skipped = [], {}
    for name in names:
        why = PEERS[name].unavailable(device)
        if why is None:
            runs.append(name)
        else:
            skipped[name] = why
    return runs, skipped


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
    attend = PEERS[peer].build(case)
    q, k, v, dout = inputs
    if case.mode == "fwd":
        return lambda: (attend(q, k, v),)

    def fwdbwd():
        out = attend(q, k, v)
        # autograd.grad rather than backward(): nothing accumulates in .grad between repetitions
        return (out, *torch.autograd.grad(out, (q, k, v), dout))
    return fwdbwd
