"""Python's cost on autograd's CUDA worker thread against the calling thread, on a GPU.

    PYTHONPATH=src python3 benchmarks/autograd_thread.py [--profile]

A backward of CUDA tensors runs on autograd's worker thread for that device; ioattn's backward is
Python (an autograd.Function), so at short sequences its host time there is what the GPU waits on
(benchmarks/LOG.md v1.20). Each row times fwd + autograd.grad of an autograd.Function whose
backward does N of one kind of work, with autograd's threads (the default) and with
``torch.autograd.set_multithreading_enabled(False)`` (the backward on the calling thread), and
reports host µs per unit of work; then ioattn's D = 128 causal T = 1024 paper point both ways.
``--profile``: a cProfile of ioattn's backward taken on whichever thread runs it.
``--breakdown``: host µs per call of each step of ioattn's backward (timers around the
functions it calls, no profiler), on both threads, at the paper grid's D = 128 causal T = 1024
(two-pass backward) and T = 2048 (one-pass): which steps grow on the worker thread.
``--handover``: where an empty backward's time goes, as medians of perf_counter stamps: from
``autograd.grad``'s call to the backward's first line, the backward itself, and from its return
to ``autograd.grad`` returning; then the per-unit rows for ways of allocating CUDA memory (which
of them pay the worker thread's extra cost, and whether size matters).
"""
import argparse
import cProfile
import collections
import io
import pstats
import time

import torch

from ioattn import flash_attn_func
from ioattn import launch as launch_module
from ioattn.flash import bwd_fused, bwd_gluon_rows, bwd_preprocess, bwd_tma, ops

from host_cost import per_call_us  # this directory, first on sys.path when run as a script


def _python_loop():
    s = 0
    for i in range(20):
        s += i
    return s


class _Busy(torch.autograd.Function):
    work, n = None, 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        for _ in range(_Busy.n):
            _Busy.work(g)
        return g


# (module, attribute) of each timed step: looked up there at call time by ioattn's backward.
STEPS = [(ops, "_bwd_impl"), (bwd_tma, "flash_bwd_tma"), (bwd_fused, "flash_bwd_fused"),
         (bwd_tma, "hopper_bwd_inputs"), (bwd_fused, "hopper_bwd_inputs"), (bwd_tma, "backward_buffers"),
         (bwd_fused, "backward_buffers"), (bwd_tma, "dq_tma"), (bwd_tma, "dkdv_tma"),
         (bwd_fused, "bwd_preprocess"), (bwd_fused, "fused_pass"), (bwd_fused, "dq_cast"), (bwd_tma, "launch"),
         (bwd_preprocess, "launch"),
         (bwd_gluon_rows, "launch"), (launch_module, "_key"), (torch.cuda.device, "__enter__"),
         (torch.cuda.device, "__exit__")]


def breakdown(point, calls: int = 100) -> None:
    """Print host µs per call of each step in STEPS, worker thread against calling thread."""
    totals = collections.defaultdict(float)

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                totals[name] += time.perf_counter() - t0
        return wrapper

    saved = [(obj, attr, getattr(obj, attr)) for obj, attr in STEPS]
    for obj, attr, fn in saved:
        setattr(obj, attr, timed(f"{getattr(obj, '__name__', obj)}.{attr}", fn))
    rows = {}
    try:
        for threads in (True, False):
            with torch.autograd.set_multithreading_enabled(threads):
                for _ in range(10):
                    point()
                torch.cuda.synchronize()
                totals.clear()
                t0 = time.perf_counter()
                for _ in range(calls):
                    point()
                totals["whole fwd + grad"] = time.perf_counter() - t0
                torch.cuda.synchronize()
            rows[threads] = dict(totals)
    finally:
        for obj, attr, fn in saved:
            setattr(obj, attr, fn)
    for name in rows[True]:
        w, c = rows[True][name] / calls * 1e6, rows[False].get(name, 0.0) / calls * 1e6
        print(f"  {name:44s} worker {w:7.1f} µs  calling thread {c:7.1f} µs", flush=True)


class _Stamped(torch.autograd.Function):
    """Identity whose backward records when it starts and ends (``stamps``)."""
    stamps = []

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        t = time.perf_counter()
        _Stamped.stamps.append((t, time.perf_counter()))
        return g


