"""What machine and software a result came from: the header of every benchmark file and `ioattn env`."""
import datetime
import os
import platform
import re
import shlex
import subprocess
from pathlib import Path

import torch

from .. import _env

# The source tree this ioattn runs from (src/ioattn/bench/machine.py → repository root).
REPO = Path(__file__).resolve().parents[3]


def _run(cmd, cwd=None) -> str:
    """stdout of ``cmd``, or "" if it is missing or fails (the header must never crash a run)."""
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> tuple:
    """(short commit, dirty) of the source tree, or ("unknown", None) outside a git checkout.

    IOATTN_COMMIT names the commit where the tree was copied without its .git (a remote GPU)."""
    pinned = _env.commit()
    if pinned:
        return pinned, None
    commit = _run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO)
    if not commit:
        return "unknown", None
    return commit, bool(_run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO))


# nvidia-smi field -> header key. The first group is the essential one; the second is asked for
# too, but dropped if this nvidia-smi rejects a field (one unknown field fails the whole query).
_SMI_FIELDS = (
    {"clocks.sm": "sm_mhz", "clocks.max.sm": "max_sm_mhz", "clocks.mem": "mem_mhz",
     "clocks.max.mem": "max_mem_mhz", "power.limit": "power_limit_w", "driver_version": "driver"},
    {"clocks.applications.graphics": "app_sm_mhz", "clocks.applications.memory": "app_mem_mhz",
     "pstate": "pstate", "temperature.gpu": "temperature_c"},
)


def _smi(fields: dict) -> dict:
    out = _run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits",
                "-i", "0"])
    if not out:
        return {}
    return dict(zip(fields.values(), (v.strip() for v in out.splitlines()[0].split(","))))


def gpu_clocks() -> dict:
    """Current, application and maximum clocks (MHz) of GPU 0, power limit, P-state, temperature
    and driver, as nvidia-smi reports them; {} without it."""
    return _smi({**_SMI_FIELDS[0], **_SMI_FIELDS[1]}) or _smi(_SMI_FIELDS[0])


def _dist_version(dist: str):
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    def version_of(name):
        try:
            return __import__(name).__version__
        except ImportError:
            return None
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version_of("triton"),
        "numpy": version_of("numpy"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        # the peers that come as packages of their own, where installed
        "flash_attn_4": _dist_version("flash-attn-4"),
        "cutlass_dsl": _dist_version("nvidia-cutlass-dsl"),
    }


def device_info(device: str) -> dict:
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        l2 = getattr(p, "L2_cache_size", None)
        return {"device": "cuda", "name": p.name, "sm_count": p.multi_processor_count,
                "memory_gib": round(p.total_memory / 2**30, 1),
                "l2_mib": round(l2 / 2**20, 1) if l2 else None,
                "capability": f"{p.major}.{p.minor}", **gpu_clocks()}
    return {"device": "cpu", "name": cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def env_flags() -> dict:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(("IOATTN_", "TRITON_"))}


def header(device: str, argv) -> dict:
    """The machine header written at the top of every result file."""
    commit, dirty = git_commit()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **device_info(device),
        **versions(),
        "git_commit": commit,
        "git_dirty": dirty,
        "command": shlex.join(["python3", "-m", "ioattn", *argv]),
        "env": env_flags(),
    }


def slug(name: str) -> str:
    """A file-name-safe form of a device name: "NVIDIA H200" → "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def device_slug(device: str) -> str:
    if device == "cuda":
        return slug(torch.cuda.get_device_name(0))
    return "cpu-" + slug(cpu_model())
