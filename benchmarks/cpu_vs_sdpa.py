"""CPU backend vs torch's CPU SDPA: same process, same inputs, median of several repetitions.

ioattn runs `flash_fwd_cpu` / `flash_bwd_cpu` on ``[B, T, H, D]`` tensors; SDPA gets the
``[B, H, T, D]`` transposed views of the same tensors (what a user holding ``[B, T, H, D]`` data
would pass) and runs forward, or forward + autograd backward. Cases SDPA cannot express with
``is_causal`` (bottom-right causal with Tq < Tk) give SDPA an explicit bool mask.
ratio = sdpa time / ioattn time (> 1: ioattn is faster).

    python benchmarks/cpu_vs_sdpa.py            # the full table (~1 min on 2 cores)
    python benchmarks/cpu_vs_sdpa.py --quick    # T <= 1024 only
"""
import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from ioattn.flash.cpu import flash_bwd_cpu, flash_fwd_cpu
from ioattn.testing import make_qkv

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cases(quick: bool):
    """(dtype, B, Tq, Tk, H, Hkv, D, causal) rows of the table."""
    lengths = (256, 1024) if quick else (256, 1024, 2048)
    for dtype in DTYPES:
        for T in lengths:
            for causal in (False, True):
                yield dtype, 2 if T <= 1024 else 1, T, T, 8, 8, 64, causal
        yield dtype, 1, 1024, 1024, 8, 8, 128, True
        # GQA 8:2 (SDPA: enable_gqa) and flash-attn's bottom-right causal with Tq < Tk.
        yield dtype, 1, 1024, 1024, 8, 2, 64, True
        yield dtype, 1, 256, 1024, 8, 8, 64, True


def median_ms(fns, budget_s=0.6, min_reps=3, max_reps=10):
    """Median wall time in ms of each function; repetitions alternate between them so that
    a slow phase of the machine (turbo, a neighbour's load) hits both alike."""
    first = []
    for fn in fns:
        fn()
        t0 = time.perf_counter()
        fn()
        first.append(time.perf_counter() - t0)
    reps = max(min_reps, min(max_reps, int(budget_s / max(sum(first), 1e-9))))
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) * 1e3 for ts in times]


def run_case(dtype, B, Tq, Tk, H, Hkv, D, causal):
    dt = DTYPES[dtype]
    q, k, v = make_qkv(B, Tq, Tk, H, Hkv, D, dtype=dt)
    dout = torch.randn(B, Tq, H, D).to(dt)
    scale = D ** -0.5
    offset = Tk - Tq

    def ours_fwd():
        return flash_fwd_cpu(q, k, v, scale, causal, offset)

    def ours_fwd_bwd():
        out, lse = flash_fwd_cpu(q, k, v, scale, causal, offset)
        return flash_bwd_cpu(dout, q, k, v, out, lse, scale, causal, offset)

    sdpa_kw = dict(scale=scale, enable_gqa=H != Hkv)
    if causal and Tq != Tk:
        i = torch.arange(Tq)[:, None]
        sdpa_kw["attn_mask"] = torch.arange(Tk)[None, :] <= i + offset
    else:
        sdpa_kw["is_causal"] = causal
    qs, ks, vs = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    douts = dout.transpose(1, 2)

    def sdpa_fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(qs, ks, vs, **sdpa_kw)

    def sdpa_fwd_bwd():
        out = F.scaled_dot_product_attention(qs, ks, vs, **sdpa_kw)
        return torch.autograd.grad(out, (qs, ks, vs), douts)

    row = {}
    for name, ours, theirs in (("fwd", ours_fwd, sdpa_fwd), ("fwd+bwd", ours_fwd_bwd, sdpa_fwd_bwd)):
        row[name] = median_ms((ours, theirs))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T <= 1024 only")
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU {torch.backends.cpu.get_cpu_capability()}, {platform.processor() or platform.machine()}")
    head = f"{'dtype':5} {'B':>2} {'Tq':>5} {'Tk':>5} {'H':>2} {'Hkv':>3} {'D':>4} {'mask':7}"
    print(f"{head} | {'fwd ms ioattn/sdpa':>19} {'ratio':>6} | {'fwd+bwd ms ioattn/sdpa':>23} {'ratio':>6}")
    for case in cases(args.quick):
        dtype, B, Tq, Tk, H, Hkv, D, causal = case
        row = run_case(*case)
        mask = ("causal" if Tq == Tk else "causBR") if causal else "full"
        cells = []
        for name, width in (("fwd", 19), ("fwd+bwd", 23)):
            ours, theirs = row[name]
            cells.append(f"{f'{ours:.2f} / {theirs:.2f}':>{width}} {theirs / ours:6.2f}")
        print(f"{dtype:5} {B:>2} {Tq:>5} {Tk:>5} {H:>2} {Hkv:>3} {D:>4} {mask:7} | "
              f"{cells[0]} | {cells[1]}", flush=True)


if __name__ == "__main__":
    main()
