"""Run a list of cases against the peers: check each peer against ioattn, then time it and
measure its peak memory, on the same fresh inputs."""
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .cases import Case
from .flops import attention_flops, tflops
from .memory import CpuMemoryWorker, cuda_peak_mib
from .peers import PeerSkip, make_call, make_inputs

# Loose agreement with ioattn, relative to the largest magnitude of each tensor: enough to catch a
# peer (or ioattn) computing something else, far above the rounding of the input precision.
_MATCH_RTOL = {"bf16": 5e-2, "fp16": 2e-2, "fp32": 2e-3}


@dataclass
class Result:
    case: Case
    peer: str
    # "ok", "OOM", "skipped: <why>" (the peer does not run this case), or "error: <message>"
    status: str = "ok"
    ms: Optional[float] = None
    tflops: Optional[float] = None
    peak_mib: Optional[float] = None
    # max |peer − ioattn| / max |ioattn| over the output (and dq, dk, dv with a backward)
    rel_diff: Optional[float] = None
    match: Optional[bool] = None


def time_ms(call, device: str, *, quick: bool = False) -> float:
    """Median milliseconds of ``call`` after warm-up."""
    if device == "cuda":
        from triton.testing import do_bench

        warmup, rep = (5, 20) if quick else (25, 100)
        return do_bench(call, warmup=warmup, rep=rep, return_mode="median")
    # Warm-up of at least two calls and 50 ms: the first calls pay for thread pools and page faults
    warm_until = time.perf_counter() + (0.0 if quick else 0.05)
    for i in range(50):
        call()
        if i >= 1 and time.perf_counter() >= warm_until:
            break
    min_reps, min_s, max_reps = (2, 0.0, 3) if quick else (3, 0.3, 50)
    times, start = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_s and len(times) < max_reps):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _is_oom(e: Exception) -> bool:
    msg = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in msg or "can't allocate" in msg


def _guarded(result: Result, fn):
    """fn(), recording a skip, an OOM or an error in ``result`` instead of ending the sweep."""
    try:
        return fn()
    except PeerSkip as e:
        result.status = f"skipped: {e}"
    except Exception as e:
        result.status = "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {e}".splitlines()[0][:300]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return None


def _rel_diff(outs, ref) -> float:
    worst = 0.0
    for x, r in zip(outs, ref):
        scale = r.detach().abs().max().item() or 1.0
        worst = max(worst, (x.detach().float() - r.detach().float()).abs().max().item() / scale)
    return worst


def run_case(case: Case, peers, device: str, *, limits=None, quick: bool = False,
             cpu_memory: Optional[CpuMemoryWorker] = None, progress=None) -> list:
    """All peers on one case: a correctness check against ioattn first, then time and memory.
    ``limits`` (peer -> cases.Limit) names the cases a peer sits out."""
    results = {p: Result(case, p) for p in peers}
    for p, limit in (limits or {}).items():
        if p in results and limit.excludes(case):
            results[p].status = f"skipped: {limit.why}"
    inputs = make_inputs(case, device)
    # Building a peer (a block mask, a compiled function) is not timed, and may refuse the case
    calls = {p: _guarded(r, lambda: make_call(p, case, inputs))
             for p, r in results.items() if r.status == "ok"}
    ref = None
    if "ioattn" in results and results["ioattn"].status == "ok":
        ref = _guarded(results["ioattn"], calls["ioattn"])
    for p, r in results.items():
        if p == "ioattn" or r.status != "ok" or ref is None:
            continue
        outs = _guarded(r, calls[p])
        if outs is not None:
            r.rel_diff = _rel_diff(outs, ref)
            r.match = r.rel_diff <= _MATCH_RTOL[case.dtype]
        del outs
    del ref
    for p, r in results.items():
        if r.status == "ok":
            r.ms = _guarded(r, lambda: time_ms(calls[p], device, quick=quick))
        if r.status == "ok":
            r.tflops = tflops(attention_flops(case.B, case.H, case.T, case.T, case.D,
                                              causal=case.causal, mode=case.mode,
                                              window=case.window), r.ms)
            if device == "cuda":
                r.peak_mib = _guarded(r, lambda: cuda_peak_mib(calls[p]))
            elif cpu_memory is not None:
                peak = cpu_memory.peak_mib(case, p)
                r.peak_mib = peak if isinstance(peak, float) else None
        if progress is not None:
            progress.update(1)
    return list(results.values())


def run(cases, peers, device: str, *, limits=None, quick: bool = False, bar: bool = True) -> list:
    """Every case in order, with a progress bar on stderr; returns one Result per (case, peer).

    An interrupt (Ctrl-C, or SIGTERM where the caller maps it to one, as `ioattn bench` does for
    a time limit) ends the sweep after the cases that finished, which are returned: a suite cut
    short still reports what it measured."""
    progress = None
    if bar:
        try:
            from tqdm import tqdm

            progress = tqdm(total=len(cases) * len(peers), file=sys.stderr, unit="run", leave=False)
        except ImportError:
            pass
    worker = CpuMemoryWorker() if device == "cpu" else None
    results = []
    try:
        for case in cases:
            if progress is not None:
                progress.set_description(f"{case.series} T={case.T}")
            results += run_case(case, peers, device, limits=limits, quick=quick,
                                cpu_memory=worker, progress=progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: reporting the {len({id(r.case) for r in results})} of {len(cases)} "
              "cases that finished", file=sys.stderr)
    finally:
        if worker is not None:
            worker.close()
        if progress is not None:
            progress.close()
    return results
