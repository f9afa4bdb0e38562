"""Every benchmark case and suite, as data.

A :class:`Case` is one timed call (forward, or forward + backward) of self-attention with
Tq = Tk = T; a :class:`Suite` is a named list of cases plus the limits of the peers that cannot
run everywhere. Adding a sweep means adding an entry to :data:`SUITES`, nothing else.
"""
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

MODES = ("fwd", "fwdbwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    B: int
    T: int
    H: int
    Hkv: int
    D: int
    causal: bool
    dtype: str
    mode: str
    # Sliding window: each query sees the `window` keys before it (and itself; causal only); -1 = off.
    window: int = -1

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"Case.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.mode not in MODES:
            raise ValueError(f"Case.mode must be one of {MODES}, got {self.mode!r}")
        if self.window >= 0 and not self.causal:
            raise ValueError("Case.window needs causal=True (a causal sliding window)")
        if self.H % self.Hkv:
            raise ValueError(f"Case.H ({self.H}) must be a multiple of Case.Hkv ({self.Hkv})")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def series(self) -> str:
        """What stays fixed along a sweep of T: one line of a table section, one plot row."""
        heads = f"H={self.H}" if self.H == self.Hkv else f"H={self.H}/{self.Hkv}"
        mask = "causal" if self.causal else "non-causal"
        if self.window >= 0:
            mask = f"causal window {self.window}"
        return f"{self.dtype} D={self.D} {heads} {mask} {self.mode}"


@dataclass(frozen=True)
class Limit:
    """Where one peer runs within a suite; its other cases are reported "skipped: <why>"."""
    why: str
    max_T: Optional[int] = None
    seqlens: Optional[frozenset] = None
    head_dims: Optional[frozenset] = None

    def excludes(self, case: Case) -> bool:
        return ((self.max_T is not None and case.T > self.max_T)
                or (self.seqlens is not None and case.T not in self.seqlens)
                or (self.head_dims is not None and case.D not in self.head_dims))


def naive_up_to(T: int) -> Limit:
    # The naive peer materializes B·H·T² scores; past this T it measures the allocator, not attention.
    return Limit(why=f"T > {T}: naive materializes the scores", max_T=T)


# torch.compile specializes FlexAttention on every shape (seconds of Inductor per point, forward
# and backward apart): on a sweep it runs at the anchors' points only, to keep the suite short.
FLEX_AT_ANCHORS = Limit(why="compiled per shape: run at the anchors' points only (D=128, "
                            "T in 1024, 4096, 16384)",
                        seqlens=frozenset({1024, 4096, 16384}), head_dims=frozenset({128}))


@dataclass(frozen=True)
class Suite:
    name: str
    doc: str
    device: str
    cases: tuple
    # peer name -> Limit: the peers that cannot, or need not, run every case of the suite
    limits: dict = field(default_factory=dict)


def _pow2(lo: int, hi: int) -> tuple:
    return tuple(1 << e for e in range(lo.bit_length() - 1, hi.bit_length()))


def _sweep(*, seqlens, head_dims, dtype, tokens=None, B=None, hidden=None, H=None, group=1,
           causal=(False, True), window=-1) -> tuple:
    """Cases over head dim × causal × mode × T (T innermost, so a series is contiguous).

    Either a fixed ``B`` or a token budget (``B = tokens // T``); either a fixed ``H`` or a
    ``hidden`` size (``H = hidden // D``); ``group`` query heads share a KV head.
    """
    cases = []
    for D in head_dims:
        for c in causal:
            for mode in MODES:
                for T in seqlens:
                    b = B if B is not None else max(1, tokens // T)
                    h = H if H is not None else hidden // D
                    cases.append(Case(B=b, T=T, H=h, Hkv=h // group, D=D, causal=c, dtype=dtype,
                                      mode=mode, window=window))
    return tuple(cases)


SUITES = {
    s.name: s
    for s in (
        Suite(
            name="paper",
            doc="FlashAttention-2 paper grid: bf16, 16k tokens (B = 16384 // T), hidden 2048 "
                "(H = 2048 // D), D in {64, 128}, T = 512..16384, causal and not",
            device="cuda",
            cases=_sweep(seqlens=_pow2(512, 16384), head_dims=(64, 128), dtype="bf16",
                         tokens=16384, hidden=2048),
            limits={"naive": naive_up_to(4096), "flex": FLEX_AT_ANCHORS},
        ),
        Suite(
            name="beyond",
            doc="beyond the paper grid, T=8192, 16k tokens (B=2), bf16: D=256 with H=8 (hidden "
                "2048), causal and not; GQA with 32 query heads over 4 KV heads, D=128, causal",
            device="cuda",
            cases=_sweep(seqlens=(8192,), head_dims=(256,), dtype="bf16", tokens=16384, hidden=2048)
            # GQA serves causal decoders; a non-causal GQA point would add compile time, no user
            + _sweep(seqlens=(8192,), head_dims=(128,), dtype="bf16", tokens=16384, H=32, group=8,
                     causal=(True,)),
            limits={"naive": naive_up_to(4096)},
        ),
        Suite(
            name="long",
            doc="long context on one GPU: bf16, causal forward+backward, B=1, H=16, D=128, "
                "T = 32768, 65536, 131072; time and peak extra memory, which must grow like T",
            device="cuda",
            cases=tuple(c for c in _sweep(seqlens=_pow2(32768, 131072), head_dims=(128,),
                                          dtype="bf16", B=1, H=16, causal=(True,))
                        if c.mode == "fwdbwd"),
            # naive would need B·H·T² scores: 32 GiB at T=32768 before its backward
            limits={"naive": naive_up_to(16384),
                    "flex": Limit(why="left out here: a compile per shape for 3 points",
                                  max_T=16384)},
        ),
        Suite(
            name="gqa",
            doc="grouped-query attention as in Llama-3 8B: bf16, 32 query heads over 8 KV heads, "
                "D=128, 16k tokens, T = 512..16384, causal",
            device="cuda",
            cases=_sweep(seqlens=_pow2(512, 16384), head_dims=(128,), dtype="bf16", tokens=16384,
                         H=32, group=4, causal=(True,)),
            limits={"naive": naive_up_to(4096), "flex": FLEX_AT_ANCHORS},
        ),
        Suite(
            name="memory",
            doc="the anchors' memory comparison: bf16, B=1, H=16, D=128, causal, T = 4096..16384 "
                "(naive included at every T: that is the point)",
            device="cuda",
            cases=tuple(c for c in _sweep(seqlens=_pow2(4096, 16384), head_dims=(128,), dtype="bf16",
                                          B=1, H=16, causal=(True,)) if c.mode == "fwdbwd"),
            limits={"naive": naive_up_to(16384), "flex": FLEX_AT_ANCHORS},
        ),
        Suite(
            name="cpu",
            doc="CPU default, about a minute on 2 cores: fp32, B=1, H=8, D=64, T = 256..2048, "
                "causal and not",
            device="cpu",
            cases=_sweep(seqlens=_pow2(256, 2048), head_dims=(64,), dtype="fp32", B=1, H=8),
            limits={"naive": naive_up_to(2048)},
        ),
        Suite(
            name="window",
            doc="sliding window (Mistral-style, 1024 keys, causal) against T: bf16, B=1, H=16, "
                "D=128, T = 2048..32768; time should grow like T, not T^2 (the mask is data "
                "for SDPA and naive, which still do all T^2 work)",
            device="cuda",
            cases=_sweep(seqlens=_pow2(2048, 32768), head_dims=(128,), dtype="bf16", B=1, H=16,
                         causal=(True,), window=1024),
            limits={"naive": naive_up_to(8192),
                    "flex": Limit(why="compiled per shape: T in 4096, 16384 only",
                                  seqlens=frozenset({4096, 16384}))},
        ),
        Suite(
            name="cpu-window",
            doc="the window suite on a CPU: fp32, B=1, H=8, D=64, window 256, T = 512..4096",
            device="cpu",
            cases=_sweep(seqlens=_pow2(512, 4096), head_dims=(64,), dtype="fp32", B=1, H=8,
                         causal=(True,), window=256),
            limits={"naive": naive_up_to(2048)},
        ),
        Suite(
            name="quick",
            doc="smoke test of the runner (seconds on any device): fp32, B=1, H=2 over 1 KV head, "
                "D=32, T in {64, 128}",
            device="any",
            cases=_sweep(seqlens=(64, 128), head_dims=(32,), dtype="fp32", B=1, H=2, group=2),
            limits={"naive": naive_up_to(128)},
        ),
    )
}


def default_suite(device: str) -> str:
    return "paper" if device == "cuda" else "cpu"


def select(suite: Suite, *, dtype=None, causal=None, modes=None, seqlens=None) -> list:
    """The suite's cases, filtered by the command-line options (None keeps everything)."""
    cases = []
    for c in suite.cases:
        if causal is not None and c.causal != causal:
            continue
        if modes is not None and c.mode not in modes:
            continue
        if seqlens is not None and c.T not in seqlens:
            continue
        cases.append(replace(c, dtype=dtype) if dtype is not None else c)
    return cases
