"""KVCache and PagedKVCache (src/ioattn/decode/cache.py): a decoding loop through either cache
gives the attention over the whole prefix; pages are handed out and returned; beam reorder."""
import pytest
import torch

from ioattn import KVCache, PagedKVCache
from ioattn.flash.reference import attention_ref

B, H, HKV, D = 2, 4, 2, 16


def _steps(lengths=(5, 1, 1, 3, 1)):
    """Chunks of new tokens: a prompt, then single steps and a speculative chunk."""
    return [(torch.randn(B, n, H, D, dtype=torch.float64), torch.randn(B, n, HKV, D, dtype=torch.float64),
             torch.randn(B, n, HKV, D, dtype=torch.float64)) for n in lengths]


def _make(kind):
    if kind == "contiguous":
        return KVCache(B, 16, HKV, D, dtype=torch.float64)
    return PagedKVCache(9, 16, HKV, D, max_batch=3, max_pages_per_seq=2, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_decoding_loop_equals_full_attention(kind):
    cache = _make(kind)
    ks, vs = [], []
    for q, k, v in _steps():
        out = cache.attend(q, k, v)
        ks.append(k)
        vs.append(v)
        ref, _ = attention_ref(q, torch.cat(ks, 1), torch.cat(vs, 1), causal=True)
        torch.testing.assert_close(out, ref)
    assert cache.seqlens[:B].tolist() == [11, 11]


def test_paged_pages_are_allocated_and_freed():
    cache = _make("paged")
    for q, k, v in _steps((17,)):
        cache.attend(q, k, v)
    # 17 tokens of 16-token pages: 2 pages per sequence.
    assert cache.free_pages == 9 - 4 and cache.length(0) == 17
    cache.free(0)
    assert cache.free_pages == 7 and cache.length(0) == 0
    with pytest.raises(ValueError, match="max_pages_per_seq"):
        cache.allocate(1, 16)
    big = PagedKVCache(2, 16, HKV, D, max_batch=2, max_pages_per_seq=4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="out of pages"):
        big.allocate(0, 40)


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_reorder_for_beam_search(kind):
    cache, plain = _make(kind), _make("contiguous")
    for q, k, v in _steps((3, 1)):
        cache.attend(q, k, v)
        plain.attend(q, k, v)
    # Both beams continue from beam 1, then one more step: beam 0 now sees beam 1's history.
    cache.reorder([1, 1])
    q, k, v = _steps((1,))[0]
    out = cache.attend(q, k, v)
    k_hist, v_hist = plain.k[1, :4], plain.v[1, :4]
    for b in range(B):
        ref, _ = attention_ref(q[b:b + 1], torch.cat((k_hist, k[b]))[None], torch.cat((v_hist, v[b]))[None],
                               causal=True)
        torch.testing.assert_close(out[b:b + 1], ref)


@pytest.fixture
def device_checks(monkeypatch):
    """Calls of flash_attn_with_kvcache's value checks (the read-back of the index tensors)."""
    from ioattn.decode import checks, ops

    calls = []
    real = checks.check_kvcache_values

    def spy(*args, **kw):
        calls.append(args)
        return real(*args, **kw)

    monkeypatch.setattr(ops, "check_kvcache_values", spy)
    return calls


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_attend_checks_lengths_on_the_host(kind, device_checks, monkeypatch):
    # A decoding step through a cache reads nothing back from the device: the lengths are checked
    # on the cache's host copy, and the op is told the longest sequence instead.
    from ioattn.decode import ops

    seen = []
    real = ops._kvcache_impl
    monkeypatch.setattr(ops, "_kvcache_impl", lambda *a: (seen.append(a[-1]), real(*a))[1])
    cache = _make(kind)
    for q, k, v in _steps((5, 1, 3)):
        cache.attend(q, k, v)
    assert not device_checks and seen == [5, 6, 9]
    # A call that brings its own index tensors is checked on the device values as before.
    q, k, v = _steps((1,))[0]
    cache.attend(q, k, v, cache_leftpad=torch.zeros(B, dtype=torch.int32))
    assert len(device_checks) == 1 and seen[-1] == -1


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_attend_past_the_cache_raises_and_changes_nothing(kind):
    cache = _make(kind)
    for q, k, v in _steps((12,)):
        cache.attend(q, k, v)
    before = (cache.k.clone(), cache.v.clone(), cache.seqlens.clone(), [cache.length(b) for b in range(B)])
    free = getattr(cache, "free_pages", None)
    q, k, v = _steps((21,))[0]  # 12 + 21 > 16 (contiguous), > 2 pages of 16 (paged)
    with pytest.raises(ValueError, match="cache too small"):
        cache.attend(q, k, v)
    # Rotary tables shorter than the positions the step needs (12 + 1 rows).
    q, k, v = _steps((1,))[0]
    cos = sin = torch.ones(12, D // 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="rotary tables too short"):
        cache.attend(q, k, v, rotary_cos=cos, rotary_sin=sin)
    after = (cache.k, cache.v, cache.seqlens, [cache.length(b) for b in range(B)])
    assert all(torch.equal(a, b) for a, b in zip(before[:3], after[:3])) and before[3] == after[3]
    assert getattr(cache, "free_pages", None) == free


def test_paged_attend_out_of_pages_allocates_nothing():
    cache = PagedKVCache(3, 16, HKV, D, max_batch=2, max_pages_per_seq=4, dtype=torch.float64)
    q, k, v = _steps((20,))[0]  # 2 pages per sequence, 4 in all: 3 in the pool
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.attend(q, k, v)
    assert cache.free_pages == 3 and cache.length(0) == cache.length(1) == 0


def test_kvcache_reorder_takes_a_tensor_and_rejects_bad_rows():
    cache = _make("contiguous")
    for q, k, v in _steps((3, 1)):
        cache.attend(q, k, v)
    cache.reorder(torch.tensor([1, 0]))
    assert cache.length(0) == 4 and cache.seqlens.tolist() == [4, 4]
    with pytest.raises(ValueError, match="index"):
        cache.reorder([0, 2])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_decoding_steps_never_synchronize(kind):
    # torch's sync debug mode raises on any synchronizing CUDA operation (a read-back, a copy
    # from pageable host memory). Steps through a cache make none, a new page included; the
    # public function's own value checks do (the mode is live).
    from ioattn import flash_attn_with_kvcache

    dev, dt = "cuda", torch.bfloat16
    cache = (KVCache(B, 64, HKV, 64, device=dev, dtype=dt) if kind == "contiguous" else
             PagedKVCache(12, 16, HKV, 64, max_batch=B, max_pages_per_seq=4, device=dev, dtype=dt))

    def step(n):
        cache.attend(torch.randn(B, n, H, 64, device=dev, dtype=dt),
                     *(torch.randn(B, n, HKV, 64, device=dev, dtype=dt) for _ in range(2)))

    step(14)
    step(1)  # compiled, and the slots' index made
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # lengths 16, 17 (a new page), 18
            step(1)
        with pytest.raises(RuntimeError, match="synchroniz"):
            flash_attn_with_kvcache(torch.randn(B, 1, H, 64, device=dev, dtype=dt), cache.k, cache.v,
                                    cache_seqlens=cache.seqlens[:B], block_table=getattr(cache, "block_table", None))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert cache.seqlens[:B].tolist() == [18, 18]


def test_compiled_steps_neither_break_nor_recompile():
    # Under torch.compile the cache leaves its host copy alone (reading it would guard on each
    # length, a recompile a step): the graphs of the first steps serve every later step, and the
    # host copy is read back for the next eager call.
    import torch._dynamo as dynamo

    dynamo.reset()
    dynamo.utils.counters.clear()
    cache = _make("contiguous")
    compiled = torch.compile(lambda q, k, v: cache.attend(q, k, v) * 2, fullgraph=True)
    ks, vs, graphs = [], [], []
    for q, k, v in _steps((3, 1, 1, 1, 1, 1)):
        out = compiled(q, k, v)
        graphs.append(dynamo.utils.counters["stats"]["unique_graphs"])
        ks.append(k)
        vs.append(v)
        ref, _ = attention_ref(q, torch.cat(ks, 1), torch.cat(vs, 1), causal=True)
        torch.testing.assert_close(out, 2 * ref)
    assert graphs[2] == graphs[-1], graphs  # no new graph once the step's shape has been seen
    assert cache.length(0) == 8
    q, k, v = _steps((1,))[0]
    cache.attend(q, k, v)  # eager again: checked on the host copy
    assert cache.length(1) == 9 and cache.seqlens.tolist() == [9, 9]
