"""Memory of forward + backward grows linearly in T: nothing of size Tq×Tk is ever allocated.

Quadrupling T must multiply the peak extra memory by about 4 (a score matrix would make it 16),
and the peak must stay far below the size of the scores a dense implementation would store.
"""
import os
import subprocess
import sys

import pytest
import torch

import ioattn
from ioattn.testing import make_qkv

# Run in a fresh interpreter so that nothing else this test session allocated (or the allocator
# cached) blurs the high-water mark. Prints the peak extra RSS in KiB of one fwd+bwd.
_CPU_SCRIPT = r"""
import ast, resource, sys, torch
from ioattn.flash.cpu import flash_bwd_cpu, flash_fwd_cpu
from ioattn.testing import make_qkv

T, causal = int(sys.argv[1]), sys.argv[2] == "1"
# Optional flash-attn features (window, softcap) as a dict literal
features = ast.literal_eval(sys.argv[3]) if len(sys.argv) > 3 else {}
B, H, D, scale = 1, 4, 64, 0.125

def reset_peak():
    # Linux resets the process's RSS high-water mark (VmHWM) on "5" > clear_refs; without it,
    # ru_maxrss could still hold a larger transient from importing torch.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

def peak_kib(reset):
    if reset:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

# Warm-up on a tiny shape: loads the kernels and spawns the worker threads.
q, k, v = make_qkv(B, 64, 64, H, H, D, dtype=torch.float32)
out, lse = flash_fwd_cpu(q, k, v, scale, causal, 0, **features)
flash_bwd_cpu(torch.randn_like(out), q, k, v, out, lse, scale, causal, 0, **features)
del q, k, v, out, lse

q, k, v = make_qkv(B, T, T, H, H, D, dtype=torch.float32)
dout = torch.randn_like(q)
reset = reset_peak()
base = peak_kib(reset)
out, lse = flash_fwd_cpu(q, k, v, scale, causal, 0, **features)
grads = flash_bwd_cpu(dout, q, k, v, out, lse, scale, causal, 0, **features)
print(peak_kib(reset) - base)
"""


def _cpu_peak_extra_bytes(T: int, causal: bool, features: str = "{}") -> int:
    src = os.path.dirname(os.path.dirname(os.path.abspath(ioattn.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    res = subprocess.run([sys.executable, "-c", _CPU_SCRIPT, str(T), str(int(causal)), features],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    return int(res.stdout.strip().splitlines()[-1]) * 1024


def _assert_cpu_linear(causal: bool, features: str = "{}"):
    T1, T2, H = 2048, 8192, 4
    small = _cpu_peak_extra_bytes(T1, causal, features)
    large = _cpu_peak_extra_bytes(T2, causal, features)
    ratio = large / max(small, 1)
    # All heads' T×T fp32 scores: 1 GiB at T=8192; outputs and gradients alone are 32 MiB.
    scores = H * T2 * T2 * 4
    print(f"peak extra: T={T1} {small / 2**20:.1f} MiB, T={T2} {large / 2**20:.1f} MiB, x{ratio:.2f}")
    assert 0 < small and ratio < 6, f"peak extra grew x{ratio:.2f} for 4x T (quadratic would be 16)"
    assert large < scores / 8, f"peak extra {large / 2**20:.0f} MiB vs scores {scores / 2**20:.0f} MiB"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cpu_memory_linear(causal):
    _assert_cpu_linear(causal)


@pytest.mark.parametrize("features", ["{'window': (256, 0)}", "{'softcap': 30.0}",
                                      "{'dropout_p': 0.1, 'seed': 5}"],
                         ids=["window", "softcap", "dropout"])
def test_cpu_memory_linear_features(features):
    # The blocked path (cpu_blocked.py): a window's blocks see a bounded key range; softcap's
    # see every key, so one block's scores grow with T, but linearly. Dropout's mask is made
    # per block, never for the whole T×T.
    _assert_cpu_linear(True, features)


def _cuda_peak_extra_bytes(attn, T: int, *, H=16, D=128) -> int:
    """Peak CUDA memory above the inputs (q, k, v, dout) of one ``attn`` forward + backward."""
    q, k, v = make_qkv(1, T, T, H, H, D, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dout = torch.randn_like(q)
    # Warm-up on the same shape, so that compilation and autotuning are not measured.
    attn(q, k, v).backward(dout)
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    attn(q, k, v).backward(dout)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
def test_cuda_memory_linear():
    def attn(q, k, v):
        return ioattn.flash_attn_func(q, k, v, causal=True)

    T1, T2, H = 2048, 8192, 16
    small, large = _cuda_peak_extra_bytes(attn, T1, H=H), _cuda_peak_extra_bytes(attn, T2, H=H)
    ratio = large / max(small, 1)
    # All heads' T×T bf16 scores: 2 GiB at T=8192; outputs and gradients are ~128 MiB.
    scores = H * T2 * T2 * 2
    print(f"peak extra: T={T1} {small / 2**20:.1f} MiB, T={T2} {large / 2**20:.1f} MiB, x{ratio:.2f}")
    assert 0 < small and ratio < 6, f"peak extra grew x{ratio:.2f} for 4x T (quadratic would be 16)"
    assert large < scores / 4, f"peak extra {large / 2**20:.0f} MiB vs scores {scores / 2**20:.0f} MiB"
