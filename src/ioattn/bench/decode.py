"""Decoding benchmark: flash_attn_with_kvcache against torch's attention on the same KV cache.

One decoding step (Tq = 1, no append, every sequence's cache full) of GQA attention, measured as
KV bytes read per second: ``2 · B · ctx · Hkv · D · itemsize`` bytes (K and V, each read once,
the least any exact method reads) over the median time. Peers, run in the same process on the
same inputs, each checked against ioattn's contiguous result before it is timed:

- ioattn on the contiguous cache and on paged copies of it (16- and 256-token pages, shuffled),
  with the lengths as a tensor (checked on the device values: one read-back a call); on CUDA
  once more with the lengths as an int (``ioattn-intlens``: checked on the host, nothing read
  back), what a caller that keeps its lengths on the host gets eagerly;
- torch SDPA with the cuDNN and flash backends (CUDA) or its default and math backends (CPU),
  on ``[B, H, T, D]`` views of the cache with ``enable_gqa``;
- FlexAttention (CUDA, compiled) and FA4 (``flash_attn.cute``, where installed);
- on CUDA, ioattn and SDPA-cuDNN once more replayed from a CUDA graph (``+graph``), as decoding
  loops run in servers: at small sizes the eager calls are bound by their Python and launch
  overhead (ioattn's includes the value checks' read-back, off inside the graph), the graphs by
  the GPU.

    python -m ioattn bench --suite decode            # CUDA: the H200 grid; CPU: a small one
    python -m ioattn.bench.decode --device cpu --quick
"""
import argparse
import datetime
import functools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import machine
from .runner import time_ms

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Loose agreement with ioattn, relative to its largest magnitude: catches a peer computing
# something else, far above the rounding of the input precision.
MATCH_RTOL = {"bf16": 5e-2, "fp16": 2e-2, "fp32": 2e-3}


@dataclass(frozen=True)
class DecodeCase:
    B: int
    ctx: int
    H: int = 32
    Hkv: int = 8
    D: int = 128
    dtype: str = "bf16"

    @property
    def kv_bytes(self) -> int:
        return 2 * self.B * self.ctx * self.Hkv * self.D * DTYPES[self.dtype].itemsize


def grid(device: str, quick: bool) -> list:
    """The issue's H200 grid (B ∈ {1, 8, 64} × ctx ∈ {1k, 8k, 32k, 128k}, bf16), or a CPU grid
    that takes a few minutes on 2 cores (fp32); ``quick`` keeps the smallest cases."""
    if device == "cuda":
        batches, contexts, dtype = (1, 8, 64), (1024, 8192, 32768, 131072), "bf16"
    else:
        batches, contexts, dtype = (1, 4), (1024, 4096, 16384), "fp32"
    if quick:
        batches, contexts = batches[:2], contexts[:2]
    return [DecodeCase(B, ctx, dtype=dtype) for B in batches for ctx in contexts]


def paginate(k, v, page_size: int):
    """``(k_paged, v_paged, block_table)``: the caches' pages stored in one shuffled order."""
    B, T = k.shape[:2]
    n = B * T // page_size
    perm = torch.randperm(n, device=k.device)

    def one(cache):
        paged = torch.empty(n, page_size, *cache.shape[2:], dtype=cache.dtype, device=cache.device)
        paged[perm] = cache.reshape(n, page_size, *cache.shape[2:])
        return paged
    return one(k), one(v), perm.view(B, -1).to(torch.int32)


def _ioattn(q, k, v, seqlens, block_table=None):
    from ioattn import flash_attn_with_kvcache
    return lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, block_table=block_table)


def _sdpa(q, k, v, backend):
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def call():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True).transpose(1, 2)
    return call


@functools.cache
def _compiled_flex():
    # One compiled function for the whole sweep: torch.compile turns the shapes dynamic after the
    # first recompile instead of compiling each of the 12 cases from scratch.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex(q, k, v):
    flex = _compiled_flex()
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return lambda: flex(qt, kt, vt, enable_gqa=True).transpose(1, 2)


def _fa4(q, k, v):
    from flash_attn.cute import flash_attn_func  # FA4 (CuTe DSL), where installed

    def call():
        out = flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    return call


def graphed(make):
    """``make()``'s call captured once in a CUDA graph and replayed (the captured call skips the
    value checks: they read indices back to the host, which a capture cannot do)."""
    call = make()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()

    def replay():
        graph.replay()
        return out
    # The graph reads the buffers the call was made over (a paged copy of the cache is made
    # inside make()): they must live as long as the graph does.
    replay.inputs = call
    return replay


def peers(device: str) -> list:
    from torch.nn.attention import SDPBackend

    ours = ["ioattn", "ioattn-paged16", "ioattn-paged256"]
    if device == "cuda":
        cudnn = ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)
        return ours + ["ioattn-intlens", cudnn, ("sdpa-flash", SDPBackend.FLASH_ATTENTION), "flex", "fa4", "ioattn+graph",
                       "ioattn-paged16+graph", ("sdpa-cudnn+graph", SDPBackend.CUDNN_ATTENTION)]
    return ours + [("sdpa", SDPBackend.FLASH_ATTENTION), ("sdpa-math", SDPBackend.MATH)]


