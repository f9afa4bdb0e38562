"""A target for Nsight Compute: two launches of the forward that the tables pick (the public
function's dispatch) on one paper-grid shape, the first to compile, the second to profile.

    ncu --clock-control none -k regex:fwd --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats ... \\
        python3 benchmarks/ncu_fwd.py --D 128 --T 1024 [--causal]

bf16, B = 16384 // T, H = 2048 // D, random normal q, k, v.
"""
import argparse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--D", type=int, default=128, choices=(64, 128))
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--causal", action="store_true")
    args = p.parse_args(argv)
    import torch

    import ioattn

    torch.manual_seed(0)
    B, H = 16384 // args.T, 2048 // args.D
    q, k, v = (torch.randn(B, args.T, H, args.D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for _ in range(2):
        ioattn.flash_attn_func(q, k, v, causal=args.causal)
    torch.cuda.synchronize()
    print(f"done: D = {args.D}, T = {args.T}, causal = {args.causal}")


if __name__ == "__main__":
    main()
