"""Time the Hopper TMA forward (flash/fwd_tma.py) under candidate configs against the portable one.

    PYTHONPATH=src python3 benchmarks/sweep_fwd_tma.py --out $OUT/sweep_fwd_tma.json
    PYTHONPATH=src python3 benchmarks/sweep_fwd_tma.py --smoke     # no GPU: candidates in the interpreter

On the FlashAttention-2 paper grid (bf16, B = 16384 // T, H = 2048 // D), for each D and causal:
at T=4096 the portable kernel's default config and every candidate are checked against the
portable output and timed (`triton.testing.do_bench`, median); at T=16384 the portable kernel, the
current default and the best --top candidates of T=4096 again (--T picks other lengths). One line per result, flushed at
once; a candidate that fails to compile or disagrees is reported and skipped. Past --budget
seconds the remaining candidates are skipped, so a slow compiler cannot eat the GPU lease.
"""
import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict

if "--smoke" in sys.argv:
    # Before triton is imported: the interpreter runs the kernels on CPU tensors.
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402
import triton  # noqa: E402

from ioattn.bench.flops import attention_flops, tflops  # noqa: E402
from ioattn.bench.machine import header  # noqa: E402
from ioattn.flash.config import TmaFwdConfig, get_tma_fwd_config  # noqa: E402
from ioattn.flash.fwd import flash_fwd_triton  # noqa: E402
from ioattn.flash.fwd_pingpong import gluon_launcher  # noqa: E402
from ioattn.flash.fwd_tma import flash_fwd_tma  # noqa: E402

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim, the default first. Each compiles for
# sm_90 without register spills and fits Hopper's 227 KB of shared memory (benchmarks/ptx_check.py
# --tma); 128 x 128 tiles with 4 warps at D=128 spill 1.2 KB and are left out. warp_specialize is
# left out too: on sm_90 triton 3.6 emits the same PTX with it as without it for this kernel.
# The 64-row tiles at the end of the D=64 and D=128 lists are for short sequences (--T 1024 2048),
# where 128-row tiles leave few programs per head and one diagonal tile is a large part of each.
# The 256-row tiles with 16 warps (four warpgroups of 64 rows sharing each K/V tile) compile
# without spills at 108-128 registers (256 x 128 spills 2.6 KB at D=128 and is left out).
CANDIDATES = {
    64: [(128, 128, 4, 3), (128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 4, 4), (128, 128, 8, 3),
         (128, 128, 8, 2), (128, 64, 8, 4), (64, 128, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2),
         (64, 128, 4, 2), (128, 64, 4, 2), (256, 64, 16, 3), (256, 128, 16, 2), (256, 128, 16, 3)],
    128: [(128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 2), (128, 128, 8, 3),
          (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 4, 2),
          (64, 128, 4, 3), (256, 64, 16, 2), (256, 64, 16, 3)],
    256: [(128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
}


# The Gluon kernels (flash/fwd_gluon.py, --gluon), (BLOCK_M, BLOCK_N, warps, stages[,
# warp_specialize]): 64 rows per 4 warps; every one compiles for sm_90 without spills. H200
# sweeps of the kernel without warp specialization (fbbd94a, 20843b9), TFLOP/s against the Triton
# TMA kernel's default: D=128 T=4096 full 128 x 128 s3 478, 64 x 64 s3 (two programs per SM)
# 487 against 513, causal 464 against 465; D=64 64 x 128 s3 425 against 449; ahead only at short
# causal lengths (D=128 T=1024 64 x 64 s3 370 against the Triton kernel's 360 there). The tiles
# that lost by more than 10% were dropped; the warp-specialized kernel's were added after.
# The ping-pong kernel's (flash/fwd_pingpong.py; TmaFwdConfig's fields, so (M, N, 4, stages, False,
# True[, turns[, persistent]])): 128 rows per program in two warpgroups; the entries with
# turns=False time the same kernel without its turn-taking, to show what the schedule alone
# moves; persistent ones its persistent form (flash/fwd_persistent.py); a ninth field n computes
# one exponential in n with FMAs (gluon_exp2.py's _exp2). At cff3764 (results/2026-12-03_nvidia-h200_
# sweep-fwd-exp2-emu.json, T = 4096) that never won: D = 64 with turns 438 TFLOP/s plain, 375 /
# 418 / 435 with n = 2 / 4 / 8; D = 128 661 plain, 613 / 595 with n = 4 / 8. One n = 8 entry per
# D stays, so the compile check and the GPU tests keep covering the form. A tenth field 3 holds
# 192 rows in three warpgroups (D = 64; without p_early, below, their 160 registers spill ~150
# local loads/stores a step at 128-key blocks, so that form steps over 64 keys). At 7a94ac0 (results/2026-12-03_nvidia-
# h200_sweep-fwd-64-wg3-7a94ac0.json, TFLOP/s at T = 1024 / 2048 / 4096 / 8192 / 16384) the
# 2-stage form ran full 326 / 406 / 435 / 454 / 458 against the two-warpgroup kernel's 353 / 405
# / 444 / 447 / 456 and causal (3 stages) 220 / 318 / 372 / 408 / 427 against 241 / 325 / 392 /
# 413 / 449 (without turns): level at most, not in a table; one entry stays. An eleventh field
# True casts P to 16 bits right after each softmax (p_early): then three warpgroups fit 128-key
# blocks in their 160 registers without spills. A twelfth field True runs a last key block that a
# warpgroup's rows see only the first half of at half width (half_last: causal diagonals).
GLUON_CANDIDATES = {
    64: [(64, 128, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3, True), (64, 128, 4, 2, True), (64, 64, 4, 4, True),
         (128, 128, 4, 2, False, True), (128, 128, 4, 3, False, True), (128, 128, 4, 4, False, True),
         (128, 64, 4, 4, False, True), (128, 128, 4, 3, False, True, True, True),
         (128, 128, 4, 3, False, True, False, True), (128, 128, 4, 2, False, True, True, False, 8),
         (192, 64, 4, 2, False, True, True, False, 0, 3),
         (192, 128, 4, 2, False, True, True, False, 0, 3, True), (192, 128, 4, 3, False, True, True, False, 0, 3, True),
         (128, 128, 4, 2, False, True, True, False, 0, 2, True),
         (128, 128, 4, 2, False, True, True, True, 0, 2, False, True),
         (192, 128, 4, 2, False, True, True, False, 0, 3, True, True),
         (64, 64, 4, 3, False, False, True, False, 0, 2, False, False, 2, 128)],
    128: [(64, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3, True), (64, 64, 4, 2, True), (128, 64, 8, 3, True),
          (128, 128, 4, 2, False, True), (128, 128, 4, 2, False, True, False), (128, 64, 4, 3, False, True),
          (128, 64, 4, 4, False, True), (128, 128, 4, 2, False, True, True, True),
          (128, 128, 4, 2, False, True, False, True), (128, 128, 4, 2, False, True, True, False, 8),
          (128, 128, 4, 2, False, True, True, False, 0, 2, True),
          (128, 128, 4, 2, False, True, False, False, 0, 2, True),
          (128, 128, 4, 2, False, True, True, False, 0, 2, False, True),
          (128, 128, 4, 2, False, True, False, False, 0, 2, False, True),
          (128, 128, 4, 2, False, True, True, True, 0, 2, False, True)],
    # D = 256: the ping-pong kernel at 64-key blocks, with turns and without (config.py's GLUON_FWD_256).
    256: [(128, 64, 4, 2, False, True), (128, 64, 4, 2, False, True, False)]
}


class Gluon(TmaFwdConfig):
    """A config run by the Gluon kernel instead of the Triton TMA one (same fields)."""


def launcher(cfg):
    return gluon_launcher(cfg) if isinstance(cfg, Gluon) else flash_fwd_tma


def candidates(D: int) -> list:
    return [TmaFwdConfig(*c) for c in CANDIDATES[D]]


def short(cfg: TmaFwdConfig) -> str:
    kind = "gluon" if isinstance(cfg, Gluon) else "tma"
    return (f"{kind} {cfg.BLOCK_M}x{cfg.BLOCK_N} w{cfg.num_warps} s{cfg.num_stages}"
            + (" ws" if cfg.warp_specialize else "") + (" pp" if cfg.pingpong else "")
            + ("" if cfg.turns else " free") + (" persistent" if cfg.persistent else "")
            + (f" emu{cfg.exp2_emu}" if cfg.exp2_emu else "") + (" wg3" if cfg.warpgroups == 3 else "")
            + (" early" if cfg.p_early else "") + (" half" if cfg.half_last else "")
            + (f" v{cfg.v_stages}" if cfg.v_stages else "") + (f" cap{cfg.maxnreg}" if cfg.maxnreg else ""))


def disagreement(got, want) -> str:
    """Why (out, lse) ``got`` is not ``want`` to rounding, or "" if it is: out within 2 bf16 ulps
    of its largest value, finite lse within 1e-3, -inf in the same rows."""
    out, lse = got
    ref, ref_lse = want
    tol = 2.0**-7 * max(1.0, ref.float().abs().max().item())
    d_out = (out.float() - ref.float()).abs().max().item()
    if not d_out <= tol:
        return f"out differs by {d_out:.3e} (tolerance {tol:.1e})"
    if not torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)):
        return "lse: -inf rows differ"
    finite = torch.isfinite(ref_lse)
    d_lse = (lse[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    if not d_lse <= 1e-3:
        return f"lse differs by {d_lse:.3e}"
    return ""


class Sweep:
    def __init__(self, budget_s: float):
        self.deadline = time.perf_counter() + budget_s
        self.rows = []

    def run(self, label, name, fn, want, flops, meta, base_ms=None):
        """Check ``fn()`` against ``want`` (when given), time it, print (after ``label``) and
        record one row; returns its median ms, or None when it failed or was skipped."""
        if time.perf_counter() > self.deadline:
            print(f"{label} {name}: skipped (budget)", flush=True)
            return None
        t0 = time.perf_counter()
        try:
            got = fn()
            torch.cuda.synchronize()
            why = disagreement(got, want) if want is not None else ""
        except Exception as e:  # a config that does not compile or fit is reported, not fatal
            first_line = (str(e).strip().splitlines() or [""])[0]
            why = f"failed: {type(e).__name__}: {first_line[:160]}"
        compile_s = time.perf_counter() - t0
        if why:
            print(f"{label} {name}: {why}", flush=True)
            self.rows.append(dict(meta, config=name, error=why))
            return None
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        tf = tflops(flops, ms)
        ratio = base_ms / ms if base_ms else 1.0
        print(f"{label} {name}: {tf:6.1f} TFLOP/s  x{ratio:.3f} vs portable  {ms:.3f} ms  "
              f"(first call {compile_s:.1f} s)", flush=True)
        self.rows.append(dict(meta, config=name, ms=ms, tflops=tf, ratio_vs_portable=ratio,
                              first_call_s=compile_s))
        return ms


def sweep_case(sweep, D, causal, T, configs):
    """The portable kernel, then each TMA config, at one shape; returns {config: ms}."""
    B, H = 16384 // T, 2048 // D
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = D**-0.5
    flops = attention_flops(B, H, T, T, D, causal=causal, mode="fwd")
    meta = dict(D=D, causal=causal, T=T, B=B, H=H)
    label = f"D={D} causal={causal!s:<5} T={T:<5}"
    want = flash_fwd_triton(q, k, v, scale, causal, 0)
    base_ms = sweep.run(label, "portable", lambda: flash_fwd_triton(q, k, v, scale, causal, 0), None, flops,
                        dict(meta, kernel="portable"))
    times = {}
    for cfg in configs:
        ms = sweep.run(label, short(cfg), lambda: launcher(cfg)(q, k, v, scale, causal, 0, config=cfg), want,
                       flops, dict(meta, kernel="gluon" if isinstance(cfg, Gluon) else "tma", tma_config=asdict(cfg)),
                       base_ms)
        if ms is not None:
            times[cfg] = ms
    return times


def smoke():
    """Every candidate on a tiny fp16 shape in the interpreter, against the portable kernel."""
    bad = 0
    for D, cands in CANDIDATES.items():
        q, k, v = (torch.randn(1, 40, 2, D).half() for _ in range(3))
        for causal in (False, True):
            want = flash_fwd_triton(q, k, v, D**-0.5, causal, 0)
            for cfg in map(lambda c: TmaFwdConfig(*c), cands):
                why = disagreement(flash_fwd_tma(q, k, v, D**-0.5, causal, 0, config=cfg), want)
                bad += bool(why)
                print(f"D={D} causal={causal} {short(cfg)}: {why or 'ok'}", flush=True)
    return bad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--D", type=int, nargs="*", default=[64, 128, 256])
    p.add_argument("--T", type=int, nargs="+", default=[4096, 16384],
                   help="every candidate at the first T; the default and the best --top at the others")
    p.add_argument("--top", type=int, default=2, help="best candidates of the first T timed at the others")
    p.add_argument("--budget", type=float, default=140.0, help="seconds; later candidates are skipped")
    p.add_argument("--configs", nargs="*", default=None, metavar="M,N,WARPS,STAGES",
                   help="time these (beside the default) instead of the candidate list; with --gluon "
                        "Gluon configs, flags as 0/1 "
                        "(M,N,4,STAGES,0,1,TURNS,PERSISTENT[,EXP2_EMU[,WARPGROUPS[,P_EARLY[,HALF_LAST]]]])")
    p.add_argument("--gluon", action="store_true",
                   help="time the Gluon kernel's candidates (GLUON_CANDIDATES) beside the TMA default")
    p.add_argument("--smoke", action="store_true", help="no GPU: check the candidates in the interpreter")
    p.add_argument("--causal", default="both", choices=("both", "yes", "no"))
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.smoke:
        sys.exit(1 if smoke() else 0)
    sweep = Sweep(args.budget)
    t0 = time.perf_counter()
    for D in args.D:
        for causal in {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]:
            # The Triton TMA kernel's config for each length (the table has a short-sequence branch).
            default = get_tma_fwd_config(D, torch.bfloat16, causal, interpret=False, seqlen=args.T[0])
            if args.configs is not None:
                # Given as ints, flags too (0/1): the Gluon ones with --gluon.
                ints = [list(map(int, c.split(","))) for c in args.configs]
                kind = Gluon if args.gluon else TmaFwdConfig
                chosen = [kind(*c[:4], *map(bool, c[4:8]), *c[8:10], *map(bool, c[10:12]), *c[12:]) for c in ints]
            elif args.gluon:
                chosen = [Gluon(*c) for c in GLUON_CANDIDATES[D]]
            else:
                chosen = candidates(D)
            configs = [default] + [c for c in chosen if c != default]
            times = sweep_case(sweep, D, causal, args.T[0], configs)
            best = sorted(times, key=times.get)[:args.top]
            for T in args.T[1:]:
                default = get_tma_fwd_config(D, torch.bfloat16, causal, interpret=False, seqlen=T)
                sweep_case(sweep, D, causal, T, [default] + [c for c in best if c != default])
    print(f"sweep took {time.perf_counter() - t0:.0f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            meta = dict(header("cuda", []), command=shlex.join(["python3", *sys.argv]))
            json.dump(dict(meta, rows=sweep.rows), f, indent=1, default=str)


if __name__ == "__main__":
    main()
