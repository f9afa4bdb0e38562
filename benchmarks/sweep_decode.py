"""Time the split-KV decoding kernel (decode/kernel.py) under candidate configs and split counts.

    PYTHONPATH=src python3 benchmarks/sweep_decode.py --out $OUT/sweep_decode.json
    PYTHONPATH=src python3 benchmarks/sweep_decode.py --smoke   # no GPU: candidates in the interpreter

One decoding step as the decode benchmark's (bf16, Tq = 1, H = 32, Hkv = 8, D = 128, cache full)
at each --points (B, ctx). The default config (get_decode_config, heuristic splits) is the
reference; every variant x num_splits is checked against it (max abs difference over max abs
value <= TOL) and timed replayed from a CUDA graph (graph_ms: do_bench of the replay, L2
flushed before each, median; the combine launch included when there are splits). TB/s = K and V bytes read once /
time. Then the same on a shuffled 16-token paged copy of the cache, against the contiguous
default. One flushed line per result; past --budget seconds no new candidate starts; the JSON is
rewritten after every point.
"""
import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, replace

if "--smoke" in sys.argv:
    # Before triton is imported: the interpreter runs the kernels on CPU tensors.
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend  # noqa: E402

from ioattn.bench.decode import _sdpa, graphed, paginate  # noqa: E402
from ioattn.bench.machine import header  # noqa: E402
from ioattn.decode import combine  # noqa: E402
from ioattn.decode.config import get_decode_config  # noqa: E402
from ioattn.decode.kernel import kvcache_fwd_triton  # noqa: E402

# The questions of this sweep, as variants of the default config: on a contiguous cache every
# split count worth trying (small grids only) and 3 stages; on 16-token pages 2, 3 or 4 stages
# with page numbers loaded in the tile or a tile ahead, at several split counts. (Its first run, at 73dd0a9, also timed
# splits merged by their last program inside the kernel instead of the combine launch: 1.1-1.8x
# slower, since that program loaded the splits one after another; removed.)
SPLITS = (0, 1, 2, 4, 8, 16, 32, 64)
PAGED_SPLITS = (0, 8, 16, 32, 64)
TOL = 2e-2
SMS = 132  # H200; split counts other than the heuristic's are tried only under two waves


def contiguous_variants(default):
    return [replace(default, num_stages=3)]


def paged_variants(default):
    return [replace(default, num_stages=s, prefetch_pages=p) for s in (2, 3, 4) for p in (False, True)
            if (s, p) != (default.num_stages, default.prefetch_pages)]


def splits_for(B, Hkv):
    return SPLITS if B * Hkv < 2 * SMS else (0,)


def name(cfg, splits):
    return (f"{cfg.BLOCK_M}x{cfg.BLOCK_N} w{cfg.num_warps} s{cfg.num_stages}"
            f"{' prefetch' if cfg.prefetch_pages else ''}"
            f" splits={splits or 'auto'}")


def rel_diff(got, ref):
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def inputs(B, ctx, H, Hkv, D, dtype, device):
    # Fresh random values: zeros would let a kernel that skips keys agree with the reference.
    q = torch.randn(B, 1, H, D, device=device, dtype=dtype)
    k = torch.randn(B, ctx, Hkv, D, device=device, dtype=dtype)
    return q, k, torch.randn_like(k), torch.full((B,), ctx, dtype=torch.int32, device=device)


def call(q, k, v, seqlens, cfg, splits, table=None):
    scale = q.shape[-1] ** -0.5
    return lambda: kvcache_fwd_triton(q, k, v, seqlens, scale, False, block_table=table,
                                      num_splits=splits, config=cfg)[0]


def check(fn, ref):
    """"" when fn() agrees with ref, else why (a compile or launch failure included)."""
    try:
        d = rel_diff(fn(), ref)
    except Exception as e:  # out of shared memory, compile errors: reported, the sweep goes on
        return f"failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
    return "" if d <= TOL else f"differs by {d:.2e} (tolerance {TOL})"


