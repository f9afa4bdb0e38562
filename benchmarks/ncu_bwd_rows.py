"""A target for Nsight Compute: two launches of the row-held Gluon backward (bwd_gluon_rows.py) on
one paper-grid shape, the first to compile, the second to profile.

    ncu --clock-control none -k regex:_bwd_rows --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis ... \\
        python3 benchmarks/ncu_bwd_rows.py --D 64 --T 4096 [--causal] [--dq-rows] [--s-ahead]

bf16, B = 16384 // T, H = 2048 // D, inputs and saved forward as sweep_bwd_tma.py's Shape; the
config is the kernel's table form (128-row steps at D = 64, 64-row ones at D = 128; 2 slots).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep_bwd_tma as tma_sweep  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--D", type=int, default=64, choices=(64, 128))
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dq-rows", action="store_true", help="FusedBwdConfig.dq_rows (D = 64 only)")
    p.add_argument("--s-ahead", action="store_true", help="FusedBwdConfig.s_ahead (the D = 64 table's form)")
    args = p.parse_args(argv)
    import torch

    from ioattn.flash.bwd_fused import flash_bwd_fused
    from ioattn.flash.config import FusedBwdConfig

    cfg = FusedBwdConfig(128 if args.D == 64 else 64, 128, 4, 2, tma_reduce=True, gluon=True, rows=True,
                         dq_rows=args.dq_rows, s_ahead=args.s_ahead)
    torch.manual_seed(0)
    s = tma_sweep.Shape(args.D, args.T, args.causal, False)
    for _ in range(2):
        flash_bwd_fused(s.dout, s.q, s.k, s.v, s.out, s.lse, s.scale, args.causal, 0, config=cfg)
    torch.cuda.synchronize()
    print(f"done: D = {args.D}, T = {args.T}, causal = {args.causal}, dq_rows = {args.dq_rows}, "
          f"s_ahead = {args.s_ahead}")


if __name__ == "__main__":
    main()
