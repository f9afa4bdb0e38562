"""Peak memory of one call beyond its inputs, in MiB.

CUDA: torch's caching allocator counts every byte: ``max_memory_allocated`` during the call minus
what was allocated before it (the inputs).

CPU: torch keeps no statistics there, so the kernel's high-water mark of resident memory is used
(``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``), minus the resident size before the
call. To make that honest the measurement runs in a worker process whose glibc malloc serves every
block of 64 KiB or more with its own mmap and unmaps it on free (``MALLOC_MMAP_THRESHOLD_``): memory
freed by an earlier call then cannot be reused unseen by the next one. Timing stays in the parent,
with the default malloc. Where ``/proc/self/clear_refs`` is missing (not Linux) the CPU peak is
reported as unknown (None) rather than guessed.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .cases import Case
from .peers import make_call, make_inputs

_SRC = str(Path(__file__).resolve().parents[2])


def cuda_peak_mib(call) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak / 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_peak_mib(call) -> float:
    """Peak resident memory added by ``call`` in this process (Linux only)."""
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    # Some kernels accept the write but keep the old high-water mark; a peak measured then would
    # be the largest of every earlier call. Report "unknown" rather than a wrong number.
    if _status_kib("VmHWM") > base + 1024:
        return float("nan")
    result = call()
    peak = _status_kib("VmHWM") - base
    del result
    return max(0, peak) / 1024


class CpuMemoryWorker:
    """A child process that measures CPU peaks one job at a time, over a line-based JSON pipe."""

    def __init__(self):
        self.proc = None
        if not Path("/proc/self/clear_refs").exists():
            return
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
                   PYTHONPATH=os.pathsep.join(filter(None, [_SRC, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", "ioattn.bench.memory"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        # Wait until the child has imported torch: on a 2-core machine its start-up would
        # otherwise run beside, and slow down, the first timings of the sweep.
        for line in self.proc.stdout:
            if line.strip() == "ready":
                break

    def peak_mib(self, case: Case, peer: str):
        """The peak, None where it cannot be measured, or "OOM"."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        self.proc.stdin.write(json.dumps({"case": case.__dict__, "peer": peer}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)["peak_mib"]
        return None

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _serve():
    warmed = set()
    print("ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        case, peer = Case(**job["case"]), job["peer"]
        try:
            inputs = make_inputs(case, "cpu")
            call = make_call(peer, case, inputs)
            if (peer, case.mode) not in warmed:
                # A peer's first call in a mode pays one-off costs (thread pools, lazy imports,
                # the first backward's autograd set-up): not attention.
                call()
                warmed.add((peer, case.mode))
            peak = rss_peak_mib(call)
        except Exception as e:
            peak = "OOM" if "out of memory" in str(e).lower() or "can't allocate" in str(e) else None
        print(json.dumps({"peak_mib": peak}), flush=True)


if __name__ == "__main__":
    _serve()
