"""Sweep the one-pass backward (bwd_fused.py) on a GPU against the two-pass TMA backward
(config.py's get_fused_bwd_config rests on it).

    PYTHONPATH=src python3 benchmarks/sweep_bwd_fused.py --out $OUT/sweep_bwd_fused.json [--D 64,128] [--T 4096,16384]
    PYTHONPATH=src python3 benchmarks/sweep_bwd_fused.py --smoke   # CPU, interpreter, tiny shape
    PYTHONPATH=src python3 benchmarks/sweep_bwd_fused.py --ptxas   # no GPU: registers and spills
    PYTHONPATH=src python3 benchmarks/sweep_bwd_fused.py --gluon --out ...  # bwd_gluon.py's ADD_DQ kernel

bf16, FlashAttention-2 paper grid (B = 16384 // T, H = 2048 // D), forward saved. For each D, T
and causal it times the whole two-pass backward with its default config, then the whole one-pass
backward (the zeroing, delta, the kernel and dQ's cast all included) with every candidate, each
checked first against the portable backward (sweep_bwd_tma.py's Shape and tolerance). TFLOP/s
count the backward as 2.5x the forward's FLOPs, as the anchors do.
"""
import argparse
import json
import os
import re
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep_bwd_tma as tma_sweep  # noqa: E402

# (BLOCK_M, BLOCK_N, warps, stages, device_desc, tma_reduce, dq_t). The first sweep on the H200
# (results/2026-12-03_nvidia-h200_sweep-bwd-fused.json, every candidate with dQ = dS·k) found
# the one-pass backward at 0.53-0.99x the two-pass one; Triton forms dS·k by transposing dSᵀ
# through shared memory, waits for each dQ dot and for each tile's bulk reduction before the
# next (ttgir). Its fastest candidates come first here, then the same with dQᵀ = kᵀ·dSᵀ.
F, T_ = False, True
CANDIDATES = {
    64: [(64, 64, 4, 3, F, T_, F), (64, 64, 4, 3, F, F, T_), (64, 64, 4, 3, F, T_, T_), (32, 128, 4, 3, F, T_, T_),
         (64, 128, 8, 2, F, F, T_), (64, 128, 8, 2, F, T_, T_)],
    128: [(64, 128, 8, 2, F, T_, F), (64, 128, 8, 2, F, F, T_), (64, 128, 8, 2, F, T_, T_), (64, 64, 4, 2, F, F, T_),
          (64, 64, 4, 2, F, T_, T_), (32, 128, 8, 2, F, T_, T_)],
}

