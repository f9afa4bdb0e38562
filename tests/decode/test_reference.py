"""The decode reference (src/ioattn/decode/reference.py) against small hand-computed cases."""
import math

import torch

from ioattn.decode.reference import append_ref, kvcache_ref

import pytest

from .cases import _ref_args, make_case, paginate, prerotate


def test_single_query_by_hand():
    # One head, D = 2, keys e0 and e1 with q = (1, 0), scale 1: weights softmax(1, 0).
    q = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    k_cache = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[9.0, 9.0]]]], dtype=torch.float64)
    v_cache = torch.tensor([[[[2.0, 0.0]], [[0.0, 4.0]], [[7.0, 7.0]]]], dtype=torch.float64)
    seqlens = torch.tensor([2], dtype=torch.int32)
    out, lse, _, _ = kvcache_ref(q, k_cache, v_cache, cache_seqlens=seqlens, softmax_scale=1.0)
    w = math.e / (math.e + 1)
    assert torch.allclose(out[0, 0, 0], torch.tensor([2 * w, 4 * (1 - w)], dtype=torch.float64))
    assert math.isclose(lse.item(), math.log(math.e + 1), rel_tol=1e-6)
    # Leftpad 1 leaves key e1 alone: out = v1 and lse = q·e1 = 0.
    out, lse, _, _ = kvcache_ref(q, k_cache, v_cache, cache_seqlens=seqlens, softmax_scale=1.0,
                                 cache_leftpad=torch.tensor([1], dtype=torch.int32))
    assert out[0, 0, 0].tolist() == [0.0, 4.0] and lse.item() == 0.0


def test_causal_new_keys_by_hand():
    # Tq = Tnew = 2 appended at 1: query 0 sees keys 0..1, query 1 keys 0..2 (bottom-right).
    q = torch.zeros(1, 2, 1, 16, dtype=torch.float64)
    kc = torch.zeros(1, 4, 1, 16, dtype=torch.float64)
    vc = torch.zeros(1, 4, 1, 16, dtype=torch.float64)
    vc[0, 0] = 3.0
    v = torch.tensor([6.0, 9.0], dtype=torch.float64).view(1, 2, 1, 1).expand(1, 2, 1, 16)
    k = torch.zeros(1, 2, 1, 16, dtype=torch.float64)
    out, _, _, v_new = kvcache_ref(q, kc, vc, k, v, cache_seqlens=torch.tensor([1], dtype=torch.int32),
                                   causal=True)
    # Equal scores: plain averages of the visible values.
    assert out[0, 0, 0, 0].item() == 4.5 and out[0, 1, 0, 0].item() == 6.0
    assert v_new[0, :, 0, 0].tolist() == [3.0, 6.0, 9.0, 0.0]


def test_append_ref_writes_only_the_new_rows():
    kc, vc = torch.randn(3, 8, 1, 16), torch.randn(3, 8, 1, 16)
    k, v = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
    rows = torch.tensor([2, 0], dtype=torch.int32)
    k_new, v_new = append_ref(kc, vc, k, v, torch.tensor([1, 6], dtype=torch.int32), batch_idx=rows)
    assert torch.equal(k_new[2, 1:3], k[0]) and torch.equal(v_new[0, 6:8], v[1])
    keep = torch.ones(3, 8, dtype=torch.bool)
    keep[2, 1:3] = keep[0, 6:8] = False
    assert torch.equal(k_new[keep], kc[keep]) and torch.equal(v_new[keep], vc[keep])


def test_paged_equals_contiguous():
    kw = make_case(2, 2, 2, 64, 4, 2, 16, [10, 60], dtype=torch.float64, device="cpu", causal=True)
    kp, vp, table = paginate(kw["k_cache"], kw["v_cache"], 16)
    out, lse, _, _ = kvcache_ref(**kw)
    out_p, lse_p, kp_new, _ = kvcache_ref(**dict(kw, k_cache=kp, v_cache=vp, block_table=table))
    # Same values in other buffers: BLAS may round differently by alignment, so not bit for bit.
    torch.testing.assert_close(out, out_p, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, lse_p, atol=1e-6, rtol=1e-6)
    # The appended keys landed in the right pages: sequence 1's rows 60, 61 are page 3's rows 12, 13.
    assert torch.equal(kp_new[table[1, 3].item(), 12:14], kw["k"][1])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_rotary_is_applied_at_flash_attn_positions(causal):
    # kvcache_ref's own rotary gives what the tests' prerotate (written from flash-attn's
    # docstring) gives: the reference, and so every backend checked against it, rotates right.
    kw = _ref_args(make_case(2, 3, 3, 48, 4, 2, 32, [5, 30], dtype=torch.float64, device="cpu", rotary_dim=16,
                             interleaved=False, causal=causal))
    out, lse, k_new, _ = kvcache_ref(**kw)
    out_p, lse_p, k_new_p, _ = kvcache_ref(**prerotate(kw))
    torch.testing.assert_close(out, out_p, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(k_new, k_new_p, atol=1e-12, rtol=1e-12)
