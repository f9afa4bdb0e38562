"""Time named backward configs against each other in alternated rounds, on fresh inputs each round.

    PYTHONPATH=src python3 benchmarks/ab_bwd.py --D 128 --causal yes --T 8192 --H 32 --Hkv 4 \
        --configs table twopass gqa=fused:64,128,4,2:tma_reduce,gluon,rows,expand_kv --rounds 3

ab_fwd.py's method for the backward alone (the forward's out and lse computed once a round):
``table`` is what the dispatch runs for a non-deterministic backward (flash-attn's default),
``twopass`` bwd_tma.py's two-pass backward with its table config, ``NAME=fused:M,N,WARPS,STAGES:
FLAG,...`` bwd_fused.py's one-pass backward with a FusedBwdConfig (flags: its boolean fields).
Shapes: B = 16384 // T tokens, --H query heads over --Hkv KV heads (default: MHA, the paper
grid's H = 2048 // D). Each config is checked once against the two-pass backward (dq, dk, dv
within 2 bf16 ulps of their largest value). Prints ms per round and the median; JSON with a
machine header (--out).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from ab_fwd import CAUSAL, alternate, parser, write  # noqa: E402
from ioattn.flash.bwd_fused import flash_bwd_fused  # noqa: E402
from ioattn.flash.bwd_tma import flash_bwd_tma  # noqa: E402
from ioattn.flash.config import FusedBwdConfig  # noqa: E402
from ioattn.flash.dispatch import kernels_for  # noqa: E402


def parse(spec: str):
    """``table``, ``twopass`` or ``NAME=fused:M,N,W,S:FLAGS`` → (name, backward(dout, q, k, v, out,
    lse, scale, causal))."""
    if spec == "table":
        bwd = kernels_for(torch.device("cuda"))[1]
        return spec, lambda *a: bwd(*a, 0, deterministic=False)
    if spec == "twopass":
        return spec, lambda *a: flash_bwd_tma(*a, 0)
    name, _, body = spec.partition("=")
    kind, tiles, *flags = body.split(":")
    if kind != "fused":
        raise SystemExit(f"unknown config {spec!r}")
    flags = [f for f in (flags[0].split(",") if flags else []) if f]
    cfg = FusedBwdConfig(*map(int, tiles.split(",")), **{f: True for f in flags})
    return name, lambda *a: flash_bwd_fused(*a, 0, config=cfg)


def disagreement(got, want) -> str:
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        tol = 2.0**-7 * max(1.0, w.float().abs().max().item())
        d = (g.float() - w.float()).abs().max().item()
        if not d <= tol:
            return f"{name} differs by {d:.3e} (tolerance {tol:.1e})"
    return ""


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--H", type=int, default=0, help="query heads (0: 2048 // D)")
    p.add_argument("--Hkv", type=int, default=0, help="KV heads (0: as many as query heads)")
    args = p.parse_args(argv)
    configs = [parse(s) for s in args.configs]
    fwd = kernels_for(torch.device("cuda"))[0]
    rows = []
    for D in args.D:
        H = args.H or 2048 // D
        H_kv = args.Hkv or H
        for causal in CAUSAL[args.causal]:
            for T in args.T:
                B = max(1, 16384 // T)

                def inputs():
                    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
                    k, v = (torch.randn(B, T, H_kv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
                    out, lse = fwd(q, k, v, D**-0.5, causal, 0)
                    return torch.randn_like(q), q, k, v, out, lse, D**-0.5, causal

                def reference(*a):
                    return flash_bwd_tma(*a, 0)

                rows += alternate(f"D={D} H={H}/{H_kv} causal={causal!s:<5} T={T:<5}", configs, args.rounds, inputs,
                                  reference, disagreement, dict(D=D, H=H, H_kv=H_kv, causal=causal, T=T, B=B))
    if args.out:
        write(args.out, rows, args.configs)


if __name__ == "__main__":
    main()