# bwd_gluon.py's kernel with ADD_DQ (the same tuple, then ``gluon``, ``dq_early``): 64 query rows
# a step, 128 keys in two warpgroups; how dQ is added (``tma_reduce``: bulk reductions from shared
# memory, else element-wise atomics), the Q/dO slots and when dQ is issued are what vary. With
# atomics, 3 slots and dq_early lost to 2 slots at 629b3f6, and at D = 64 the Gluon kernel lost
# to the Triton one (..._sweep-bwd-fused-gluon.json); the fastest with atomics stays as the
# reference, and D = 64's Triton winners ride along.
# Then ``rows``: bwd_gluon_rows.py's kernel (scores held by query row, P and dS through shared
# memory; 128-row steps fit at D = 64, 64-row ones at D = 128 with 2 slots). A ``split_mask``
# option (causal steps holding the diagonal in a loop of their own) was timed at 3d4519f-821ac90
# and removed: slower at D = 128 in both Gluon kernels (0.77-0.88x the two-pass backward against
# 1.03-1.20x in one loop), and at D = 64 behind the 128-row form in one loop (config.py).
# Then ``dq_rows``: the 128-row form with each warpgroup's dQ share half the rows (64 x 64 wgmmas)
# instead of half the columns (128 x 32); last ``s_ahead`` (each step's S issued at the end of the
# step before), at D = 64 with dq_rows.
GLUON_CANDIDATES = {
    64: [(64, 128, 4, 2, F, T_, F, T_), (32, 128, 4, 3, F, T_, T_), (64, 64, 4, 3, F, T_, T_),
         (128, 128, 4, 2, F, T_, F, T_, F, T_), (64, 128, 4, 3, F, T_, F, T_, F, T_),
         (128, 128, 4, 2, F, T_, F, T_, F, T_, T_), (128, 128, 4, 2, F, T_, F, T_, F, T_, T_, T_)],
    128: [(64, 128, 4, 2, F, T_, F, T_), (64, 128, 4, 3, F, T_, F, T_), (64, 128, 4, 2, F, T_, F, T_, T_),
          (64, 128, 4, 2, F, F, F, T_), (64, 128, 4, 2, F, T_, F, T_, F, T_),
          (64, 128, 4, 2, F, T_, F, T_, F, T_, F, T_)],
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--D", default="64,128", help="head dims, comma-separated")
    p.add_argument("--T", default="4096,16384", help="sequence lengths, comma-separated")
    p.add_argument("--causal", default="both", choices=("both", "yes", "no"))
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("--smoke", action="store_true", help="tiny shape in Triton's interpreter on CPU")
    p.add_argument("--ptxas", action="store_true", help="compile every candidate for sm_90 without a GPU")
    p.add_argument("--gluon", action="store_true", help="time GLUON_CANDIDATES (GPU only)")
    p.add_argument("--pick", help="only these candidates, comma-separated indices into each D's list")
    return p.parse_args(argv)


def config_of(c):
    from ioattn.flash.config import FusedBwdConfig

    return FusedBwdConfig(*c)


def gluon_configs() -> dict:
    """GLUON_CANDIDATES' Gluon entries as configs, by D (the tests and the compile check use these;
    the Triton entries beside them are timed only)."""
    return {D: [cfg for cfg in map(config_of, cs) if cfg.gluon] for D, cs in GLUON_CANDIDATES.items()}


def sweep_point(s, rows, smoke, cands):
    from ioattn.flash.bwd_fused import flash_bwd_fused
    from ioattn.flash.bwd_tma import flash_bwd_tma

    args = (s.dout, s.q, s.k, s.v, s.out, s.lse, s.scale, s.causal, 0)
    two = tma_sweep.try_config(s, "two-pass", "default", lambda: flash_bwd_tma(*args), lambda g: (g, s.ref), 2.5,
                               smoke)
    rows.append(two)
    for c in cands:
        cfg = config_of(c)
        rows.append(tma_sweep.try_config(s, "fused", c, lambda cfg=cfg: flash_bwd_fused(*args, config=cfg),
                                         lambda g: (g, s.ref), 2.5, smoke, two.get("ms")))


def ptxas_report(Ds):
    """Compile each candidate for sm_90 (no GPU needed); print ptxas's registers and spills and
    how dQ is added (the bulk reduction, or which atomics)."""
    from ioattn.flash import bwd_tma

    for D in Ds:
        for c in CANDIDATES[D]:
            M, N, warps, stages, device_desc, tma_reduce, *dq_t = c
            values = dict(DEVICE_DESC=device_desc, ADD_DQ=True, TMA_REDUCE=tma_reduce, DQ_T=bool(dq_t and dq_t[0]))
            try:
                report, ptx = tma_sweep.ptxas_compile(bwd_tma._bwd_dkdv_tma_kernel, D, M, N, warps, stages, values,
                                                      device_desc, tma_reduce)
                atoms = sorted(set(re.findall(r"\b(?:atom|red)\.global\.[\w.]+", ptx)))
                adds = "bulk-reduce" if "cp.reduce.async.bulk" in ptx else " ".join(atoms)
                print(f"D={D:<3} {c!s:<40} {report}  {adds}", flush=True)
            except Exception as e:
                print(f"D={D:<3} {c!s:<40} FAILED: {str(e).splitlines()[0][:120]}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.gluon and (args.smoke or args.ptxas):
        sys.exit("--gluon: Gluon has no interpreter; tests/flash/gluon_ptxas.py compiles its kernels")
    Ds = tma_sweep.setup(args)
    if args.ptxas:
        return ptxas_report(Ds)
    import torch

    from ioattn.bench import machine

    Ts = [tma_sweep.SMOKE_T] if args.smoke else [int(t) for t in args.T.split(",")]
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    out = dict(header=machine.header("cpu" if args.smoke else "cuda", sys.argv), rows=[])
    out["header"]["command"] = shlex.join(["python3", *sys.argv])
    t0 = time.perf_counter()
    for D in Ds:
        # The interpreter cannot do the bulk reduction: only the element-wise candidates there.
        cands = [c for c in (GLUON_CANDIDATES if args.gluon else CANDIDATES)[D] if not (args.smoke and c[5])]
        if args.pick:
            cands = [cands[int(i)] for i in args.pick.split(",")]
        if args.smoke:
            cands = [(16, 32, 4, 1, *c[4:]) for c in cands]
        for T in Ts:
            for causal in causals:
                torch.manual_seed(0)
                s = tma_sweep.Shape(D, T, causal, args.smoke)
                sweep_point(s, out["rows"], args.smoke, cands)
                del s
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump(out, f, indent=1)
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
