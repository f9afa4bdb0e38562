"""Every IOATTN_* environment flag, typed and documented, in one place.

Flags are read at call time (not import time) so tests can flip them with monkeypatch.
"""
import os

_BACKENDS = ("auto", "triton", "cpu")


def backend() -> str:
    """IOATTN_BACKEND: which implementation runs a call.

    - ``auto`` (default): CUDA tensors run the Triton kernels, CPU tensors the CPU backend.
    - ``triton``: force the Triton kernels; on CPU tensors this needs ``TRITON_INTERPRET=1``
      set before triton is imported (this is how CI tests the GPU code without a GPU).
    - ``cpu``: force the CPU backend (CPU tensors only).
    """
    value = os.environ.get("IOATTN_BACKEND", "auto").strip().lower()
    if value not in _BACKENDS:
        raise ValueError(f"IOATTN_BACKEND must be one of {_BACKENDS}, got {value!r}")
    return value


def poison() -> bool:
    """IOATTN_POISON=1: outputs are allocated filled with NaN, so a tile a kernel forgot to
    write shows up in a test instead of passing on whatever memory held. Tests turn it on."""
    return os.environ.get("IOATTN_POISON", "0") == "1"


def interpret() -> bool:
    """TRITON_INTERPRET=1 (Triton's own flag): @triton.jit kernels run in numpy on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def commit() -> str:
    """IOATTN_COMMIT: the git commit recorded in benchmark headers when the source tree was copied
    without its .git (e.g. to a remote GPU machine); empty means ask git."""
    return os.environ.get("IOATTN_COMMIT", "").strip()


def check_values() -> bool:
    """IOATTN_CHECK_VALUES=0: skip flash_attn_with_kvcache's checks of index values (lengths,
    page numbers, rows), which copy them to the host and so synchronize with the GPU once per
    call. Default on; off, out-of-range indices are undefined behaviour (as in flash-attn)."""
    return os.environ.get("IOATTN_CHECK_VALUES", "1") != "0"


def tma() -> bool:
    """Whether CUDA calls that the Hopper kernels cover (flash/fwd_tma.py's ``tma_supported``,
    flash/bwd_tma.py's ``tma_bwd_supported``) run them instead of the portable kernels; so do
    CPU tensors in Triton's interpreter. On by default: on the H200 they ran 1.0–1.2× (forward)
    and 1.0–1.3× (backward) the portable kernels (benchmarks/LOG.md, v1.5). IOATTN_TMA=0 keeps
    the portable kernels everywhere."""
    return os.environ.get("IOATTN_TMA", "1") != "0"


def gluon() -> bool:
    """Whether the calls that flash/config.py's ``get_gluon_fwd_config`` gives a config run the
    Gluon forward (flash/fwd_gluon.py) instead of the Triton TMA kernel: on by default, on Hopper
    GPUs with a triton that ships Gluon (never in the interpreter). IOATTN_GLUON=0 keeps the
    Triton kernel."""
    return os.environ.get("IOATTN_GLUON", "1") != "0"
