"""First-call cost: how long ioattn's first forward and first backward take in a process that
starts with an empty Triton cache (compile + run), and in a second fresh process that shares the
cache (load + run), against the same calls once warm.

One kernel configuration is what Triton specializes on: head dim, causal or not, dtype, window,
GQA or not (the suites' T are multiples of every tile, so T adds none). Each runs at the smallest
shape of the suite that uses it. The two measurements are child processes
(``python -m ioattn.bench.compile_cost``), so nothing compiled by this process, nor a cache left
by an earlier run, can hide a compile; the cache is a fresh temporary folder.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import triton
import triton.language as tl

from .cases import Case

_SRC = str(Path(__file__).resolve().parents[2])
PHASES = ("cold", "warm")
TIMES = ("fwd_first_s", "fwd_steady_s", "fwdbwd_first_s", "fwdbwd_steady_s")


def kernel_configs(cases) -> list:
    """One case per distinct kernel configuration of ``cases``: the smallest T, run as fwdbwd."""
    chosen = {}
    for c in sorted(cases, key=lambda c: c.T):
        key = (c.D, c.causal, c.dtype, c.window, c.H != c.Hkv)
        chosen.setdefault(key, replace(c, mode="fwdbwd"))
    return list(chosen.values())


def _files(folder: str) -> int:
    return sum(len(names) for _, _, names in os.walk(folder))


def _child(cases, device: str, cache_dir: str, timeout: float) -> dict:
    """One fresh process over every configuration: {"pid", "setup_s", "rows"} or {"error"}."""
    env = dict(os.environ, TRITON_CACHE_DIR=cache_dir,
               PYTHONPATH=os.pathsep.join(filter(None, [_SRC, os.environ.get("PYTHONPATH")])))
    # The interpreter compiles nothing: the measurement is of the compiled path only
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "ioattn.bench.compile_cost", device,
           json.dumps([asdict(c) for c in cases])]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out, err = (e.stdout or b""), f"timed out after {timeout:.0f} s"
        out = out.decode() if isinstance(out, bytes) else out
    else:
        out, err = done.stdout, None
        if done.returncode != 0:
            err = f"exited {done.returncode}: " + (done.stderr.strip().splitlines() or ["no output"])[-1]
    # The child prints one JSON line per configuration as it goes: a timeout keeps what finished
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    head = next((x for x in lines if "setup_s" in x), {})
    result = {"pid": head.get("pid"), "setup_s": head.get("setup_s"),
              "rows": [x for x in lines if "case" in x]}
    if err:
        result["error"] = err
    return result


def measure(cases, device: str = "cuda", *, timeout: float = 300.0) -> dict:
    """Cold then warm first-call times of each configuration; the cache's file count after each
    says whether the warm process compiled anything (it should not)."""
    configs = kernel_configs(cases)
    with tempfile.TemporaryDirectory(prefix="ioattn-triton-cache-") as cache_dir:
        cold = _child(configs, device, cache_dir, timeout)
        files_cold = _files(cache_dir)
        warm = _child(configs, device, cache_dir, timeout)
        files_warm = _files(cache_dir)
    rows = []
    for c in configs:
        row = {k: v for k, v in asdict(c).items() if k != "mode"}
        for phase, got in (("cold", cold), ("warm", warm)):
            row[phase] = next((r["times"] for r in got["rows"] if r["case"] == asdict(c)), None)
        rows.append(row)
    return {"configs": rows,
            "processes": {p: {k: v for k, v in got.items() if k != "rows"}
                          for p, got in (("cold", cold), ("warm", warm))},
            "cache": {"files_after_cold": files_cold, "files_after_warm": files_warm,
                      "warm_compiled_nothing": files_warm == files_cold}}


def _label(r: dict) -> str:
    mask = "causal" if r["causal"] else "non-causal"
    if r["window"] >= 0:
        mask += f" window {r['window']}"
    gqa = " GQA" if r["H"] != r["Hkv"] else ""
    return f"D={r['D']} {mask} {r['dtype']}{gqa} (B{r['B']} T{r['T']} H{r['H']})"


def _cell(times, key: str, width: int) -> str:
    return f"{times[key]:>{width}.3f}" if times and key in times else f"{'-':>{width}}"


def format_cost(data: dict) -> str:
    """One row per configuration: the first call cold (empty cache), warm (cache filled by the
    cold process) and steady (a second call in the same process), forward then forward+backward."""
    lines = [f"{'configuration':<44} {'fwd: cold':>10} {'warm':>7} {'steady':>8}   "
             f"{'fwd+bwd: cold':>13} {'warm':>7} {'steady':>8}   (seconds)"]
    for r in data["configs"]:
        cold, warm = r["cold"], r["warm"]
        lines.append(f"{_label(r):<44} {_cell(cold, 'fwd_first_s', 10)} "
                     f"{_cell(warm, 'fwd_first_s', 7)} {_cell(cold, 'fwd_steady_s', 8)}   "
                     f"{_cell(cold, 'fwdbwd_first_s', 13)} {_cell(warm, 'fwdbwd_first_s', 7)} "
                     f"{_cell(cold, 'fwdbwd_steady_s', 8)}")
    for phase, p in data["processes"].items():
        setup = "-" if p.get("setup_s") is None else f"{p['setup_s']:.3f}"
        error = f"; {p['error']}" if "error" in p else ""
        lines.append(f"{phase} process (pid {p.get('pid')}): Triton's one-time setup {setup} s{error}")
    cache = data["cache"]
    verdict = ("nothing recompiled" if cache["warm_compiled_nothing"]
               else "the warm process COMPILED AGAIN")
    lines.append(f"Triton cache: {cache['files_after_cold']} files after the cold process, "
                 f"{cache['files_after_warm']} after the warm one ({verdict})")
    return "\n".join(lines)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(call, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    call()
    _sync(device)
    return time.perf_counter() - t0


@triton.jit
def _touch(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1)


def _triton_setup_s(device) -> float:
    """The first launch of any Triton kernel builds Triton's driver helpers (cached too): timed
    apart, on a one-line kernel, so that it is not charged to the first configuration."""
    if device != "cuda":
        return 0.0
    x = torch.zeros(1, device=device)
    return _timed(lambda: _touch[(1,)](x), device)


def _main(device: str, cases_json: str) -> None:
    from ioattn.bench.peers import make_call, make_inputs

    # The CUDA context is not a compile: created before anything is timed
    torch.zeros(1, device=device).sum().item()
    print(json.dumps({"pid": os.getpid(), "setup_s": _triton_setup_s(device)}), flush=True)
    for spec in json.loads(cases_json):
        case = Case(**spec)
        inputs = make_inputs(case, device)
        fwd = make_call("ioattn", replace(case, mode="fwd"), inputs)
        fwdbwd = make_call("ioattn", case, inputs)
        times = {"fwd_first_s": _timed(fwd, device), "fwd_steady_s": _timed(fwd, device),
                 "fwdbwd_first_s": _timed(fwdbwd, device), "fwdbwd_steady_s": _timed(fwdbwd, device)}
        print(json.dumps({"case": spec, "times": times}), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
