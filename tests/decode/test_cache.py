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
