"""flash_attn_with_kvcache end to end (src/ioattn/decode/api.py, ops.py, checks.py): every
feature case on the CPU backend in three dtypes, the cache append, and bad input rejected before
the cache changes."""
import pytest
import torch

from ioattn import flash_attn_with_kvcache

from .cases import CASES, DTYPES, check_kvcache, make_case


@pytest.fixture
def cpu_backend(monkeypatch):
    monkeypatch.setenv("IOATTN_BACKEND", "cpu")


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_cpu_backend(name, dtype, cpu_backend):
    *shape, seqlens, options = CASES[name]
    check_kvcache(make_case(*shape, seqlens, dtype=DTYPES[dtype], device="cpu", **options))
