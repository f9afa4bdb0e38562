"""The `ioattn` command: `env` (what runs here), `check` (every backend against the reference),
`bench` (speed and memory against the peers, or the kernels' first-call cost)."""
import argparse
import datetime
import signal
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
    from ioattn.bench.peers import PEERS, split_available

    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs, skipped = split_available(list(PEERS), device)
    print(f"peers      {', '.join(runs)} run on {device}"
          + "".join(f"\n           {p} does not: {why}" for p, why in skipped.items()))
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


def _parse_peers(text, device: str):
    """(peer names, None) or (None, the error message) from the --peers option."""
    from ioattn.bench.peers import DEFAULT_PEERS, PEERS

    peers = text.split(",") if text else list(DEFAULT_PEERS[device])
    if peers[0] != "ioattn" or not set(peers) <= set(PEERS):
        return None, (f"--peers must be ioattn then some of {', '.join(p for p in PEERS if p != 'ioattn')}"
                      " (the others are checked against ioattn)")
    return peers, None


def cmd_compile_cost(args, argv, device, name, cases) -> int:
    from ioattn.bench import compile_cost, machine, report

    if device != "cuda":
        print("ioattn bench --compile-cost: skipped, there is no GPU here: on a CPU Triton compiles "
              "nothing (the CPU backend is plain torch; the interpreter has no compile step)")
        return 0
    data = compile_cost.measure(cases, device, timeout=args.compile_timeout)
    header = machine.header(device, argv)
    print(f"first-call cost of ioattn's kernels, suite {name}: {header['name']} | torch "
          f"{header['torch']} | triton {header['triton']} | git {header['git_commit']}")
    print(compile_cost.format_cost(data))
    out = Path(args.out) if args.out else _default_out()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{datetime.date.today().isoformat()}_{machine.device_slug(device)}_compile-{name}.json"
    notes = {"what": compile_cost.__doc__.split("\n\n")[0].replace("\n", " "),
             "times": "wall seconds of one call, synchronized: *_first_s the first call of the "
                      "process, *_steady_s the next one; fwdbwd_first_s runs after the forward "
                      "was compiled, so it carries the backward's compile"}
    report.write_json(path, {"header": header, "suite": name, "notes": notes, **data})
    print(f"\nwrote {path}")
    bad = any("error" in p for p in data["processes"].values()) or not data["cache"]["warm_compiled_nothing"]
    return 1 if bad else 0


def cmd_bench(args, argv) -> int:
    from ioattn import backend_for
    from ioattn.bench import cases as registry
    from ioattn.bench import machine, report, runner
    from ioattn.bench.peers import split_available

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("ioattn bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    name = "quick" if args.quick else (args.suite or registry.default_suite(device))
    suite = registry.SUITES[name]
    peers, error = _parse_peers(args.peers, device)
    modes = args.modes.split(",")
    if error or not set(modes) <= set(registry.MODES):
        print(f"ioattn bench: {error or f'--modes must be some of {registry.MODES}'}", file=sys.stderr)
        return 2
    causal = {"both": None, "yes": True, "no": False}[args.causal]
    seqlens = {int(t) for t in args.seqlens.split(",")} if args.seqlens else None
    cases = registry.select(suite, dtype=args.dtype, causal=causal, modes=modes, seqlens=seqlens)
    if not cases:
        print(f"ioattn bench: no case of suite {name!r} matches the options", file=sys.stderr)
        return 2
    if args.compile_cost:
        return cmd_compile_cost(args, argv, device, name, cases)
    peers, unavailable = split_available(peers, device)
    header = machine.header(device, argv)
    header["ioattn_backend"] = backend_for(torch.device(device))
    # A time limit (`timeout`) stops the sweep the way Ctrl-C does: what finished is reported
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        # the progress bar only on a terminal: in a log its redraws bury the table
        results = runner.run(cases, peers, device, limits=suite.limits, quick=args.quick,
                             bar=sys.stderr.isatty())
    finally:
        signal.signal(signal.SIGTERM, previous)
    if device == "cuda":
        # sampled again after the sweep: the clocks under load, not the idle ones of the header
        header["clocks_after"] = machine.gpu_clocks()

    print(f"suite {name}: {suite.doc}")
    print(f"{header['name']} | torch {header['torch']} | triton {header['triton']} | "
          f"cuDNN {header['cudnn']} | ioattn backend {header['ioattn_backend']} | git {header['git_commit']}")
    for peer, why in unavailable.items():
        print(f"peer {peer} not run: {why}")
    print(report.format_table(results))
    baseline = "sdpa-cudnn" if device == "cuda" else "sdpa"
    data = report.to_dict(header, name, results, {**_NOTES, "suite": suite.doc}, baseline=baseline,
                          peers_unavailable=unavailable)
    # fewer done than planned: the sweep was stopped (a time limit) and reports what finished
    data["cases_done"], data["cases_planned"] = len({id(r.case) for r in results}), len(cases)
    print(report.format_summary(data["summary"], data["bar"]["series"], data["memory_growth"], baseline))
    out = Path(args.out) if args.out else _default_out()
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}_{machine.device_slug(device)}"
    if name != registry.default_suite(device):
        stem += f"_{name}"
    report.write_json(out / f"{stem}.json", data)
    if not args.no_plot:
        report.plot(out / f"{stem}.png", results, f"{header['name']}, {header['command']}")
    print(f"\nwrote {out / stem}.json{'' if args.no_plot else ' and .png'}")
    # Exit 1 when ioattn fails or disagrees with a peer; a peer's own error (a shape its version
    # does not take, say) is on its row, not a failure of ioattn
    bad = [r for r in results if (r.peer == "ioattn" and r.status.startswith("error"))
           or r.match is False]
    return 1 if bad else 0


