"""The `ioattn` command: `env` (what runs here), `check` (every backend against the reference),
`bench` (speed and memory against PyTorch's attention)."""
import argparse
import datetime
import sys
from pathlib import Path

import torch


def _backend_line(device: str) -> str:
    from ioattn import backend_for

    try:
        return backend_for(torch.device(device))
    except ValueError as e:
        return f"none ({e})"


def cmd_env(args) -> int:
    import ioattn
    from ioattn.bench import machine

    commit, dirty = machine.git_commit()
    print(f"ioattn     {ioattn.__version__} from {Path(ioattn.__file__).parent} "
          f"(git {commit}{', modified' if dirty else ''})")
    for name, version in machine.versions().items():
        print(f"{name:<10} {version if version is not None else '-'}")
    cpu = machine.device_info("cpu")
    print(f"cpu        {cpu['name']}, {cpu['cores']} cores, {cpu['torch_threads']} torch threads"
          f" -> backend {_backend_line('cpu')}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}     {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB,"
                  f" sm_{p.major}{p.minor} -> backend {_backend_line(f'cuda:{i}')}")
        clocks = machine.gpu_clocks()
        if clocks:
            print("clocks     " + ", ".join(f"{k}={v}" for k, v in clocks.items()))
    else:
        print("gpu        none (torch.cuda.is_available() is False)")
    flags = machine.env_flags()
    print("flags      " + (" ".join(f"{k}={v}" for k, v in flags.items()) or "none set"))
    return 0


def cmd_check(args) -> int:
    from ioattn.bench import check

    backends, skipped = check.available_backends()
    if args.backend != "all":
        backends, skipped = [args.backend], {}
    rows = []
    for backend in backends:
        if not args.json:
            print(f"checking {backend} ...", file=sys.stderr, flush=True)
        rows += check.run_backend(backend)
    ok = bool(rows) and all(r.ok for r in rows)
    if args.json:
        print(check.rows_to_json(rows))
    else:
        print(check.format_rows(rows))
        for backend, why in skipped.items():
            print(f"{backend:<19} skipped: {why}")
        failed = sum(not r.ok for r in rows)
        print(f"\n{len(rows) - failed}/{len(rows)} passed"
              " (numbers: error / bound, where bound = 2x (3x for dq, dk, dv) plain PyTorch's error)")
    return 0 if ok else 1


def _default_out() -> Path:
    from ioattn.bench.machine import REPO

    root = REPO if (REPO / "benchmarks").is_dir() else Path.cwd()
    return root / "benchmarks" / "results"


def cmd_bench(args, argv) -> int:
    from ioattn import backend_for
    from ioattn.bench import cases as registry
    from ioattn.bench import machine, report, runner
    from ioattn.bench.peers import PEERS

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("ioattn bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    name = "quick" if args.quick else (args.suite or registry.default_suite(device))
    suite = registry.SUITES[name]
    peers, modes = args.peers.split(","), args.modes.split(",")
    if peers[0] != "ioattn" or not set(peers) <= set(PEERS) or not set(modes) <= set(registry.MODES):
        print(f"ioattn bench: --peers must be ioattn then some of {sorted(PEERS)} (the others are "
              f"checked against ioattn); --modes some of {registry.MODES}", file=sys.stderr)
        return 2
    causal = {"both": None, "yes": True, "no": False}[args.causal]
    seqlens = {int(t) for t in args.seqlens.split(",")} if args.seqlens else None
    cases = registry.select(suite, dtype=args.dtype, causal=causal, modes=modes, seqlens=seqlens)
    if not cases:
        print(f"ioattn bench: no case of suite {name!r} matches the options", file=sys.stderr)
        return 2
    header = machine.header(device, argv)
    header["ioattn_backend"] = backend_for(torch.device(device))
    results = runner.run(cases, peers, device, naive_max_T=suite.naive_max_T, quick=args.quick)

    print(f"suite {name}: {suite.doc}")
    print(f"{header['name']} | torch {header['torch']} | triton {header['triton']} | "
          f"ioattn backend {header['ioattn_backend']} | git {header['git_commit']}")
    print(report.format_table(results))
    out = Path(args.out) if args.out else _default_out()
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}_{machine.device_slug(device)}"
    if name != registry.default_suite(device):
        stem += f"_{name}"
    notes = {
        "suite": suite.doc,
        "flops": "fwd 4*B*H*T*T*D, halved when causal; fwdbwd 3.5x fwd; TFLOP/s = flops / median time",
        "timing": "triton.testing.do_bench median (CUDA); median of wall-clock repetitions after "
                  "a warm-up (CPU)",
        "memory": "peak allocated during one call minus the inputs (CUDA); peak resident set of a "
                  "worker process during one call minus before it (CPU)",
        "check": "rel_diff = max|peer - ioattn| / max|ioattn| over out (and dq, dk, dv)",
    }
    report.write_json(out / f"{stem}.json", report.to_dict(header, name, results, notes))
    report.plot(out / f"{stem}.png", results, f"{header['name']}, {header['command']}")
    print(f"\nwrote {out / stem}.json and .png")
    bad = [r for r in results if r.status.startswith("error") or r.match is False]
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    from ioattn.bench.cases import SUITES

    parser = argparse.ArgumentParser(prog="ioattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions, devices, and which backend a call on each device uses")

    p = sub.add_parser("check", help="every backend available here against the dense reference")
    p.add_argument("--backend", default="all", choices=["all", "cpu", "triton", "triton-interpreter"])
    p.add_argument("--json", action="store_true", help="print the rows as JSON (used by the "
                   "subprocess that runs the interpreter)")

    p = sub.add_parser("bench", help="speed and memory against naive attention and torch SDPA")
    p.add_argument("--suite", choices=sorted(SUITES) + ["decode"],
                   help="named sweep (default: paper on CUDA, cpu on a CPU); "
                   + "; ".join(f"{s.name}: {s.doc}" for s in SUITES.values()))
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="override the suite's dtype")
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--modes", default="fwd,fwdbwd", help="comma-separated subset of fwd,fwdbwd")
    p.add_argument("--seqlens", help="comma-separated subset of the suite's T values")
    p.add_argument("--peers", default="ioattn,sdpa,naive", help="comma-separated, ioattn first")
    p.add_argument("--out", help="output folder (default: benchmarks/results of the source tree)")
    p.add_argument("--quick", action="store_true",
                   help="the tiny 'quick' suite with few repetitions: a smoke test of the runner")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "bench" and args.suite == "decode":
        # Decoding has its own cases, options and metric (KV bytes read per second): bench/decode.py.
        from ioattn.bench.decode import main as bench_decode

        return bench_decode(argv[1:])
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "env":
        return cmd_env(args)
    if args.command == "check":
        return cmd_check(args)
    return cmd_bench(args, argv)
