"""Which implementation runs a call, decided in one place.

CUDA tensors run the Triton kernels; CPU tensors run the CPU backend, or the same Triton
kernels in Triton's interpreter when IOATTN_BACKEND=triton and TRITON_INTERPRET=1 (this is how
CI, which has no GPU, tests the GPU code). A Hopper-specific kernel, when one exists, is chosen
here too, behind the same launcher signature: with IOATTN_TMA=1 the backward is
``flash_bwd_sm90``, which runs the TMA kernels where they apply and the portable ones otherwise.
"""
import functools

import torch

from .. import _env


def backend_for(device: torch.device) -> str:
    """Name of the backend that a call on ``device`` uses: "triton", "triton-interpreter" or "cpu"."""
    device = torch.device(device)
    choice = _env.backend()
    if device.type == "cuda":
        if choice == "cpu":
            raise ValueError("IOATTN_BACKEND=cpu but the tensors are on a CUDA device")
        return "triton"
    if device.type == "cpu":
        if choice == "triton":
            if not _env.interpret():
                raise ValueError(
                    "IOATTN_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 "
                    "(set before triton is imported)"
                )
            return "triton-interpreter"
        return "cpu"
    raise ValueError(f"ioattn runs on CUDA and CPU tensors, got device {device}")


def kernels_for(device: torch.device):
    """``(fwd, bwd)`` launchers with the signatures of ``flash_fwd_triton``/``flash_bwd_triton``."""
    backend = backend_for(device)
    return _kernels(backend, backend != "cpu" and _env.tma_enabled())


@functools.cache
def _kernels(backend: str, tma: bool = False):
    # Imported on first use (triton is not needed on the CPU path) and cached: this sits on the
    # per-call path, where an import statement alone costs several µs.
    if backend == "cpu":
        from .cpu import flash_bwd_cpu, flash_fwd_cpu

        return flash_fwd_cpu, flash_bwd_cpu
    from .bwd import flash_bwd_triton
    from .fwd import flash_fwd_triton

    if tma:
        from .bwd_tma import flash_bwd_sm90

        return flash_fwd_triton, flash_bwd_sm90
    return flash_fwd_triton, flash_bwd_triton
