"""The one FLOP formula every benchmark number is quoted with (FlashAttention-2 paper convention)."""

# Backward does five T×T×D matmuls (recomputed scores, dV, dP, dQ, dK) against the forward's two,
# but the paper counts it as 2.5× the forward; forward+backward is then 3.5×.
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}


def visible_pairs(Tq: int, Tk: int, causal: bool, window: int = -1) -> float:
    """How many (query, key) pairs take part, in the paper's accounting.

    Non-causal: Tq·Tk. Causal with Tq = Tk: half of it (the paper's convention, not T(T+1)/2,
    so numbers compare with published ones). Causal with Tq ≠ Tk (bottom-right aligned, query i
    sees keys j ≤ i + Tk − Tq): the exact count, since no convention exists there. A causal
    sliding window of ``window`` keys before each query: the exact count of pairs it keeps.
    """
    if causal and window >= 0:
        return float(sum(min(Tk, i + Tk - Tq + 1) - max(0, i + Tk - Tq - window) for i in range(Tq)
                         if i + Tk - Tq >= 0))
    if not causal:
        return float(Tq * Tk)
    if Tq == Tk:
        return Tq * Tk / 2
    return float(sum(min(Tk, max(0, i + Tk - Tq + 1)) for i in range(Tq)))


def attention_flops(B: int, H: int, Tq: int, Tk: int, D: int, *, causal: bool, mode: str,
                    window: int = -1) -> float:
    """FLOPs of one attention call: forward 4·B·H·Tq·Tk·D (two matmuls of 2·Tq·Tk·D each),
    halved when causal with Tq = Tk; ``mode`` "bwd" is 2.5× that, "fwdbwd" 3.5×."""
    if mode not in MODE_FACTOR:
        raise ValueError(f"mode must be one of {tuple(MODE_FACTOR)}, got {mode!r}")
    return 4.0 * B * H * D * visible_pairs(Tq, Tk, causal, window) * MODE_FACTOR[mode]


def tflops(flops: float, ms: float) -> float:
    """TFLOP/s achieved when ``flops`` take ``ms`` milliseconds."""
    return flops / (ms * 1e-3) / 1e12
