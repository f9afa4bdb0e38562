"""Which implementation runs a call, decided in one place.

CUDA tensors run the Triton kernels; CPU tensors run the CPU backend, or the same Triton
kernels in Triton's interpreter when IOATTN_BACKEND=triton and TRITON_INTERPRET=1 (this is how
CI, which has no GPU, tests the GPU code). The Hopper kernels (fwd_tma.py, bwd_tma.py) are
chosen here too, behind the same launcher signatures, for the calls they cover (unless
IOATTN_TMA=0), and among them the Gluon forward (fwd_gluon.py) where config.py's table says it is
faster (unless IOATTN_GLUON=0). A backward that may be non-deterministic (flash-attn's
``deterministic=False``, the default) runs the one-pass kernel (bwd_fused.py) where config.py's
table says it is faster.
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
    return _kernels(backend_for(device))


@functools.cache
def _kernels(backend: str):
    # Imported on first use (triton is not needed on the CPU path) and cached: this sits on the
    # per-call path, where an import statement alone costs several µs.
    if backend == "cpu":
        from .cpu import flash_bwd_cpu, flash_fwd_cpu

        def cpu_bwd(*args, deterministic=True, **features):
            # The CPU backward has no atomics: deterministic either way.
            return flash_bwd_cpu(*args, **features)

        return flash_fwd_cpu, cpu_bwd
    from .bwd import flash_bwd_triton
    from .fwd import flash_fwd_triton
    from . import bwd_fused, bwd_gluon, bwd_tma, fwd_gluon, fwd_pingpong, fwd_tma
    from .config import get_fused_bwd_config, get_gluon_fwd_config

    def fwd(q, k, v, softmax_scale, causal, diag_offset, **features):
        # Looked up on the modules at each call, so that a test can watch which kernel runs.
        if _env.tma() and fwd_tma.tma_supported(q, k, v, softmax_scale, **features):
            if _env.gluon() and fwd_gluon.gluon_supported(q):
                config = get_gluon_fwd_config(q.shape[-1], q.dtype, causal, max(q.shape[1], k.shape[1]))
                if config is not None:
                    launcher = fwd_pingpong.gluon_launcher(config)
                    return launcher(q, k, v, softmax_scale, causal, diag_offset, config=config)
            return fwd_tma.flash_fwd_tma(q, k, v, softmax_scale, causal, diag_offset)
        return flash_fwd_triton(q, k, v, softmax_scale, causal, diag_offset, **features)

    def bwd(dout, q, k, v, out, lse, softmax_scale, causal, diag_offset, deterministic=True, **features):
        if _env.tma() and bwd_tma.tma_bwd_supported(q, k, v, **features):
            if not deterministic:
                config = get_fused_bwd_config(q.shape[-1], q.dtype, causal, interpret=_env.interpret(),
                                              seqlen=max(q.shape[1], k.shape[1]),
                                              gluon=_env.gluon() and bwd_gluon.gluon_dkdv_supported(q),
                                              group=q.shape[2] // k.shape[2])
                if config is not None:
                    return bwd_fused.flash_bwd_fused(dout, q, k, v, out, lse, softmax_scale, causal, diag_offset,
                                                     config=config)
            return bwd_tma.flash_bwd_tma(dout, q, k, v, out, lse, softmax_scale, causal, diag_offset)
        return flash_bwd_triton(dout, q, k, v, out, lse, softmax_scale, causal, diag_offset, **features)

    return fwd, bwd
