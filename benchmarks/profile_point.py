"""Where one paper-grid call spends its time on a GPU: host time per call and each kernel's.

    PYTHONPATH=src python3 benchmarks/profile_point.py --D 128 --T 1024 --causal --mode fwdbwd [--peer sdpa-cudnn]

Runs the same callable as `ioattn bench --suite paper` (bench/peers make_call) on the same
shape (bf16, B = 16384 // T, H = 2048 // D). Prints: the median GPU time (do_bench, as the
suite), the host time per call when calls are queued back to back (perf_counter over N calls,
one synchronize at the end; when this exceeds the GPU time the suite times the host), and
cProfile's table of the host time over N calls, and torch.profiler's table of kernels
over 5 calls. Small enough to add to any device call.
"""
import argparse
import time

import torch
import triton

from ioattn.bench.cases import Case
from ioattn.bench.peers import make_call, make_inputs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--mode", choices=["fwd", "fwdbwd"], default="fwdbwd")
    p.add_argument("--peer", default="ioattn")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--cprofile", type=int, default=25, help="rows of cProfile's table of the host time (0: none)")
    args = p.parse_args(argv)
    H = 2048 // args.D
    case = Case(B=16384 // args.T, T=args.T, H=H, Hkv=H, D=args.D, causal=args.causal, dtype="bf16",
                mode=args.mode)
    call = make_call(args.peer, case, make_inputs(case, "cuda"))
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    gpu_ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
    t0 = time.perf_counter()
    for _ in range(args.calls):
        call()
    host_ms = (time.perf_counter() - t0) * 1e3 / args.calls
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(args.calls):
        call()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t1) * 1e3 / args.calls
    print(f"{args.peer} D={args.D} T={args.T} causal={args.causal} {args.mode}: do_bench {gpu_ms:.3f} ms, "
          f"host {host_ms:.3f} ms per call queued, wall {wall_ms:.3f} ms per call", flush=True)
    if args.cprofile:
        from host_cost import print_cprofile

        print_cprofile(call, args.calls, args.cprofile)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60),
          flush=True)


if __name__ == "__main__":
    main()