def handover(calls: int = 400) -> None:
    """Median µs of the three legs of an empty backward's call (module docstring), both threads."""
    x = torch.randn(16, device="cuda", requires_grad=True)
    ones = torch.ones_like(x)
    for threads in (True, False):
        legs = []
        with torch.autograd.set_multithreading_enabled(threads):
            for i in range(calls + 20):
                _Stamped.stamps.clear()
                t0 = time.perf_counter()
                torch.autograd.grad(_Stamped.apply(x), (x,), ones)
                t3 = time.perf_counter()
                t1, t2 = _Stamped.stamps[0]
                if i >= 20:
                    legs.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
        med = [sorted(leg[j] for leg in legs)[len(legs) // 2] * 1e6 for j in range(4)]
        print(f"{'worker' if threads else 'calling'} thread: call to backward {med[0]:6.1f} µs, backward "
              f"{med[1]:5.1f}, return to caller {med[2]:6.1f}, whole {med[3]:6.1f}", flush=True)


def alloc_work(g16):
    """Ways of allocating CUDA memory a backward might use, keyed by name."""
    big = (16, 1024, 16, 128)
    return {
        "torch.empty(16, device=g.device)": lambda g: torch.empty(16, device=g.device),
        "torch.empty(16, device='cuda')": lambda g: torch.empty(16, device="cuda"),
        "torch.empty_like(g)": lambda g: torch.empty_like(g),
        "g.new_empty(16)": lambda g: g.new_empty(16),
        "torch.zeros(16, device=g.device)": lambda g: torch.zeros(16, device=g.device),
        "aten.empty.memory_format": lambda g: torch.ops.aten.empty.memory_format([16], dtype=g.dtype,
                                                                                 device=g.device),
        "torch.empty(64 MB bf16)": lambda g: torch.empty(big, dtype=torch.bfloat16, device=g.device),
        "g.clone()": lambda g: g.clone(),
        "torch.add(g16, 1.0)": lambda g: torch.add(g16, 1.0),
    }


def both_ways(fn, calls: int = 200) -> tuple[float, float]:
    """(worker thread, calling thread) host µs per call of ``fn`` (host_cost.py's medians)."""
    worker = per_call_us(fn, calls)[0]
    with torch.autograd.set_multithreading_enabled(False):
        calling = per_call_us(fn, calls)[0]
    return worker, calling


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", action="store_true", help="cProfile ioattn's backward on its thread")
    p.add_argument("--breakdown", action="store_true", help="time each step of ioattn's backward on both threads")
    p.add_argument("--handover", action="store_true", help="the legs of an empty backward; ways of allocating")
    args = p.parse_args(argv)
    if args.breakdown:
        for T in (1024, 2048):
            q, k, v = (torch.randn(16384 // T, T, 16, 128, device="cuda", dtype=torch.bfloat16,
                                   requires_grad=True) for _ in range(3))
            dout = torch.randn_like(q)
            print(f"D = 128 causal T = {T}, B = {16384 // T}, H = 16: host µs per call", flush=True)
            breakdown(lambda: torch.autograd.grad(flash_attn_func(q, k, v, causal=True), (q, k, v), dout))
        return
    t16 = torch.empty(16, device="cuda")
    if args.handover:
        handover()
    work = alloc_work(t16) if args.handover else {
        "pure Python (20-step loop)": lambda g: _python_loop(),
        "tensor.stride()": lambda g: g.stride(),
        "tensor.data_ptr()": lambda g: g.data_ptr(),
        "torch.empty(16), CPU": lambda g: torch.empty(16),
        "torch.empty(16), CUDA": lambda g: torch.empty(16, device=g.device),
        "g.new_empty(16), CUDA": lambda g: g.new_empty(16),
        "torch.cuda.device(g.device) entered": lambda g: torch.cuda.device(g.device).__enter__() or None,
        "torch.add, CUDA": lambda g: torch.add(t16, 1.0),
        "torch.cuda.current_stream()": lambda g: torch.cuda.current_stream(),
    }
    x = torch.randn(16, device="cuda", requires_grad=True)
    ones = torch.ones_like(x)

    def busy():
        return torch.autograd.grad(_Busy.apply(x), (x,), ones)

    _Busy.work, _Busy.n = None, 0
    base_w, base_c = both_ways(busy)
    print(f"{'empty backward, whole call':32s} worker {base_w:7.1f} µs  calling thread {base_c:7.1f} µs", flush=True)
    n = 50
    for name, fn in work.items():
        _Busy.work, _Busy.n = fn, n
        w, c = both_ways(busy)
        print(f"{name:32s} worker {(w - base_w) / n:7.2f} µs  calling thread {(c - base_c) / n:7.2f} µs each",
              flush=True)

    if args.handover:
        return
    q, k, v = (torch.randn(16, 1024, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)

    def point():
        return torch.autograd.grad(flash_attn_func(q, k, v, causal=True), (q, k, v), dout)

    w, c = both_ways(point, 100)
    print(f"{'ioattn D128 causal T1024 fwd+bwd':32s} worker {w:7.1f} µs  calling thread {c:7.1f} µs", flush=True)
    if not args.profile:
        return
    impl = ops._bwd_impl
    prof = cProfile.Profile()

    def profiled(*a, **kw):
        # Enabled on the thread that runs the backward (cProfile sees only its own thread).
        prof.enable()
        try:
            return impl(*a, **kw)
        finally:
            prof.disable()

    for threads in (True, False):
        prof = cProfile.Profile()
        with torch.autograd.set_multithreading_enabled(threads):
            for _ in range(10):
                point()
            ops._bwd_impl = profiled
            try:
                for _ in range(100):
                    point()
            finally:
                ops._bwd_impl = impl
            torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).strip_dirs().sort_stats("tottime").print_stats(25)
        print(f"== backward, {'worker' if threads else 'calling'} thread, 100 calls\n{out.getvalue()}", flush=True)


if __name__ == "__main__":
    main()
