"""Host time of eager decoding steps with the decode launches on call sites and without.

    PYTHONPATH=src python3 benchmarks/ab_decode_host.py [--calls 200] [--rounds 3] [--profile 0] [--ab sites]

B = 1 x 1k keys, H = 32, Hkv = 8, D = 128, bf16 (the decode suite's smallest point, where an
eager call is all host time). Each row is a step run ``--calls`` times back to back
(host_cost.py's per_call_us: µs per call of host time until the last call returned, and of
wall time after a synchronize). "sites off" sends the split-KV, combine, append and rotary
launches through launch.py's ``launch`` (its key and argument list built on every call), as
before they had call sites; rounds alternate on and off. cuDNN's SDPA on the same cache is timed
in each round as the host's yardstick (hosts differ between machines and within a run).
``--profile N`` also prints cProfile's table of N calls of the unchecked step with sites on.
``--ab index`` alternates instead the value checks' gathering of the index vectors by
index_check.py's kernel (on) and by torch ops (off), sites on in both.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from host_cost import per_call_us, print_cprofile  # noqa: E402
from ioattn import KVCache, flash_attn_with_kvcache, launch  # noqa: E402
from ioattn.decode import append, checks, combine, kernel, ops, rotary_kernel  # noqa: E402

MODULES = (kernel, combine, append, rotary_kernel)


def sites(on: bool) -> None:
    """The decode launchers' launch_site, or one that never keeps a site (key None)."""
    for m in MODULES:
        m.launch_site = launch.launch_site if on else (lambda key, build: launch.launch_site(None, build))
    launch._SITES.clear()


def index_kernel(on: bool) -> None:
    """The value checks with index_check.py's kernel (as the Triton backend runs them) or with
    the CPU backend's torch ops."""
    real = checks.check_kvcache_values
    ops.check_kvcache_values = real if on else (lambda *a, kernel=False: real(*a, kernel=False))
    launch._SITES.clear()


def unchecked(fn):
    def run():
        os.environ["IOATTN_CHECK_VALUES"] = "0"
        try:
            return fn()
        finally:
            os.environ["IOATTN_CHECK_VALUES"] = "1"
    return run


def steps(calls: int) -> dict:
    D, dt, dev = 128, torch.bfloat16, "cuda"
    q = torch.randn(1, 1, 32, D, device=dev, dtype=dt)
    kc, vc = (torch.randn(1, 1024, 8, D, device=dev, dtype=dt) for _ in range(2))
    lens = torch.full((1,), 1024, dtype=torch.int32, device=dev)
    before = lens - 1
    knew, vnew = (torch.randn(1, 1, 8, D, device=dev, dtype=dt) for _ in range(2))
    cos, sin = (torch.rand(2048, D // 2, device=dev).to(dt) for _ in range(2))
    # Enough rows for every round's calls (each attend appends one token).
    # A paged copy: 16-token pages in shuffled order.
    pages = torch.randperm(64, device=dev)
    table = pages.to(torch.int32).view(1, 64)
    kp, vp = (torch.empty(64, 16, 8, D, device=dev, dtype=dt) for _ in range(2))
    kp[pages], vp[pages] = kc.view(64, 16, 8, D), vc.view(64, 16, 8, D)
    leftpad = torch.zeros(1, dtype=torch.int32, device=dev)
    cache = KVCache(1, 1024 + 40 * (calls + 10), 8, D, device=dev, dtype=dt)
    cache.attend(torch.randn(1, 1023, 32, D, device=dev, dtype=dt),
                 *(torch.randn(1, 1023, 8, D, device=dev, dtype=dt) for _ in range(2)))

    def cudnn():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), enable_gqa=True)

    return {
        "cuDNN SDPA": cudnn,
        "lengths tensor, checked": lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens),
        "lengths tensor, unchecked": unchecked(lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)),
        "lengths int": lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=1024),
        "+append, tensor, unchecked": unchecked(lambda: flash_attn_with_kvcache(q, kc, vc, knew, vnew,
                                                                                cache_seqlens=before)),
        "+append+rotary, unchecked": unchecked(lambda: flash_attn_with_kvcache(
            q, kc, vc, knew, vnew, cos, sin, cache_seqlens=before, causal=True)),
        "KVCache.attend (+append)": lambda: cache.attend(q, knew, vnew),
        "paged16, checked": lambda: flash_attn_with_kvcache(q, kp, vp, cache_seqlens=lens, block_table=table),
        "paged16, unchecked": unchecked(lambda: flash_attn_with_kvcache(q, kp, vp, cache_seqlens=lens,
                                                                        block_table=table)),
        "leftpad, checked": lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, cache_leftpad=leftpad),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", type=int, default=0)
    p.add_argument("--ab", choices=("sites", "index"), default="sites")
    args = p.parse_args(argv)
    toggle = sites if args.ab == "sites" else index_kernel
    rows = steps(args.calls)
    table = {}
    for r in range(args.rounds):
        for on in (True, False):
            toggle(on)
            for name, fn in rows.items():
                host, wall = per_call_us(fn, args.calls)
                table.setdefault(name, []).append((on, host, wall))
                print(f"round {r} {args.ab} {'on ' if on else 'off'} {name:28s} host {host:7.1f} wall {wall:7.1f} µs",
                      flush=True)
    toggle(True)
    print(f"\nmedians over rounds, µs per call, host / wall: {args.ab} on | {args.ab} off")
    for name, cells in table.items():
        def med(on, i):
            vals = sorted(c[i] for c in cells if c[0] == on)
            return vals[len(vals) // 2]
        print(f"{name:28s} {med(True, 1):7.1f} / {med(True, 2):7.1f} | {med(False, 1):7.1f} / {med(False, 2):7.1f}")
    if args.profile:
        print_cprofile(rows["lengths tensor, unchecked"], args.profile, 30)


if __name__ == "__main__":
    main()
