"""FlashAttention-4 (PyPI ``flash-attn-4``, CuTe DSL kernels for sm_90 and sm_100) as a peer,
where ``flash_attn.cute`` imports. Layout ``[B, T, H, D]`` like ioattn, GQA native; its
``flash_attn_func`` returns ``(out, lse)`` (lse None unless asked for, in recent versions).
benchmarks/fa4_setup.sh installs it on a machine without network from wheels brought along.
"""
import functools


@functools.lru_cache(maxsize=None)
def _import():
    """(flash_attn_func, None) or (None, why it does not import)."""
    # Any failure, not only ImportError: a half-installed CuTe DSL is as unavailable as none
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:
        return None, f"flash_attn.cute does not import ({type(e).__name__}: {str(e)[:160]})"
    return flash_attn_func, None


def unavailable(device: str):
    if device != "cuda":
        return "needs a CUDA GPU (sm_90 or newer)"
    return _import()[1]


def build_fa4(case):
    fn = _import()[0]
    # FA4 takes (left, right) with None for unbounded; the causal window is (window, 0)
    window = (case.window, 0) if case.window >= 0 else (None, None)

    def attend(q, k, v):
        out = fn(q, k, v, causal=case.causal, window_size=window)
        return out[0] if isinstance(out, tuple) else out
    return attend
