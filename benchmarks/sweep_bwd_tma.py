"""Sweep the Hopper TMA backward's tiles on a GPU against the portable backward (bwd_tma.py's
get_tma_bwd_config rests on it).

    PYTHONPATH=src python3 benchmarks/sweep_bwd_tma.py --out $OUT/sweep_bwd_tma.json [--D 64,128,256]
    PYTHONPATH=src python3 benchmarks/sweep_bwd_tma.py --smoke   # CPU, interpreter, tiny shape
    PYTHONPATH=src python3 benchmarks/sweep_bwd_tma.py --ptxas   # no GPU: registers and spills

bf16, FlashAttention-2 paper grid (B = 16384 // T, H = 2048 // D), forward saved. For each D and
causal at T = 4096 it times the portable backward (default config), then the two TMA passes
alone, since they are separate launches: every dK/dV candidate, then every dQ candidate
(N1 + N2 compiles, not N1 x N2), each checked first against the portable result (max abs
difference over max abs value, at most TOL). The fastest of each pass are then run together as
one backward (Δ included: the portable backward launches it apart, the TMA dQ pass computes it)
and, with the default TMA config, at T = 16384 too.
TFLOP/s count the backward as 2.5x the forward's FLOPs; the passes alone as what they compute
(dK/dV four matmuls, 2.0x; dQ three, 1.5x). A failing config prints why and the sweep goes on.
"""
import argparse
import collections
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

