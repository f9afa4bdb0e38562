"""`ioattn check`: every backend available here against the dense reference, forward and backward.

Each row runs ``flash_attn_func`` on fresh random inputs and compares out, lse, dq, dk and dv with
the reference computed in fp64 (CPU) or fp32 (CUDA), under the accuracy rule of
:mod:`ioattn.testing`: at most 2× (3× for gradients) the error of plain PyTorch in the input dtype.
The table shows each error as a fraction of its bound, so anything above 1 fails.
"""
import contextlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .cases import DTYPES

# (B, Tq, Tk, H, Hkv, D, causal): square and not, causal and not, GQA and MQA, odd sizes, a head dim
# that is not a power of two, and Tq > Tk where the first causal rows see no key (out 0, lse −inf).
SHAPES = (
    (2, 64, 64, 4, 4, 64, False),
    (2, 64, 64, 4, 4, 64, True),
    (1, 113, 113, 6, 2, 32, True),
    (1, 40, 97, 4, 1, 64, True),
    (1, 97, 40, 4, 4, 128, True),
    (1, 77, 50, 4, 2, 40, False),
)
# The interpreter runs each program in numpy: a few tiny shapes keep it to seconds.
INTERPRETER_SHAPES = (
    (1, 32, 32, 2, 2, 32, False),
    (1, 33, 47, 2, 1, 32, True),
    (1, 47, 20, 2, 2, 16, True),
)
# bf16 dot products are broken in Triton's interpreter, so it checks fp16 and fp32 only.
BACKEND_DTYPES = {"cpu": ("fp32", "fp16", "bf16"), "triton": ("bf16", "fp16", "fp32"),
                  "triton-interpreter": ("fp16", "fp32")}
TENSORS = ("out", "lse", "dq", "dk", "dv")
_SRC = str(Path(__file__).resolve().parents[2])


@dataclass
class Row:
    backend: str
    dtype: str
    shape: str
    # error / bound per tensor (above 1 fails)
    ratios: dict = field(default_factory=dict)
    ok: bool = False
    note: str = ""


def _label(B, Tq, Tk, H, Hkv, D, causal) -> str:
    return f"B{B} T{Tq}/{Tk} H{H}/{Hkv} D{D}{' causal' if causal else ''}"


def _lse_check(name, lse, ref, base):
    from ioattn.testing import check_close

    # Rows that see no key have lse −inf in the reference; ioattn must agree there exactly.
    seen = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(lse), seen):
        return None
    return check_close(name, lse[seen], ref[seen], base[seen])


def check_shape(backend, dtype, shape, device) -> Row:
    from ioattn import flash_attn_func
    from ioattn.flash.reference import attention_ref
    from ioattn.testing import check_close, make_qkv

    B, Tq, Tk, H, Hkv, D, causal = shape
    row = Row(backend, dtype, _label(*shape))
    q, k, v = make_qkv(B, Tq, Tk, H, Hkv, D, dtype=DTYPES[dtype], device=device, requires_grad=True)
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    # High-precision leaves of their own, so the reference gradients are not rounded to the input dtype
    hi = torch.float64 if device == "cpu" else torch.float32
    qh, kh, vh = (x.detach().to(hi).requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = attention_ref(qh, kh, vh, causal=causal)
    ref_grads = torch.autograd.grad(ref_out, (qh, kh, vh), dout.to(hi))
    base_out, base_lse = attention_ref(q, k, v, causal=causal, upcast=False)
    base_grads = torch.autograd.grad(base_out, (q, k, v), dout)
    checks = [check_close("out", out, ref_out, base_out), _lse_check("lse", lse, ref_lse, base_lse)]
    checks += [check_close(n, g, r, b, factor=3.0)
               for n, g, r, b in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads)]
    for name, c in zip(TENSORS, checks):
        # NaN errors stay NaN and fail; a wrong −inf pattern in lse counts as infinitely wrong
        row.ratios[name] = float("inf") if c is None else c.err / c.bound
    row.ok = all(c is not None and c.ok for c in checks)
    if any(c is None for c in checks):
        row.note = "lse is finite where no key is visible, or −inf where one is"
    return row


@contextlib.contextmanager
def _backend_flag(value):
    old = os.environ.get("IOATTN_BACKEND")
    os.environ["IOATTN_BACKEND"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("IOATTN_BACKEND")
        else:
            os.environ["IOATTN_BACKEND"] = old


def _in_subprocess(backend) -> list:
    """Run one backend's checks in a child process (the interpreter flag must be set before
    triton compiles anything, so it cannot be turned on here)."""
    env = dict(os.environ, TRITON_INTERPRET="1", IOATTN_BACKEND="triton",
               PYTHONPATH=os.pathsep.join(filter(None, [_SRC, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "ioattn", "check", "--backend", backend, "--json"]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    except subprocess.TimeoutExpired:
        return [Row(backend, "-", "-", note="timed out after 1200 s")]
    lines = done.stdout.strip().splitlines()
    if done.returncode not in (0, 1) or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [Row(backend, "-", "-", note=f"child exited {done.returncode}: {tail}")]
    return [Row(**r) for r in json.loads(lines[-1])]


def run_backend(backend: str) -> list:
    """All shapes and dtypes of one backend; a failure to run is a failing row, not a crash."""
    from ioattn import _env, backend_for

    if backend == "triton-interpreter" and not _env.interpret():
        return _in_subprocess(backend)
    device = "cuda" if backend == "triton" else "cpu"
    shapes = INTERPRETER_SHAPES if backend == "triton-interpreter" else SHAPES
    rows = []
    with _backend_flag("cpu" if backend == "cpu" else "triton"):
        used = backend_for(torch.device(device))
        if used != backend:
            return [Row(backend, "-", "-", note=f"calls on {device} use {used!r}")]
        for dtype in BACKEND_DTYPES[backend]:
            for shape in shapes:
                try:
                    rows.append(check_shape(backend, dtype, shape, device))
                except Exception as e:
                    msg = f"{type(e).__name__}: {e}".splitlines()[0]
                    rows.append(Row(backend, dtype, _label(*shape), note=msg[:160]))
    return rows


def available_backends() -> tuple:
    """(backends to check here, {backend: why it is skipped})."""
    names, skipped = ["cpu"], {}
    if torch.cuda.is_available():
        names.append("triton")
    try:
        import numpy
        import triton  # noqa: F401
    except ImportError:
        return names, {"triton-interpreter": "triton or numpy is not installed"}
    # Triton 3.6's interpreter fails on numpy >= 2.4 (array-to-scalar conversions it relies on
    # became errors), whatever the kernels; seen on the H200 with numpy 2.5.2.
    if tuple(int(x) for x in numpy.__version__.split(".")[:2]) >= (2, 4):
        skipped["triton-interpreter"] = f"Triton's interpreter needs numpy < 2.4, found {numpy.__version__}"
    else:
        names.append("triton-interpreter")
    return names, skipped


def format_rows(rows) -> str:
    lines = [f"{'backend':<19} {'dtype':<5} {'shape':<30}" + "".join(f"{t:>7}" for t in TENSORS) + "  result"]
    for r in rows:
        cells = "".join(f"{r.ratios[t]:>7.2f}" if t in r.ratios else f"{'-':>7}" for t in TENSORS)
        verdict = "ok" if r.ok else "FAIL"
        lines.append(f"{r.backend:<19} {r.dtype:<5} {r.shape:<30}{cells}  {verdict} {r.note}".rstrip())
    return "\n".join(lines)


def rows_to_json(rows) -> str:
    return json.dumps([asdict(r) for r in rows])
