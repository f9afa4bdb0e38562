"""Host time of each step of a short training call on a GPU, piece by piece.

    PYTHONPATH=src python3 benchmarks/host_cost.py [--D 128] [--T 512] [--causal]

Short paper-grid calls (T = 512, and T = 1024 at D = 128) are host-bound: do_bench times the
host, not the kernels (benchmarks/LOG.md, v1.11). This splits that host time: each row is a
step run N times back to back with one synchronize after them, reported as µs per call of host
time (perf_counter until the last call returned, before the synchronize) and of wall time
(after it). A tiny shape (B = 1, H = 2, T = 128), where the kernels take a few µs, shows the host
cost alone; the paper shape shows it beside the kernels. The "/triton" columns repeat both with
IOATTN_FAST_LAUNCH=0 (every launch through JITFunction.run instead of ioattn/launch.py's cache);
"launcher only" rows call a compiled kernel's launcher directly, the floor of a launch.
"""
import argparse
import gc
import os
import statistics
import time

import torch
import triton
import triton.language as tl

from ioattn import KVCache, flash_attn_func, flash_attn_with_kvcache
from ioattn.decode.append import append_kv_triton
from ioattn.decode.ops import append_kv
from ioattn.decode.rotary import apply_rotary, rotary_positions
from ioattn.decode.rotary_kernel import rotary_q_triton
from ioattn.flash import bwd_tma, fwd_gluon, fwd_pingpong, fwd_tma, ops
from ioattn.flash.config import get_gluon_fwd_config, get_tma_bwd_config
from ioattn.flash.tma import head_major_desc


@triton.jit
def _noop_kernel(X):
    pass


@triton.jit
def _noop_desc_kernel(d0, d1, d2, d3, X, n, BLOCK: tl.constexpr):
    pass


def per_call_us(fn, n: int, repeats: int = 5) -> tuple[float, float]:
    """Median over ``repeats`` batches of ``n`` calls, with Python's garbage collector off: a
    full collection (100+ ms in a process with torch loaded) lands in one batch of a mean and
    would be charged to whichever step ran then."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    gc.collect()
    gc.disable()
    try:
        hosts, walls = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            hosts.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return statistics.median(hosts) / n * 1e6, statistics.median(walls) / n * 1e6


def print_cprofile(fn, n: int, rows: int) -> None:
    """cProfile of ``n`` calls of ``fn`` (the GPU work waited for after), the ``rows`` functions
    with the most time of their own."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(rows)


def launcher_only(jit_fn, launch):
    """The call that ``launch()`` makes of ``jit_fn``, replayed straight into its compiled
    kernel's launcher: what a launch costs without JITFunction.run's binding, specialization
    and cache lookup (the descriptors are still filled in, by the launcher)."""
    seen = {}
    run = jit_fn.run

    def capture(*args, grid, warmup, **kwargs):
        seen.update(args=args, grid=grid, kwargs=kwargs)
        return run(*args, grid=grid, warmup=warmup, **kwargs)

    jit_fn.run = capture
    fast = os.environ.get("IOATTN_FAST_LAUNCH")
    os.environ["IOATTN_FAST_LAUNCH"] = "0"  # through JITFunction.run even where launch.py has a plan
    try:
        launch()
    finally:
        jit_fn.run = run
        os.environ["IOATTN_FAST_LAUNCH"] = fast if fast is not None else "1"
    args, grid, kwargs = seen["args"], seen["grid"], seen["kwargs"]
    compiled = run(*args, grid=grid, warmup=True, **kwargs)
    compiled._init_handles()
    bound, _, _ = jit_fn.device_caches[torch.cuda.current_device()][4](*args, **kwargs)
    values = list(bound.values())
    grid = tuple(grid) + (1,) * (3 - len(grid))

    def call():
        stream = torch.cuda.current_stream().cuda_stream
        compiled.run(*grid, stream, compiled.function, compiled.packed_metadata, None, None, None, *values)

    return call