def _make_call(peer, q, k, v, seqlens):
    name = peer[0] if isinstance(peer, tuple) else peer
    if name.endswith("+graph"):
        plain = (name.removesuffix("+graph"), peer[1]) if isinstance(peer, tuple) else name.removesuffix("+graph")
        return graphed(lambda: _make_call(plain, q, k, v, seqlens))
    if isinstance(peer, tuple):
        return _sdpa(q, k, v, peer[1])
    if peer == "ioattn":
        return _ioattn(q, k, v, seqlens)
    if peer == "ioattn-intlens":
        # Every cache is full: the same lengths as one int.
        return _ioattn(q, k, v, k.shape[1])
    if peer.startswith("ioattn-paged"):
        kp, vp, table = paginate(k, v, int(peer.removeprefix("ioattn-paged")))
        return _ioattn(q, kp, vp, seqlens, table)
    return {"flex": _flex, "fa4": _fa4}[peer](q, k, v)


def run_case(case: DecodeCase, device: str, *, quick: bool) -> list:
    dt = DTYPES[case.dtype]
    q = torch.randn(case.B, 1, case.H, case.D, device=device, dtype=dt)
    k = torch.randn(case.B, case.ctx, case.Hkv, case.D, device=device, dtype=dt)
    v = torch.randn_like(k)
    seqlens = torch.full((case.B,), case.ctx, dtype=torch.int32, device=device)
    rows, ref = [], None
    for peer in peers(device):
        name = peer[0] if isinstance(peer, tuple) else peer
        row = dict(asdict(case), peer=name, status="ok", us=None, tb_s=None, rel_diff=None)
        try:
            call = _make_call(peer, q, k, v, seqlens)
            out = call()
            if ref is None:
                ref = out
            row["rel_diff"] = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            del out
            if row["rel_diff"] > MATCH_RTOL[case.dtype]:
                row["status"] = "MISMATCH"
            else:
                ms = time_ms(call, device, quick=quick)
                row["us"], row["tb_s"] = ms * 1e3, case.kv_bytes / (ms * 1e-3) / 1e12
        except Exception as e:  # one peer failing (missing, unsupported, OOM) must not end the sweep
            row["status"] = f"error: {type(e).__name__}: {e}".splitlines()[0][:160]
        call = None
        if device == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def format_table(rows, baseline: str) -> str:
    """Per case one line per peer: µs, TB/s of KV read, speed relative to ``baseline`` and, for the
    paged caches, relative to ioattn's contiguous cache."""
    lines = [f"{'B':>3} {'ctx':>7}  {'peer':<16} {'us':>10} {'TB/s':>7}  {'vs ' + baseline:>16}  {'vs contig':>9}"]
    by_case = {}
    for r in rows:
        by_case.setdefault((r["B"], r["ctx"]), {})[r["peer"]] = r
    for (B, ctx), peers_ in by_case.items():
        base = peers_.get(baseline)
        for name, r in peers_.items():
            if r["status"] != "ok":
                lines.append(f"{B:>3} {ctx:>7}  {name:<16} {r['status']}")
                continue
            rel = f"{base['us'] / r['us']:.2f}x" if base and base["us"] else "-"
            # A paged cache against the contiguous one timed the same way (eager or graph).
            contig = peers_.get("ioattn+graph" if name.endswith("+graph") else "ioattn")
            ok = name.startswith("ioattn-paged") and contig and contig["status"] == "ok" and contig["us"]
            paged = f"{contig['us'] / r['us']:.2f}x" if ok else ""
            lines.append(f"{B:>3} {ctx:>7}  {name:<16} {r['us']:>10.1f} {r['tb_s']:>7.3f}  {rel:>16}  {paged:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ioattn bench --suite decode", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--quick", action="store_true", help="the smallest cases, few repetitions")
    p.add_argument("--out", help="output folder (default: benchmarks/results of the source tree)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's); 1 keeps "
                   "timings steady on a machine shared with other work")
    args, _ = p.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rest = [a for a in (argv or []) if a not in ("--suite", "decode")]
    header = machine.header(device, ["bench", "--suite", "decode", *rest])
    baseline = "sdpa-cudnn" if device == "cuda" else "sdpa"
    out = Path(args.out) if args.out else machine.REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{datetime.date.today().isoformat()}_{machine.device_slug(device)}_decode.json"
    notes = {"suite": __doc__.split("\n\n")[1].replace("\n", " "),
             "timing": "triton.testing.do_bench median (CUDA); median of wall-clock repetitions (CPU)",
             "tb_s": "2*B*ctx*Hkv*D*itemsize bytes / median time", "baseline": baseline}
    rows = []
    for case in grid(device, args.quick):
        print(f"B={case.B} ctx={case.ctx} ...", file=sys.stderr, flush=True)
        rows += run_case(case, device, quick=args.quick)
        # Written after every case: a run stopped at its time limit keeps what it measured.
        path.write_text(json.dumps({"header": header, "suite": "decode", "notes": notes, "results": rows},
                                   indent=1) + "\n")
    print(f"{header['name']} | torch {header['torch']} | triton {header['triton']} | git {header['git_commit']}")
    print(format_table(rows, baseline))
    print(f"\nwrote {path}")
    return 1 if any(r["status"] == "MISMATCH" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
