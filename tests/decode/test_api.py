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


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [16, 48])
@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "paged16"])
def test_cpu_chunks(page_size, chunk, dtype, cpu_backend, monkeypatch):
    # Chunks of 16 or 48 keys (one or three pages): leftpad, window and ALiBi cut through chunks,
    # and the per-chunk results are merged by lse; equal lengths take the batched path.
    monkeypatch.setattr("ioattn.decode.cpu.CHUNK", chunk)
    options = dict(page_size=page_size, causal=True, alibi=True, window_size=(40, -1))
    check_kvcache(make_case(3, 2, 2, 128, 4, 2, 32, [100, 37, 0], dtype=DTYPES[dtype], device="cpu",
                            leftpad=True, **options))
    check_kvcache(make_case(2, 1, 1, 128, 4, 1, 32, [90, 90], dtype=DTYPES[dtype], device="cpu", **options))
    check_kvcache(make_case(2, 1, 1, 128, 4, 2, 32, [90, 20], dtype=DTYPES[dtype], device="cpu",
                            batch_rows=None if page_size else 4, page_size=page_size))