def graph_ms(fn) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (captured as the decode benchmark does), as
    a decoding server runs it (eager calls at small caches would time the host's launch
    overhead), with L2 flushed before each replay by do_bench, as the decode benchmark does:
    do_bench_cudagraph (the first runs of this sweep) replays back to back, so caches that fit
    the 60 MB L2 were read from it."""
    return triton.testing.do_bench(graphed(lambda: fn), return_mode="median")

def sweep_point(B, ctx, deadline, rows, tiles=(), pdl_ab=False, splits_list=None, paged=True, rounds=1,
                cudnn=False):
    H, Hkv, D = 32, 8, 128
    q, k, v, seqlens = inputs(B, ctx, H, Hkv, D, torch.bfloat16, "cuda")
    default = get_decode_config(H // Hkv, D, torch.bfloat16, interpret=False)
    ref = call(q, k, v, seqlens, default, 0)()
    kv_bytes = 2 * B * ctx * Hkv * D * 2
    base = {}

    def timed(label, cfg, splits, fn):
        if time.perf_counter() > deadline:
            print(f"B={B} ctx={ctx} {label} {name(cfg, splits)}: skipped (budget)", flush=True)
            return None
        meta = dict(B=B, ctx=ctx, kind=label, config=asdict(cfg), num_splits=splits)
        why = check(fn, ref)
        if why:
            print(f"B={B} ctx={ctx} {label} {name(cfg, splits)}: {why}", flush=True)
            rows.append(dict(meta, error=why))
            return None
        ms = graph_ms(fn)
        tb_s = kv_bytes / (ms * 1e-3) / 1e12
        base.setdefault(label, ms)
        ratio = base[label] / ms
        print(f"B={B:<3} ctx={ctx:<6} {label:<7} {name(cfg, splits):<44} {tb_s:6.3f} TB/s  {ms * 1e3:8.1f} us"
              f"  x{ratio:.3f} vs default", flush=True)
        rows.append(dict(meta, ms=ms, tb_s=tb_s, vs_default=ratio))
        return ms

    timed("contig", default, 0, call(q, k, v, seqlens, default, 0))
    if pdl_ab:
        # --pdl-ab: the default with the combine launched after the split kernel as a plain launch
        # (combine.PDL off), against the programmatic dependent launch above.
        combine.PDL = False
        try:
            ms_off = timed("no-pdl", default, 0, call(q, k, v, seqlens, default, 0))
        finally:
            combine.PDL = True
        if ms_off and base.get("contig"):
            print(f"B={B} ctx={ctx} PDL on/off: x{ms_off / base['contig']:.3f} speed", flush=True)
            rows[-1]["pdl_speedup"] = ms_off / base["contig"]
    if tiles or splits_list:
        # --tiles: other (BLOCK_N, warps, stages) on the contiguous cache at the default splits;
        # --splits: these split counts of the default config. --rounds repeats them all (the
        # default first), interleaved, to show a run's spread; --cudnn times SDPA's cuDNN
        # backend's graph replay in each round too.
        jobs = [(replace(default, BLOCK_N=n, num_warps=w, num_stages=st), 0) for n, w, st in tiles]
        jobs += [(default, splits) for splits in splits_list or ()]
        for r in range(rounds):
            if r:
                timed("contig", default, 0, call(q, k, v, seqlens, default, 0))
            for cfg, splits in jobs:
                if (cfg, splits) != (default, 0):
                    timed("contig", cfg, splits, call(q, k, v, seqlens, cfg, splits))
            if cudnn:
                timed("cudnn", default, 0, _sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION))
        if tiles or not paged:
            return
    else:
        for cfg in [default] + contiguous_variants(default):
            for splits in splits_for(B, Hkv):
                if (cfg, splits) != (default, 0):
                    timed("contig", cfg, splits, call(q, k, v, seqlens, cfg, splits))
    if not paged:
        return
    # Paged (16-token pages, shuffled): the cost of the gather, against the contiguous default.
    kp, vp, table = paginate(k, v, 16)
    for cfg in [default] + paged_variants(default):
        for splits in PAGED_SPLITS if B * Hkv < 2 * SMS else (0,):
            ms = timed("paged16", cfg, splits, call(q, kp, vp, seqlens, cfg, splits, table))
            if ms is not None and base.get("contig"):
                print(f"B={B} ctx={ctx} paged16/contig {name(cfg, splits)}: x{base['contig'] / ms:.3f} speed",
                      flush=True)
                rows[-1]["paged_vs_contig"] = base["contig"] / ms


def smoke():
    """Every candidate x split count on a tiny fp16 shape on CPU, against the default config."""
    B, ctx, H, Hkv, D = 2, 208, 4, 2, 64  # 13 pages of 16 (paginate needs whole pages); 208 % 64 != 0
    q, k, v, seqlens = inputs(B, ctx, H, Hkv, D, torch.float16, "cpu")
    default = get_decode_config(H // Hkv, D, torch.float16, interpret=False)
    ref = call(q, k, v, seqlens, default, 0)()
    # The default itself against plain softmax attention, so agreeing with it means something.
    kr, vr = (x.float().repeat_interleave(H // Hkv, dim=2) for x in (k, v))
    p = torch.einsum("bqhd,bkhd->bhqk", q.float(), kr).mul(D**-0.5).softmax(-1)
    bad = rel_diff(ref, torch.einsum("bhqk,bkhd->bqhd", p, vr)) > TOL
    print(f"default {name(default, 0)} vs torch: {'FAILED' if bad else 'ok'}", flush=True)
    kp, vp, table = paginate(k, v, 16)
    for cfg in [default] + contiguous_variants(default) + paged_variants(default):
        for splits in (0, 1, 2, 4):
            why = check(call(q, k, v, seqlens, cfg, splits), ref)
            if not why:
                paged = check(call(q, kp, vp, seqlens, cfg, splits, table), ref)
                why = paged and "paged: " + paged
            bad += bool(why)
            print(f"{name(cfg, splits)}: {why or 'ok'}", flush=True)
    return bad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", nargs="+", default=["1,1024", "1,8192", "1,131072", "8,1024", "8,32768", "64,8192"],
                   help="B,ctx pairs")
    p.add_argument("--budget", type=float, default=150.0, help="seconds; later candidates are skipped")
    p.add_argument("--smoke", action="store_true", help="no GPU: check the candidates in the interpreter")
    p.add_argument("--tiles", nargs="*", default=[],
                   help="BLOCK_N,warps,stages triples: time only these tiles against the default")
    p.add_argument("--pdl-ab", action="store_true",
                   help="also time the default with the combine launched without PDL")
    p.add_argument("--splits", nargs="*", type=int, default=None,
                   help="time the default config at these split counts only (contiguous cache)")
    p.add_argument("--no-paged", action="store_true", help="skip the paged cache")
    p.add_argument("--rounds", type=int, default=1, help="with --tiles or --splits: time them this many times")
    p.add_argument("--cudnn", action="store_true", help="with --tiles or --splits: time SDPA's cuDNN graph too")
    p.add_argument("--out")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.smoke:
        bad = smoke()
        print(f"smoke: {bad} failed; took {time.perf_counter() - t0:.0f} s", flush=True)
        sys.exit(1 if bad else 0)
    meta = dict(header("cuda", []), command=shlex.join(["python3", *sys.argv]))
    rows = []
    for point in args.points:
        B, ctx = map(int, point.split(","))
        sweep_point(B, ctx, t0 + args.budget, rows, [tuple(map(int, t.split(","))) for t in args.tiles],
                    pdl_ab=args.pdl_ab, splits_list=args.splits, paged=not args.no_paged, rounds=args.rounds,
                    cudnn=args.cudnn)
        torch.cuda.empty_cache()
        if args.out:  # after every point: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(dict(meta, rows=rows), f, indent=1, default=str)
    print(f"sweep took {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