_NOTES = {
    "flops": "fwd 4*B*H*T*T*D, halved when causal; fwdbwd 3.5x fwd; TFLOP/s = flops / median time",
    "timing": "triton.testing.do_bench median (CUDA); median of wall-clock repetitions after "
              "a warm-up (CPU)",
    "memory": "peak allocated during one call minus the inputs (CUDA); peak resident set of a "
              "worker process during one call minus before it (CPU)",
    "check": "rel_diff = max|peer - ioattn| / max|ioattn| over out (and dq, dk, dv)",
    "ratio": "ioattn/peer = peer ms / ioattn ms (= ioattn TFLOP/s / peer TFLOP/s); summary: "
             "geometric mean and minimum over T per series; bar: against the baseline, geomean "
             ">= 1.0 and no point < 0.9",
}


def build_parser() -> argparse.ArgumentParser:
    from ioattn.bench.cases import SUITES
    from ioattn.bench.peers import DEFAULT_PEERS, PEERS

    parser = argparse.ArgumentParser(prog="ioattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions, devices, and which backend a call on each device uses")

    p = sub.add_parser("check", help="every backend available here against the dense reference")
    p.add_argument("--backend", default="all", choices=["all", "cpu", "triton", "triton-interpreter"])
    p.add_argument("--json", action="store_true", help="print the rows as JSON (used by the "
                   "subprocess that runs the interpreter)")

    p = sub.add_parser("bench", help="speed and memory against the peers (torch SDPA and its "
                       "backends, FlexAttention, FA4, naive), or the kernels' first-call cost")
    p.add_argument("--suite", choices=sorted(SUITES) + ["decode"],
                   help="named sweep (default: paper on CUDA, cpu on a CPU); "
                   + "; ".join(f"{s.name}: {s.doc}" for s in SUITES.values()))
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="override the suite's dtype")
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--modes", default="fwd,fwdbwd", help="comma-separated subset of fwd,fwdbwd")
    p.add_argument("--seqlens", help="comma-separated subset of the suite's T values")
    p.add_argument("--peers", help="comma-separated, ioattn first, from: " + ", ".join(PEERS)
                   + " (default: " + "; ".join(f"{d}: {','.join(v)}" for d, v in DEFAULT_PEERS.items())
                   + "; a peer that cannot run here is listed as not run, with the reason)")
    p.add_argument("--out", help="output folder (default: benchmarks/results of the source tree)")
    p.add_argument("--quick", action="store_true",
                   help="the tiny 'quick' suite with few repetitions: a smoke test of the runner")
    p.add_argument("--no-plot", action="store_true",
                   help="write the JSON only (where the files that come back are counted)")
    p.add_argument("--compile-cost", action="store_true",
                   help="instead of timing: the first-call cost (Triton compile, then cache hit in "
                   "a second process) of each kernel configuration the selected cases use")
    p.add_argument("--compile-timeout", type=float, default=300.0,
                   help="seconds allowed to each of the two --compile-cost processes")
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
