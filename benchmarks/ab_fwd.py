"""Time named forward configs against each other in alternated rounds, on fresh inputs each round.

    PYTHONPATH=src python3 benchmarks/ab_fwd.py --D 128 --causal yes --T 1024 2048 \
        --configs table pp=128,128,4,2,0,1,1,0 persistent=128,128,4,2,0,1,1,1 --rounds 3

A single sweep (sweep_fwd_tma.py) times each config once; between two runs on the H200 the same
config has moved by 2-5%, and by more between input tensors (benchmarks/LOG.md v1.25: a mode
of the D = 128 causal forward that went with the inputs' placement). Here every round draws new
inputs (paper grid shapes, bf16) and times every config on them, in order, so that a difference
that holds in every round is the configs' and not the round's. ``table`` is what the dispatch
runs (flash/config.py's tables); ``NAME=M,N,...`` a Gluon config in sweep_fwd_tma.py's --configs
format, ``NAME=tma:M,N,WARPS,STAGES`` a Triton TMA one. Each is checked against the portable
kernel once. Prints ms per round and the median, writes JSON with a machine header (--out).
"""
import argparse
import json
import os
import shlex
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import triton  # noqa: E402

from ioattn.bench.machine import header  # noqa: E402
from ioattn.flash.config import TmaFwdConfig  # noqa: E402
from ioattn.flash.dispatch import kernels_for  # noqa: E402
from ioattn.flash.fwd import flash_fwd_triton  # noqa: E402
from sweep_fwd_tma import Gluon, disagreement, launcher  # noqa: E402


def parse(spec: str):
    """``table``, ``NAME=M,N,...`` (Gluon) or ``NAME=tma:M,N,W,S`` → (name, forward(q, k, v, scale, causal))."""
    if spec == "table":
        fwd = kernels_for(torch.device("cuda"))[0]
        return spec, lambda q, k, v, s, c: fwd(q, k, v, s, c, 0)
    name, _, body = spec.partition("=")
    if body.startswith("tma:"):
        cfg = TmaFwdConfig(*map(int, body[4:].split(",")))
    else:
        c = list(map(int, body.split(",")))
        cfg = Gluon(*c[:4], *map(bool, c[4:8]), *c[8:10], *map(bool, c[10:12]), *c[12:])
    run = launcher(cfg)
    return name, lambda q, k, v, s, causal: run(q, k, v, s, causal, 0, config=cfg)


def alternate(label: str, configs, rounds: int, make_inputs, reference, check, meta: dict) -> list:
    """Time every ``(name, fn)`` of ``configs`` on the inputs of each round in turn (``fn(*inputs)``;
    ``make_inputs()`` draws new ones a round), after checking each against ``reference(*inputs)``
    with ``check(got, want)`` (a reason, or "") in the first round; a config that fails or
    disagrees is reported and dropped. Prints ms per round and the median after ``label``;
    returns one row per config (``meta`` plus its times)."""
    times = {name: [] for name, _ in configs}
    bad = set()
    for r in range(rounds):
        inputs = make_inputs()
        want = reference(*inputs) if r == 0 else None
        for name, fn in configs:
            if name in bad:
                continue
            try:
                if want is not None:
                    why = check(fn(*inputs), want)
                    if why:
                        raise ValueError(why)
                ms = triton.testing.do_bench(lambda: fn(*inputs), warmup=25, rep=100, return_mode="median")
            except Exception as e:  # reported, not fatal: the other configs still run
                print(f"{label} {name}: {type(e).__name__}: {str(e).strip()[:160]}", flush=True)
                bad.add(name)
                continue
            times[name].append(ms)
    rows = []
    for name, ms in times.items():
        if ms:
            med = statistics.median(ms)
            print(f"{label} {name:<14} " + " / ".join(f"{x:.3f}" for x in ms) + f"  median {med:.3f} ms", flush=True)
            rows.append(dict(meta, config=name, ms=ms, median_ms=med))
    return rows


def write(path, rows, configs):
    """The rows as JSON with a machine header and the command line."""
    with open(path, "w") as f:
        meta = dict(header("cuda", []), command=shlex.join(["python3", *sys.argv]), configs=configs)
        json.dump(dict(meta, rows=rows), f, indent=1, default=str)


# --causal's choices as the maskings they run.
CAUSAL = {"both": (False, True), "yes": (True,), "no": (False,)}


def parser(doc: str) -> argparse.ArgumentParser:
    """The arguments both A/B scripts take (head dims, lengths, masking, configs, rounds, --out)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--D", type=int, nargs="+", default=[128])
    p.add_argument("--T", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--causal", default="yes", choices=tuple(CAUSAL))
    p.add_argument("--configs", nargs="+", default=["table"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    return p


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    configs = [parse(s) for s in args.configs]
    rows = []
    for D in args.D:
        for causal in CAUSAL[args.causal]:
            for T in args.T:
                B, H = 16384 // T, 2048 // D

                def inputs():
                    return (*(torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)),
                            D**-0.5, causal)

                def reference(q, k, v, scale, causal):
                    return flash_fwd_triton(q, k, v, scale, causal, 0)

                rows += alternate(f"D={D} causal={causal!s:<5} T={T:<5}", configs, args.rounds, inputs, reference,
                                  disagreement, dict(D=D, causal=causal, T=T))
    if args.out:
        write(args.out, rows, args.configs)


if __name__ == "__main__":
    main()
