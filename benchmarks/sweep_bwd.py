"""Time the Triton backward under several tile configs on a GPU (the data behind config.py).

    python benchmarks/sweep_bwd.py [--D 128] [--T 4096] [--out FILE.json]

For each config and causal/non-causal it checks dq, dk, dv against the default config's (the
same math, so they must agree to rounding), then times forward-saved backward alone
(`triton.testing.do_bench`, median) and prints TFLOP/s (backward = 2.5x the forward's FLOPs).
ptxas spills for the dK/dV kernel can be read without a GPU with benchmarks/ptx_check.py.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402
import triton  # noqa: E402

from ioattn.flash.bwd import flash_bwd_triton  # noqa: E402
from ioattn.flash.config import BwdConfig, get_bwd_config  # noqa: E402
from ioattn.flash.fwd import flash_fwd_triton  # noqa: E402

# (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages)
CANDIDATES = [
    (64, 128, 128, 64, 8, 2),
    (32, 128, 128, 32, 8, 2),
    (32, 128, 128, 32, 8, 3),
    (16, 128, 128, 16, 8, 2),
    (32, 64, 64, 32, 8, 2),
    (64, 128, 128, 32, 8, 2),
    (32, 128, 64, 64, 8, 2),
    (64, 64, 64, 64, 4, 2),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--out")
    args = p.parse_args(argv)
    D, T = args.D, args.T
    H = 2048 // D
    B = 16384 // T
    rows = []
    for causal in (False, True):
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        dout = torch.randn_like(q)
        scale = D**-0.5
        out, lse = flash_fwd_triton(q, k, v, scale, causal, 0)
        ref = flash_bwd_triton(dout, q, k, v, out, lse, scale, causal, 0)
        flops = 2.5 * 4 * B * H * T * T * D / (2 if causal else 1)
        default = get_bwd_config(D, torch.bfloat16, causal, interpret=False)
        for c in CANDIDATES:
            cfg = BwdConfig(*c)
            t0 = time.perf_counter()
            try:
                got = flash_bwd_triton(dout, q, k, v, out, lse, scale, causal, 0, config=cfg)
                torch.cuda.synchronize()
            except Exception as e:  # a config that does not fit (shared memory) is reported, not fatal
                print(f"causal={causal} {c}: failed: {str(e).splitlines()[0][:120]}", flush=True)
                continue
            compile_s = time.perf_counter() - t0
            err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(got, ref))
            ms = triton.testing.do_bench(
                lambda: flash_bwd_triton(dout, q, k, v, out, lse, scale, causal, 0, config=cfg),
                warmup=25, rep=100, return_mode="median")
            row = dict(D=D, T=T, B=B, H=H, causal=causal, config=c, ms=ms, tflops=flops / ms * 1e-9,
                       rel_diff_vs_default=err, compile_s=compile_s, is_default=cfg == default)
            rows.append(row)
            print(f"causal={causal!s:<5} {c}: {row['tflops']:6.1f} TFLOP/s  {ms:.3f} ms  "
                  f"diff {err:.1e}{'  (default)' if row['is_default'] else ''}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, commit=os.environ.get("IOATTN_COMMIT"), rows=rows),
                      f, indent=1)


if __name__ == "__main__":
    main()
