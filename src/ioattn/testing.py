"""The accuracy rule and input factories shared by tests, `ioattn check` and benchmarks.

The rule (from flash-attn's own tests): compare with a reference computed in high precision;
the error of ioattn must be at most ``factor`` times the error of the same computation done by
plain PyTorch in the input precision (2× for outputs, 3× for gradients), plus a tiny floor.
"""
from dataclasses import dataclass

import torch

# A tiny floor so that cases where plain PyTorch is exact (T=1, a single visible key) do not
# demand bit-exactness: per unit of the reference's largest finite magnitude (at least 1), so it
# stays far below one ulp of fp16/bf16 at the outputs' scale. It scales because a fixed one does
# not: fp32 gradients of magnitude ~5 from torch's CPU flash kernel (whose P = exp(s - lse)
# carries the absolute rounding of s and lse) sit at 2-3x plain PyTorch, and one fresh draw
# crossed 3x plus an absolute 1e-5 by 0.8% (tests/flash/test_cpu.py keeps that draw).
_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute error; NaN if x has any NaN (so NaN never passes)."""
    if x.numel() == 0:
        return 0.0
    if torch.isnan(x).any():
        return float("nan")
    x, ref = x.double(), ref.double()
    # Equal infinities (lse −inf of rows that see no key) are exact, not inf − inf = NaN.
    same = x == ref
    diff = torch.where(same, torch.zeros_like(x), (x - ref).abs())
    return diff.max().item()


def _scale(ref: torch.Tensor) -> float:
    """max(1, largest finite |ref|): the unit the floor is given in (−inf lse rows ignored)."""
    finite = ref[torch.isfinite(ref)]
    return max(1.0, finite.abs().max().item()) if finite.numel() else 1.0


@dataclass
class Check:
    name: str
    err: float
    base_err: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.err == self.err and self.err <= self.bound


def check_close(name, out, ref, base, *, factor=2.0, floor=None) -> Check:
    """Compare ``out`` and the low-precision baseline ``base`` with the reference ``ref``."""
    if floor is None:
        floor = _FLOOR.get(out.dtype, 1e-5) * _scale(ref)
    err, base_err = max_err(out, ref), max_err(base, ref)
    return Check(name, err, base_err, factor * base_err + floor)


def assert_close(name, out, ref, base, *, factor=2.0, floor=None) -> Check:
    """Raise AssertionError (with the numbers) unless ``out`` passes the accuracy rule."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    c = check_close(name, out, ref, base, factor=factor, floor=floor)
    assert c.ok, (
        f"{name}: error {c.err:.3e} > bound {c.bound:.3e} "
        f"({factor}x plain-PyTorch error {c.base_err:.3e} + floor)"
    )
    return c


def assert_attention_close(out, lse, grads, ref, ref_lse, base, base_lse, inputs, dout):
    """The accuracy rule on a whole forward+backward: out and lse (2×), then dq, dk, dv (3×).

    ``grads`` are ioattn's gradients of ``out`` w.r.t. ``inputs`` (q, k, v) for ``dout``; the
    reference's and the baseline's are taken here from ``ref`` and ``base`` with the same dout.
    """
    assert_close("out", out, ref, base)
    assert_close("lse", lse, ref_lse, base_lse)
    grads_ref = torch.autograd.grad(ref, inputs, dout.to(ref.dtype))
    grads_base = torch.autograd.grad(base, inputs, dout)
    for name, g, gr, gb in zip(("dq", "dk", "dv"), grads, grads_ref, grads_base):
        assert_close(name, g, gr, gb, factor=3.0)


def dropout_mask(seed, B: int, H: int, Tq: int, Tk: int, dropout_p: float, *, backend: str,
                 device="cpu") -> torch.Tensor:
    """The keep mask, bool ``[B, H, Tq, Tk]``, that a backend's kernels make from ``seed`` (an int
    or the 0-d tensor of ``ioattn.flash.ops.draw_seed``). Dense: for tests and benchmarks at
    small sizes only. ``backend`` is a name of :func:`ioattn.backend_for`: "cpu" or a Triton one.
    """
    seed = int(seed)
    if backend == "cpu":
        from .flash.cpu_blocked import block_keep

        return block_keep(seed, dropout_p, B, H, Tq, 0, Tq, 0, Tk).to(device)
    from .flash.dropout import dropout_mask_triton

    return dropout_mask_triton(seed, B, H, Tq, Tk, dropout_p, device)


def make_qkv(B, Tq, Tk, H, Hkv, D, *, dtype=torch.float16, device="cpu", requires_grad=False,
             generator=None, layout="bthd"):
    """Fresh random q ``[B, Tq, H, D]``, k/v ``[B, Tk, Hkv, D]`` (never zeros).

    ``layout="bhtd"`` allocates ``[B, H, T, D]`` storage and returns ``[B, T, H, D]`` views of
    it, to exercise non-contiguous strides.
    """
    def one(T, Hx):
        if layout == "bhtd":
            x = torch.randn(B, Hx, T, D, generator=generator, device=device).to(dtype).transpose(1, 2)
        else:
            x = torch.randn(B, T, Hx, D, generator=generator, device=device).to(dtype)
        # detach() makes a leaf that keeps the strides, so .grad lands on the strided tensor
        return x.detach().requires_grad_(requires_grad)

    return one(Tq, H), one(Tk, Hkv), one(Tk, Hkv)