# (BLOCK_M1, BLOCK_N1, warps1, stages1[, device_desc1]) for dK/dV and (BLOCK_M2, BLOCK_N2, warps2,
# stages2) for dQ. The host's 4D descriptors are over the [B, H, T, D] view with [1, 1, BLOCK, D]
# tiles, which Triton 3.6 lands in shared memory as plain matrices; with [1, BLOCK, 1, D] tiles of
# [B, T, H, D] it kept the dK/dV kernel's K and V in registers and every D=128 tile spilled (ptxas,
# sm_90: 32 x 128 44 bytes, now 0; D=256 16 x 64 452, now 0). device_desc1 (per-head 2D
# descriptors made in the kernel) stays as one candidate each for comparison. `--ptxas` prints
# ptxas's report of every candidate.
T = True
# The 64-key dK/dV and 64-query dQ tiles after the first six of the D=64 and D=128 lists are for
# short sequences (--T 1024), where the long tiles leave few programs per head; the ones after
# those, and all but the first three at D=256, came after 64 x 64 dK/dV tiles with 4 warps won at
# D=128 (more 4-warp tiles; at D=256 ptxas reports 1.3-3 KB of spills for 4 warps, so 8-warp
# tiles with fewer stages too).
DKDV = {
    64: [(32, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 3), (16, 128, 8, 4), (32, 128, 4, 3), (16, 128, 8, 4, T),
         (32, 64, 4, 3), (16, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2)],
    128: [(32, 128, 8, 2), (32, 128, 8, 3), (16, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3), (32, 128, 8, 2, T),
          (32, 64, 4, 2), (32, 64, 4, 3), (64, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (32, 32, 4, 2),
          (64, 32, 4, 2), (64, 64, 4, 2, T)],
    256: [(16, 64, 8, 2), (32, 64, 8, 2), (16, 64, 8, 2, T), (64, 64, 8, 2), (32, 64, 8, 1), (32, 32, 4, 2),
          (16, 32, 4, 2), (64, 32, 4, 2)],
}
DQ = {
    64: [(128, 32, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 4),
         (64, 32, 4, 3), (64, 64, 4, 2)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 8, 4), (64, 64, 4, 3), (128, 128, 8, 2),
          (64, 32, 4, 3), (64, 64, 4, 2)],
    256: [(64, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
}
# The Gluon dK/dV kernel (flash/bwd_gluon.py, --gluon): (BLOCK_M1, BLOCK_N1, stages1[, overlap1]),
# BLOCK_N1 keys in two warpgroups. ptxas (sm_90, 240 registers a compute thread): at D=128
# 64-row query steps spill 56-208 bytes (560 with overlap1, left out) and 32-row ones none; at
# D=64 none spills. H200 sweeps, D=128 T=4096 pass alone, full / causal: 24edcad
# (results/2026-12-03_nvidia-h200_sweep-bwd-gluon.json) 64 x 128 589-595 / 524-532 against the
# Triton kernel's 570 / 496, 32 x 128 without overlap1 491-500 / 451-466 (dropped); 6e08d51
# (..._sweep-bwd-gluon-overlap.json) 64 x 128 590-608 / 533-549, 32 x 128 with overlap1 430-530 /
# 443-506 (the more stages the faster; the Triton rows of that run failed: a since-fixed mix-up
# of its tuples with these).
GluonDkdv = collections.namedtuple("GluonDkdv", "BLOCK_M1 BLOCK_N1 stages1 overlap1", defaults=(False,))
GLUON_DKDV = {
    64: [GluonDkdv(64, 128, 2), GluonDkdv(64, 128, 2, True), GluonDkdv(64, 128, 3, True), GluonDkdv(32, 128, 3, True)],
    128: [GluonDkdv(64, 128, 2), GluonDkdv(64, 128, 3), GluonDkdv(32, 128, 2, True), GluonDkdv(32, 128, 3, True),
          GluonDkdv(32, 128, 4, True)],
}
# The Triton dK/dV kernel's tiles that config.py used before the Gluon kernel: timed beside
# GLUON_DKDV with --gluon, alone and in the whole backward ("triton-dkdv").
TRITON_DKDV = {64: (32, 128, 4, 3), 128: (64, 64, 4, 2)}
TOL = 2e-2
SMOKE_T, SMOKE_T_LONG = 45, 77


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--D", default="64,128,256", help="head dims, comma-separated")
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--T-long", type=int, default=16384, help="second T for the best configs; 0 skips it")
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("--whole-only", action="store_true",
                   help="skip the passes alone: only the whole backward, portable and TMA default")
    p.add_argument("--smoke", action="store_true", help="tiny shape in Triton's interpreter on CPU")
    p.add_argument("--ptxas", action="store_true", help="compile every candidate for sm_90 without a GPU")
    p.add_argument("--gluon", action="store_true",
                   help="dK/dV: the Gluon kernel's candidates (GLUON_DKDV) only; dQ: the default only")
    return p.parse_args(argv)


def say(row):
    """One result line, flushed at once (a sweep cut short still shows what it measured)."""
    cfg = row.get("config", "")
    extra = ""
    if "ms" in row:
        extra = f"{row['tflops']:7.1f} TFLOP/s  {row['ms']:8.3f} ms"
        if row.get("vs_portable"):
            extra += f"  {row['vs_portable']:.2f}x portable"
    if "diff" in row:
        extra += f"  diff {row['diff']:.1e}"
    if "error" in row:
        extra += f"  FAILED: {row['error']}"
    print(f"D={row['D']:<3} T={row['T']:<5} causal={row['causal']!s:<5} {row['kind']:<8} {cfg!s:<40} {extra}",
          flush=True)


def rel_diff(got, ref):
    import torch

    return max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
               for a, b in zip(got, ref))


class Shape:
    """Inputs, saved forward and portable reference of one (D, T, causal) point of the grid."""

    def __init__(self, D, T, causal, smoke):
        import torch

        from ioattn.flash.bwd import flash_bwd_triton
        from ioattn.flash.bwd_preprocess import bwd_preprocess
        from ioattn.flash.fwd import flash_fwd_triton

        # The smoke shape is tiny, with odd T and GQA, and fp16 (bf16 dots are wrong in the interpreter).
        B, H, H_kv = (1, 2, 1) if smoke else (16384 // T, 2048 // D, 2048 // D)
        device, dtype = ("cpu", torch.float16) if smoke else ("cuda", torch.bfloat16)
        self.D, self.T, self.causal = D, T, causal
        self.q = torch.randn(B, T, H, D, device=device, dtype=dtype)
        self.k, self.v = (torch.randn(B, T, H_kv, D, device=device, dtype=dtype) for _ in range(2))
        self.dout = torch.randn_like(self.q)
        self.scale = D**-0.5
        self.out, self.lse = flash_fwd_triton(self.q, self.k, self.v, self.scale, causal, 0)
        self.ref = flash_bwd_triton(self.dout, self.q, self.k, self.v, self.out, self.lse, self.scale, causal, 0)
        self.delta = torch.empty(B, H, T, device=device, dtype=torch.float32)
        bwd_preprocess(self.out, self.dout, self.delta, D)
        self.fwd_flops = 4 * B * H * T * T * D / (2 if causal else 1)

    def row(self, kind, config=None, **kw):
        return dict(D=self.D, T=self.T, causal=self.causal, kind=kind, config=config, **kw)


def timed(fn, smoke):
    """Median ms of fn; in smoke mode one interpreted call, timed on the host (no CUDA events)."""
    if smoke:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def try_config(s, kind, config, run, check, flops_factor, smoke, t_ref=None):
    """Compile and check one config (``run`` returns what ``check`` compares), then time it."""
    row = s.row(kind, config)
    try:
        t0 = time.perf_counter()
        got = run()
        row["diff"] = rel_diff(*check(got))
        row["first_call_s"] = time.perf_counter() - t0
        if not row["diff"] <= TOL:
            raise ValueError(f"differs from the portable backward by {row['diff']:.1e} > {TOL}")
        row["ms"] = timed(run, smoke)
        row["tflops"] = flops_factor * s.fwd_flops / row["ms"] * 1e-9
        if t_ref:
            row["vs_portable"] = t_ref / row["ms"]
    except Exception as e:  # a config that does not fit, or is wrong, is reported, not fatal
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}" if str(e).strip() else type(e).__name__
    say(row)
    return row


def sweep_shape(s, rows, smoke, dkdv_list, dq_list):
    """Each TMA pass alone over its candidates (the other pass's tiles do not matter to it).
    Returns the config pairing the fastest of each, or None when a pass had none that ran."""
    import torch

    from ioattn.flash.bwd_tma import dkdv_tma, dq_tma
    from ioattn.flash.config import get_tma_bwd_config

    default = get_tma_bwd_config(s.D, s.q.dtype, s.causal, interpret=False)
    dk, dv, dq = torch.empty_like(s.k), torch.empty_like(s.v), torch.empty_like(s.q)
    ins = (s.q, s.k, s.v, s.dout, s.lse, s.delta)
    best = {}
    for kind, cands, factor in (("dkdv", dkdv_list, 2.0), ("dq", dq_list, 1.5)):
        for c in cands:
            cfg = with_pass(default, kind, c)
            if kind == "dkdv":
                run = lambda cfg=cfg: (dkdv_tma(*ins, dk, dv, s.scale, s.causal, 0, cfg), (dk, dv))[1]
                check = lambda g: (g, s.ref[1:])
            else:
                delta = torch.empty_like(s.delta)  # the dQ pass writes it
                run = lambda cfg=cfg, delta=delta: (dq_tma(s.q, s.k, s.v, s.dout, s.out, s.lse, delta, dq, s.scale,
                                                           s.causal, 0, cfg), (dq,))[1]
                check = lambda g: (g, s.ref[:1])
            r = try_config(s, kind, c, run, check, factor, smoke)
            rows.append(r)
            if "ms" in r and (kind not in best or r["ms"] < best[kind][1]):
                best[kind] = (c, r["ms"])
    if "dkdv" not in best or (dq_list and "dq" not in best):
        return None
    chosen = with_pass(default, "dkdv", best["dkdv"][0])
    return with_pass(chosen, "dq", best["dq"][0]) if dq_list else chosen


def with_pass(cfg, kind, c):
    """``cfg`` with one pass's (BLOCK_M, BLOCK_N, warps, stages) replaced by ``c``; a
    :class:`GluonDkdv` switches the dK/dV pass to the Gluon kernel with its fields."""
    if isinstance(c, GluonDkdv):
        return dataclasses.replace(cfg, gluon1=True, **c._asdict())
    if kind == "dkdv":
        names = ("BLOCK_M1", "BLOCK_N1", "warps1", "stages1", "device_desc1", "gluon1", "overlap1")
        c = (tuple(c) + (False,))[:5] + (False, False)
    else:
        names = ("BLOCK_M2", "BLOCK_N2", "warps2", "stages2")
    return dataclasses.replace(cfg, **dict(zip(names, c)))


def whole_configs(D, s, causal, best, gluon):
    """The whole backwards to time: the best pair of passes (if any), the default, and with
    ``gluon`` the default with the Triton dK/dV kernel instead."""
    from ioattn.flash.config import get_tma_bwd_config

    default = get_tma_bwd_config(D, s.q.dtype, causal, interpret=False)
    configs = {"tma-best": best} if best else {}
    configs["tma-dflt"] = default
    if gluon:
        configs["triton-dkdv"] = with_pass(default, "dkdv", TRITON_DKDV[D])
    return configs


def _flat(cfg):
    return tuple(dataclasses.astuple(cfg))


def compare_full(s, rows, smoke, configs):
    """The whole backward (Δ and both passes): portable default, then each TMA config."""
    from ioattn.flash.bwd import flash_bwd_triton
    from ioattn.flash.bwd_tma import flash_bwd_tma

    args = (s.dout, s.q, s.k, s.v, s.out, s.lse, s.scale, s.causal, 0)
    port = try_config(s, "portable", "default", lambda: flash_bwd_triton(*args), lambda g: (g, s.ref), 2.5, smoke)
    rows.append(port)
    for name, cfg in configs.items():
        rows.append(try_config(s, name, _flat(cfg), lambda cfg=cfg: flash_bwd_tma(*args, config=cfg),
                               lambda g: (g, s.ref), 2.5, smoke, port.get("ms")))


def ptxas_compile(fn, D, M, N, warps, stages, values, device_desc=False, reduce_dq=False):
    """Compile a backward kernel for sm_90 (no GPU needed) and return ptxas's report and the PTX.
    Descriptors of query rows (q, dO, dQ) have M-row tiles, of keys (k, v, dK, dV) N-row ones; with
    ``device_desc`` the kernel takes the tensors (16-byte aligned, as checked); ``reduce_dq``: dQ
    is added through an fp32 host descriptor (bwd_fused.py's bulk reduction)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    values = dict(values, HAS_RIGHT=True, HEAD_DIM=D, BLOCK_M=M, BLOCK_N=N, DOT_PRECISION="tf32")
    pointers = {"O": "*bf16", "DQ": "*fp32", "LSE": "*fp32", "DELTA": "*fp32"}
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in values:
            sig[name], constexprs[(i,)] = "constexpr", values[name]
        elif name == "desc_dq" and reduce_dq and not device_desc:
            sig[name] = f"tensordesc<fp32[1,1,{M},{D}]>"
        elif name.startswith("desc_") and (device_desc or name == "desc_dq" and fn.__name__.startswith("_bwd_dkdv")):
            sig[name], attrs[(i,)] = "*bf16", [["tt.divisibility", 16]]
        elif name.startswith("desc_"):
            rows_ = M if name in ("desc_q", "desc_do", "desc_dq") else N
            sig[name] = f"tensordesc<bf16[1,1,{rows_},{D}]>"
        else:
            sig[name] = pointers.get(name, {"softmax_scale": "fp32", "qk_scale": "fp32"}.get(name, "i32"))
            if name.startswith("stride_") or name in pointers:
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(k.asm["ptx"])
        info = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", path + ".o"],
                              capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", info).group(1)
    spill = re.search(r"(\d+) bytes spill stores", info).group(1)
    return f"regs {regs:>3}  spill {spill:>5} B  smem {k.metadata.shared // 1024} KiB", k.asm["ptx"]


def ptxas_report(Ds):
    """Compile each candidate for sm_90 (no GPU needed) and print ptxas's registers and spills."""
    from ioattn.flash import bwd_tma

    for D in Ds:
        for kind, fn, cands in (("dkdv", bwd_tma._bwd_dkdv_tma_kernel, DKDV[D]), ("dq", bwd_tma._bwd_dq_tma_kernel, DQ[D])):
            for c in cands:
                M, N, warps, stages = c[:4]
                device_desc = len(c) > 4 and c[4]
                values = dict(DEVICE_DESC=device_desc, ADD_DQ=False, TMA_REDUCE=False, DQ_T=False) if kind == "dkdv" else {}
                try:
                    report, _ = ptxas_compile(fn, D, M, N, warps, stages, values, device_desc)
                    print(f"D={D:<3} {kind:<4} {c!s:<24} {report}", flush=True)
                except Exception as e:
                    print(f"D={D:<3} {kind:<4} {c!s:<24} FAILED: {str(e).splitlines()[0][:120]}",
                          flush=True)


def setup(args):
    """The head dims asked for, after the interpreter flag (before triton is imported: the kernels
    then run in numpy on CPU tensors) and the source tree's path are set."""
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    return [int(d) for d in args.D.split(",")]


def main(argv=None):
    args = parse_args(argv)
    Ds = setup(args)
    if args.ptxas:
        return ptxas_report(Ds)
    import torch

    from ioattn.bench import machine

    T, T_long = (SMOKE_T, SMOKE_T_LONG) if args.smoke else (args.T, args.T_long)
    out = dict(header=machine.header("cpu" if args.smoke else "cuda", sys.argv), rows=[])
    out["header"]["command"] = shlex.join(["python3", *sys.argv])
    rows = out["rows"]

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)

    t0 = time.perf_counter()
    best = {}
    for D in Ds:
        for causal in (False, True):
            torch.manual_seed(0)
            s = Shape(D, T, causal, args.smoke)
            dkdv_list, dq_list = ([TRITON_DKDV[D]] + GLUON_DKDV[D], []) if args.gluon else (DKDV[D], DQ[D])
            best[D, causal] = None if args.whole_only else sweep_shape(s, rows, args.smoke, dkdv_list, dq_list)
            compare_full(s, rows, args.smoke, whole_configs(D, s, causal, best[D, causal], args.gluon))
            save()
    if T_long:
        for (D, causal), pair in best.items():
            del s
            torch.manual_seed(0)
            s = Shape(D, T_long, causal, args.smoke)
            compare_full(s, rows, args.smoke, whole_configs(D, s, causal, pair, args.gluon))
            save()
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
