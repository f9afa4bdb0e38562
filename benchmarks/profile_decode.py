"""Where an eager decoding step spends its host time on a GPU (cProfile), B = 1 x 1k keys.

    PYTHONPATH=src python3 benchmarks/profile_decode.py [--calls 300] [--rows 30]

H = 32, Hkv = 8, D = 128, bf16, one new token a step. Profiles the step through KVCache
(lengths checked on the host) and flash_attn_with_kvcache with IOATTN_CHECK_VALUES=0 (no checks
at all), each after a warm-up, calls queued back to back; prints µs per call of host and wall
time (host_cost.py's per_call_us) next to cProfile's table. host_cost.py
times the same steps beside cuDNN without the profiler.
"""
import argparse
import os

import torch

from host_cost import per_call_us, print_cprofile
from ioattn import KVCache, flash_attn_with_kvcache


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--rows", type=int, default=30)
    args = p.parse_args(argv)
    D, dt = 128, torch.bfloat16
    q = torch.randn(1, 1, 32, D, device="cuda", dtype=dt)
    knew, vnew = (torch.randn(1, 1, 8, D, device="cuda", dtype=dt) for _ in range(2))
    # Room for the prompt, per_call_us's warm-ups and 5 batches, and the profiled calls.
    cache = KVCache(1, 1024 + 7 * (args.calls + 10), 8, D, device="cuda", dtype=dt)
    cache.attend(torch.randn(1, 1023, 32, D, device="cuda", dtype=dt),
                 *(torch.randn(1, 1023, 8, D, device="cuda", dtype=dt) for _ in range(2)))
    kc, vc = (torch.randn(1, 1024, 8, D, device="cuda", dtype=dt) for _ in range(2))
    lens = torch.full((1,), 1023, dtype=torch.int32, device="cuda")
    steps = {
        "KVCache.attend": lambda: cache.attend(q, knew, vnew),
        "flash_attn_with_kvcache, IOATTN_CHECK_VALUES=0": lambda: flash_attn_with_kvcache(
            q, kc, vc, knew, vnew, cache_seqlens=lens),
    }
    for name, fn in steps.items():
        os.environ["IOATTN_CHECK_VALUES"] = "0" if "CHECK_VALUES" in name else "1"
        host, wall = per_call_us(fn, args.calls)
        print(f"== {name}: host {host:.1f} / wall {wall:.1f} µs a call", flush=True)
        print_cprofile(fn, args.calls, args.rows)
    os.environ["IOATTN_CHECK_VALUES"] = "1"


if __name__ == "__main__":
    main()
