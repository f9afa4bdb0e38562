"""Shared vocabulary of the Triton kernel tests (test_fwd.py, test_bwd.py): devices, dtypes,
parameter ids, the feature cases both files run, and a check of the fast descriptors."""
import dataclasses
import importlib
import sys
from pathlib import Path

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Shared memory a Hopper block may use (H100/H200: 227 KB).
SMEM_BYTES = 227 * 1024


def case_id(case):
    B, Tq, Tk, H, Hkv, D, causal, diag_offset = case
    mode = "causal" if causal else "full"
    if causal and diag_offset is not None:
        mode += f"-diag{diag_offset}"
    return f"B{B}-Tq{Tq}-Tk{Tk}-H{H}-Hkv{Hkv}-D{D}-{mode}"


def reference_dtype(dtype, device):
    # fp32 inputs need a finer reference than themselves; attention_ref's upcast gives fp32 on GPU.
    return torch.float64 if dtype == torch.float32 or device == "cpu" else torch.float32


def feature_id(case):
    *base, window, softcap, alibi = case
    parts = [case_id(base)]
    if tuple(window) != (-1, -1):
        parts.append(f"win{window[0]}_{window[1]}")
    if softcap:
        parts.append(f"cap{softcap:g}")
    if alibi:
        parts.append(f"alibi{alibi}")
    return "-".join(parts)


# (B, Tq, Tk, H, Hkv, D, causal, diag_offset, window, softcap, alibi): each side of the window
# alone and both, the (0, 0) diagonal, windows wider than T (dropped by the launcher), windows
# with causal (which forces right = 0), both alignments with Tq != Tk, rows that see no key above
# and below the band (tiles 0, 3 and 4 of the Tq=130 case see nothing), softcap alone and with
# causal, ALiBi [H] and [B, H] with causal and with a window, all three together; GQA and MQA.
FEATURE_CASES = [
    (1, 100, 100, 2, 1, 40, False, None, (20, -1), 0.0, None),
    (1, 100, 100, 2, 2, 64, False, None, (-1, 10), 0.0, None),
    (2, 70, 90, 4, 2, 40, False, None, (17, 5), 0.0, None),
    (1, 65, 65, 1, 1, 16, False, 0, (0, 0), 0.0, None),
    (1, 40, 50, 2, 1, 32, False, None, (100, 60), 0.0, None),
    (1, 100, 100, 2, 1, 64, True, None, (30, -1), 0.0, None),
    (1, 50, 90, 2, 1, 40, True, None, (9, 7), 0.0, None),
    (1, 90, 50, 2, 1, 40, False, 0, (12, 3), 0.0, None),
    (1, 120, 40, 2, 1, 40, True, None, (8, -1), 0.0, None),
    (1, 130, 40, 2, 2, 24, False, -40, (6, 4), 0.0, None),
    (1, 70, 90, 2, 1, 64, False, None, (-1, -1), 2.0, None),
    (2, 70, 90, 2, 1, 40, True, 0, (-1, -1), 30.0, None),
    (1, 80, 80, 4, 1, 40, True, None, (-1, -1), 0.0, "H"),
    (2, 50, 90, 2, 2, 72, False, 10, (16, 24), 0.0, "BH"),
    (2, 90, 70, 4, 2, 40, True, None, (25, -1), 5.0, "BH"),
]


GPU_FEATURE_CASES = [
    (2, 1000, 1000, 8, 2, 128, True, None, (256, -1), 0.0, None),
    (1, 2048, 2048, 4, 4, 64, False, None, (128, 128), 0.0, None),
    (2, 700, 1500, 8, 1, 128, False, 0, (100, 50), 0.0, None),
    (1, 1500, 700, 4, 2, 96, True, None, (300, -1), 0.0, None),
    (2, 1024, 1024, 8, 2, 128, True, None, (-1, -1), 30.0, None),
    (1, 1000, 1000, 4, 4, 256, False, None, (-1, -1), 5.0, None),
    (2, 1000, 1200, 8, 8, 64, True, None, (-1, -1), 0.0, "H"),
    (2, 1000, 1000, 8, 2, 128, False, None, (200, 200), 0.0, "BH"),
    (2, 1024, 1024, 8, 2, 128, True, None, (512, -1), 50.0, "BH"),
]


# (B, Tq, Tk, H, Hkv, D, causal, diag_offset) at GPU sizes, bf16/fp16, and a few for fp32.
GPU_CASES = [
    (2, 1000, 1000, 8, 2, 64, True, None),
    (1, 4096, 4096, 8, 8, 128, True, None),
    (1, 4096, 4096, 4, 1, 64, False, None),
    (2, 1000, 1500, 8, 8, 128, True, 0),
    (1, 2048, 512, 8, 1, 128, True, None),
    (2, 777, 777, 4, 4, 96, False, None),
    (2, 1024, 1024, 4, 2, 256, True, None),
    (1, 1000, 3000, 4, 4, 40, True, None),
    (1, 3000, 1000, 4, 4, 72, True, 0),
]

GPU_FP32_CASES = [(1, 700, 900, 4, 2, 64, True, None), (1, 513, 513, 2, 2, 128, False, None),
                  (1, 300, 300, 2, 1, 256, True, 0)]


def assert_same_descriptor(fast, checked, cls):
    """``fast``, a tensor descriptor filled in without its constructor's checks, equals the
    checked ``checked`` field by field over ``cls``'s dataclass fields (so a field added to the
    class shows up): the same base memory and dtype, and equal shapes, strides, blocks, layout."""
    for field in dataclasses.fields(cls):
        a, b = getattr(fast, field.name), getattr(checked, field.name)
        if field.name == "base":
            assert a.data_ptr() == b.data_ptr() and a.dtype == b.dtype
        else:
            assert (list(a) if isinstance(a, (list, tuple, torch.Size)) else a) == (
                list(b) if isinstance(b, (list, tuple, torch.Size)) else b), field.name


def benchmark_module(name: str):
    """A script of benchmarks/ imported as a module (its candidate lists are what tests check)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)
