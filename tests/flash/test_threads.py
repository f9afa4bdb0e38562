"""Calls from threads other than the one that set CUDA up (a server's worker, autograd's device
thread): the launchers bind the device's context themselves before Triton fills the TMA
descriptors, a driver call that fails on a thread with no current context."""
import threading

import pytest
import torch

from ioattn import flash_attn_func
from ioattn.flash import fwd
from ioattn.testing import make_qkv

from .cases import DEVICE


def _in_thread(fn):
    """fn() run on a fresh thread: its result, or the exception it raised."""
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised below, in the test's thread
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_bind_context_once_per_thread_and_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: calls.append(device.index))
    monkeypatch.setattr(fwd, "_context_bound", threading.local())

    def twice(index):
        fwd._bind_context(torch.device("cuda", index))
        fwd._bind_context(torch.device("cuda", index))

    twice(0)
    assert calls == [0]
    _in_thread(lambda: twice(0))
    assert calls == [0, 0], "a new thread binds the context again, once"
    twice(1)
    assert calls == [0, 0, 1]


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_first_gpu_work_of_a_thread(D, causal):
    # The same call first here (so the allocator has the blocks cached and the new thread's
    # allocations bind no context either), then on a new thread: the same bits.
    q, k, v = make_qkv(2, 300, 300, 4, 2, D, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    dout = torch.randn_like(q)

    def call():
        # deterministic: the same bits are expected from both threads.
        out = flash_attn_func(q, k, v, causal=causal, deterministic=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    want = call()
    torch.cuda.synchronize()
    got = _in_thread(call)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.equal(a, b), name
