"""Run a compile-only script (``python -m tests.<...>``) for tests that read what ptxas reports.

Triton's interpreter has no compiler, so these scripts run in a child process without
TRITON_INTERPRET; no GPU is needed (triton ships ptxas). Each prints one JSON line last."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_report(module: str, timeout: int = 300):
    """Run ``python -m module`` from the repository root and return its last line, parsed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + str(ROOT)
    done = subprocess.run([sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# An H200 SM: 228 KB of shared memory, 1 KB of it the driver's per program; 64K registers,
# allocated in units of 256 a warp.
SM_SHARED, SM_REGISTERS = 233472, 65536


def programs_per_sm(regs: int, shared: int, warps: int) -> int:
    """Programs of a compiled kernel (registers a thread, shared memory, warps) that fit on one
    H200 SM at once."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    return min(SM_SHARED // (shared + 1024), SM_REGISTERS // (regs_per_warp * warps))
