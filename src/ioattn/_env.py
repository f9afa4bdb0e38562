"""Every IOATTN_* environment flag, typed and documented, in one place.

Flags are read at call time (not import time) so tests can flip them with monkeypatch.
"""
import functools
import os

_BACKENDS = ("auto", "triton", "cpu")


@functools.cache
def _raw_key(name: str):
    return os.environ.encodekey(name)


def _get(name: str, default: str) -> str:
    """``os.environ.get(name, default)`` in a tenth of its time: these flags are read several
    times per attention call, and for an unset flag ``os.environ.get`` raises and catches a
    KeyError inside (1.5 µs on a CPU, 17 reads per training step of one attention call). Reads
    the dict behind ``os.environ`` (which its setters and ``monkeypatch.setenv`` update), and
    falls back to ``get`` if ``os.environ`` is not CPython's mapping."""
    env = os.environ
    data = getattr(env, "_data", None)
    if type(data) is not dict:
        return env.get(name, default)
    raw = data.get(_raw_key(name))
    return default if raw is None else env.decodevalue(raw)


def backend() -> str:
    """IOATTN_BACKEND: which implementation runs a call.

    - ``auto`` (default): CUDA tensors run the Triton kernels, CPU tensors the CPU backend.
    - ``triton``: force the Triton kernels; on CPU tensors this needs ``TRITON_INTERPRET=1``
      set before triton is imported (this is how CI tests the GPU code without a GPU).
    - ``cpu``: force the CPU backend (CPU tensors only).
    """
    value = _get("IOATTN_BACKEND", "auto").strip().lower()
    if value not in _BACKENDS:
        raise ValueError(f"IOATTN_BACKEND must be one of {_BACKENDS}, got {value!r}")
    return value


def poison() -> bool:
    """IOATTN_POISON=1: outputs are allocated filled with NaN, so a tile a kernel forgot to
    write shows up in a test instead of passing on whatever memory held. Tests turn it on."""
    return _get("IOATTN_POISON", "0") == "1"


def interpret() -> bool:
    """TRITON_INTERPRET=1 (Triton's own flag): @triton.jit kernels run in numpy on CPU tensors."""
    return _get("TRITON_INTERPRET", "0") == "1"


def commit() -> str:
    """IOATTN_COMMIT: the git commit recorded in benchmark headers when the source tree was copied
    without its .git (e.g. to a remote GPU machine); empty means ask git."""
    return _get("IOATTN_COMMIT", "").strip()


def check_values() -> bool:
    """IOATTN_CHECK_VALUES=0: skip flash_attn_with_kvcache's checks of index values (lengths,
    page numbers, rows), which copy them to the host and so synchronize with the GPU once per
    call. Default on; off, out-of-range indices are undefined behaviour (as in flash-attn)."""
    return _get("IOATTN_CHECK_VALUES", "1") != "0"


def tma() -> bool:
    """Whether CUDA calls that the Hopper kernels cover (flash/fwd_tma.py's ``tma_supported``,
    flash/bwd_tma.py's ``tma_bwd_supported``) run them instead of the portable kernels; so do
    CPU tensors in Triton's interpreter. On by default: on the H200 they ran 1.0–1.2× (forward)
    and 1.0–1.3× (backward) the portable kernels (benchmarks/LOG.md, v1.5). IOATTN_TMA=0 keeps
    the portable kernels everywhere."""
    return _get("IOATTN_TMA", "1") != "0"


def gluon() -> bool:
    """Whether the calls that flash/config.py's ``get_gluon_fwd_config`` gives a config run the
    Gluon forward (flash/fwd_pingpong.py, flash/fwd_gluon.py) instead of the Triton TMA kernel:
    on by default, on Hopper GPUs with a triton that ships Gluon (never in the interpreter).
    IOATTN_GLUON=0 keeps the Triton kernel."""
    return _get("IOATTN_GLUON", "1") != "0"


def fast_launch() -> bool:
    """IOATTN_FAST_LAUNCH=0: every kernel launch goes through Triton's ``kernel[grid](...)``
    instead of reusing the compiled kernel found for the same arguments before (launch.py);
    for comparing the two, or if a launch through the cache is ever suspected."""
    return _get("IOATTN_FAST_LAUNCH", "1") != "0"
