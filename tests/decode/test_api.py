"""flash_attn_with_kvcache end to end (src/ioattn/decode/api.py, ops.py, cpu.py): every feature
case on the CPU backend in three dtypes, chunked CPU attention, and the in-place append (bad input
is in test_checks.py)."""
import pytest
import torch

from ioattn import flash_attn_with_kvcache

from .cases import CASES, DEVICE, DTYPES, check_kvcache, make_case


@pytest.fixture
def cpu_backend(monkeypatch):
    monkeypatch.setenv("IOATTN_BACKEND", "cpu")


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_cpu_backend(name, dtype, cpu_backend):
    *shape, seqlens, options = CASES[name]
    check_kvcache(make_case(*shape, seqlens, dtype=DTYPES[dtype], device="cpu", **options))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "paged16"])
def test_append_writes_only_the_new_rows(page_size, backend, monkeypatch):
    # Sequence 0 gets 3 rows at 5..7, sequence 1 at 14..16; every other row, and every spare
    # page, keeps its bits. The result comes back alone without return_softmax_lse.
    monkeypatch.setenv("IOATTN_BACKEND", backend)
    kw = make_case(2, 3, 3, 32, 4, 2, 16, [5, 14], dtype=torch.float16, page_size=page_size, causal=True,
                   device="cpu" if backend == "cpu" else DEVICE)
    before = kw["k_cache"].clone(), kw["v_cache"].clone()
    out = flash_attn_with_kvcache(**kw)
    assert isinstance(out, torch.Tensor) and out.shape == kw["q"].shape
    written = torch.zeros(kw["k_cache"].shape[:2], dtype=torch.bool)
    for b, start in enumerate((5, 14)):
        for i in range(3):
            pos = start + i
            row = (b, pos) if page_size is None else (kw["block_table"][b, pos // 16].item(), pos % 16)
            written[row] = True
            assert torch.equal(kw["k_cache"][row], kw["k"][b, i]) and torch.equal(kw["v_cache"][row], kw["v"][b, i])
    for cache, old in zip((kw["k_cache"], kw["v_cache"]), before):
        assert torch.equal(cache[~written], old[~written])


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