def steps(B, T, H, D, causal):
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    scale = D ** -0.5
    with torch.no_grad():
        out, lse = ops._fwd_impl(q, k, v, None, None, scale, causal, 0, -1, -1, 0.0, 0.0, None)
    gcfg = get_gluon_fwd_config(D, q.dtype, causal, T)
    bcfg = get_tma_bwd_config(D, q.dtype, causal, interpret=False, seqlen=T)
    delta, dq, dk, dv = bwd_tma.backward_buffers(q, k, v)
    x = torch.empty(1, device="cuda")
    descs = [head_major_desc(t.detach(), 64) for t in (q, k, v, out)]

    def fwdbwd():
        o = flash_attn_func(q, k, v, causal=causal)
        torch.autograd.grad(o, (q, k, v), dout)

    def fwdbwd_backward():
        o = flash_attn_func(q, k, v, causal=causal)
        o.backward(dout)

    def sdpa_fwdbwd():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
            torch.autograd.grad(o, (q, k, v), dout.transpose(1, 2))

    class Ident(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a.view_as(a)

        @staticmethod
        def backward(ctx, g):
            return g

    def autograd_only():
        o = Ident.apply(q)
        torch.autograd.grad(o, (q,), dout)

    qd = q.detach()
    rows = {
        "torch.empty [B,T,H,D]": lambda: torch.empty(B, T, H, D, device="cuda", dtype=torch.bfloat16),
        "triton launch, 1 pointer": lambda: _noop_kernel[(1,)](x),
        "triton launch, 4 descriptors": lambda: _noop_desc_kernel[(1,)](*descs, x, T, BLOCK=64),
        "4 x head_major_desc": lambda: [head_major_desc(t, 64) for t in (qd, qd, qd, qd)],
        "autograd: identity Function fwd+grad": autograd_only,
        "fwd: Triton TMA launcher": lambda: fwd_tma.flash_fwd_tma(qd, k.detach(), v.detach(), scale, causal, 0),
        "bwd: dq_tma": lambda: bwd_tma.dq_tma(qd, k.detach(), v.detach(), dout, out, lse, delta, dq, scale,
                                              causal, 0, bcfg),
        "bwd: dkdv_tma": lambda: bwd_tma.dkdv_tma(qd, k.detach(), v.detach(), dout, lse, delta, dk, dv, scale,
                                                  causal, 0, bcfg),
        "bwd: flash_bwd_tma": lambda: bwd_tma.flash_bwd_tma(dout, qd, k.detach(), v.detach(), out, lse, scale,
                                                            causal, 0),
        "bwd: ops._bwd_impl": lambda: ops._bwd_impl(dout, qd, k.detach(), v.detach(), out, lse, None, None, scale,
                                                    causal, 0, -1, -1, 0.0, 0.0, None),
        "fwd: ops._fwd_impl": lambda: ops._fwd_impl(qd, k.detach(), v.detach(), None, None, scale, causal, 0, -1,
                                                    -1, 0.0, 0.0, None),
        "fwd: flash_attn_func, no grad": lambda: flash_attn_func(qd, k.detach(), v.detach(), causal=causal),
        "fwd: flash_attn_func, recording": lambda: flash_attn_func(q, k, v, causal=causal),
        "fwd+bwd: autograd.grad": fwdbwd,
        "fwd+bwd: .backward": fwdbwd_backward,
        "fwd+bwd: cuDNN SDPA": sdpa_fwdbwd,
    }
    rows["bwd: dq launcher only"] = launcher_only(bwd_tma._bwd_dq_tma_kernel, rows["bwd: dq_tma"])
    # Eager decoding, B = 1 x 1024 keys (H = 32, Hkv = 8): with its index checks (one transfer of
    # the lengths to the host) and without
    qdec = torch.randn(1, 1, 32, D, device="cuda", dtype=torch.bfloat16)
    kc, vc = (torch.randn(1, 1024, 8, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lens = torch.full((1,), 1024, dtype=torch.int32, device="cuda")
    rows["decode B1 1k, index checks"] = lambda: flash_attn_with_kvcache(qdec, kc, vc, cache_seqlens=lens)

    def decode_unchecked():
        os.environ["IOATTN_CHECK_VALUES"] = "0"
        flash_attn_with_kvcache(qdec, kc, vc, cache_seqlens=lens)
        os.environ["IOATTN_CHECK_VALUES"] = "1"

    rows["decode B1 1k, IOATTN_CHECK_VALUES=0"] = decode_unchecked

    def decode_cudnn():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                qdec.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), enable_gqa=True)

    rows["decode B1 1k: cuDNN SDPA"] = decode_cudnn
    # A decoding step as generation loops make it: one new token appended at 1023, then attended.
    # The append alone two ways: the torch ops it was before append.py (still the CPU backend's),
    # with the new lengths they fed the kernel, and append.py's single launch.
    knew, vnew = (torch.randn(1, 1, 8, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lens_before = lens - 1
    rows["decode B1 1k + append, index checks"] = lambda: flash_attn_with_kvcache(qdec, kc, vc, knew, vnew,
                                                                                  cache_seqlens=lens_before)
    # The same step through KVCache, which checks the lengths on its host copy (no read-back):
    # a cache holding 1023 tokens, one appended per call (the few hundred calls of a row stay
    # well inside its 4096 rows).
    kv_cache = KVCache(1, 4096, 8, D, device="cuda")
    kv_cache.attend(torch.randn(1, 1023, 32, D, device="cuda", dtype=torch.bfloat16),
                    *(torch.randn(1, 1023, 8, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)))
    rows["decode B1 1k + append: KVCache.attend"] = lambda: kv_cache.attend(qdec, knew, vnew)
    rows["decode append: torch ops"] = lambda: (append_kv(kc, vc, knew, vnew, lens_before), lens_before + 1)
    rows["decode append: append.py"] = lambda: append_kv_triton(kc, vc, knew, vnew, lens_before)
    # With rotary tables (rotary_dim = D): the step, and the rotation of q and the new k as the
    # torch ops the CPU backend runs against rotary_kernel.py's launch for q (k's rotation rides
    # in the append's launch).
    cos, sin = (torch.rand(2048, D // 2, device="cuda").to(torch.bfloat16) for _ in range(2))
    rows["decode B1 1k + append + rotary"] = lambda: flash_attn_with_kvcache(
        qdec, kc, vc, knew, vnew, cos, sin, cache_seqlens=lens_before, causal=True)
    rows["rotary q and k: torch ops"] = lambda: (
        apply_rotary(qdec, cos, sin, rotary_positions(lens_before, 1), interleaved=True),
        apply_rotary(knew, cos, sin, rotary_positions(lens_before, 1), interleaved=True))
    rows["rotary q: rotary_kernel.py"] = lambda: rotary_q_triton(qdec, cos, sin, lens_before, interleaved=True,
                                                                 same_position=False)
    if gcfg is not None:
        gluon_fwd = fwd_pingpong.gluon_launcher(gcfg)
        rows["fwd: Gluon launcher"] = lambda: gluon_fwd(qd, k.detach(), v.detach(), scale, causal, 0, config=gcfg)
        kernel = (fwd_pingpong._fwd_pingpong_kernel if gcfg.pingpong else
                  fwd_gluon._fwd_gluon_ws_kernel if gcfg.warp_specialize else fwd_gluon._fwd_gluon_kernel)
        rows["fwd: Gluon launcher only"] = launcher_only(kernel, rows["fwd: Gluon launcher"])
    return rows


def direct_ab(shape, calls: int, rounds: int = 3) -> None:
    """Host µs of a few rows with launch.py's direct descriptor launches on and off (off:
    every plan calls Triton's launcher, which encodes the descriptors again), alternated."""
    from ioattn import launch as launch_mod
    original = launch_mod._direct
    rows = steps(*shape)
    names = ["fwd: Gluon launcher", "bwd: flash_bwd_tma", "fwd+bwd: autograd.grad"]
    try:
        for r in range(rounds):
            for on in (True, False):
                launch_mod._direct = original if on else (lambda compiled: None)
                launch_mod._PLANS.clear()
                launch_mod._SITES.clear()
                cells = "  ".join(f"{n} {per_call_us(rows[n], calls)[0]:6.1f}" for n in names)
                print(f"round {r} direct {'on ' if on else 'off'}: {cells}", flush=True)
    finally:
        launch_mod._direct = original
        launch_mod._PLANS.clear()
        launch_mod._SITES.clear()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--direct-ab", action="store_true",
                   help="only: a few rows with direct descriptor launches on and off, alternated")
    args = p.parse_args(argv)
    H = 2048 // args.D
    paper = (16384 // args.T, args.T, H, args.D, args.causal)
    if args.direct_ab:
        direct_ab(paper, args.calls)
        return
    tiny = (1, 128, 2, args.D, args.causal)
    table = {}
    for name, shape, fast in (("tiny", tiny, "1"), ("paper", paper, "1"), ("tiny/triton", tiny, "0"),
                              ("paper/triton", paper, "0")):
        # "/triton": every launch through JITFunction.run (IOATTN_FAST_LAUNCH=0), for comparison
        os.environ["IOATTN_FAST_LAUNCH"] = fast
        rows = steps(*shape)
        for row, fn in rows.items():
            try:
                table.setdefault(row, {})[name] = per_call_us(fn, args.calls)
            except Exception as e:  # one failing step should not hide the others
                print(f"{row} ({name}): {type(e).__name__}: {e}".splitlines()[0], flush=True)
    print(f"host cost, µs per call (host / wall, medians of 5 x {args.calls} calls), D={args.D} "
          f"causal={args.causal}, tiny B1 T128 H2, paper B{paper[0]} T{paper[1]} H{paper[2]}")
    for row, cols in table.items():
        cells = "  ".join(f"{n} {h:6.1f} / {w:6.1f}" for n, (h, w) in cols.items())
        print(f"{row:38s} {cells}", flush=True)


if __name__ == "__main__":
    main()
