"""The append kernel (src/ioattn/decode/append.py) and the rotary kernel (rotary_kernel.py)
against the CPU backend's torch versions (ops.py's ``append_kv``, rotary.py): the same caches
bit for bit (rotated keys to rounding), the rest of the cache untouched, and the new lengths.
In Triton's interpreter without a GPU, compiled on one."""
import pytest
import torch

from ioattn.decode.append import append_kv_triton
from ioattn.decode.ops import append_kv
from ioattn.decode.rotary import apply_rotary, rotary_positions
from ioattn.decode.rotary_kernel import rotary_q_triton

from .cases import DEVICE


def _caches(n_rows, T_cache, H_kv, D, dtype):
    # Distinct random values everywhere, so a write to a wrong row shows.
    k_cache = torch.randn(n_rows, T_cache, H_kv, D, device=DEVICE).to(dtype)
    return k_cache, torch.randn_like(k_cache)


# (B, T_new, H_kv, D, T_cache or page size, layout): one new row (decoding) and several (chunked
# prefill, speculative decoding); head counts and head dims that are not powers of two;
# contiguous, cache_batch_idx into a larger cache, and shuffled 16- and 64-key pages.
CASES = [
    (3, 1, 2, 64, 40, "contiguous"),
    (2, 5, 3, 40, 33, "contiguous"),
    (3, 2, 1, 24, 20, "batch_idx"),
    (3, 1, 4, 32, 16, "paged"),
    (2, 7, 2, 72, 64, "paged"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_append_matches_torch(case, dtype):
    B, T_new, H_kv, D, T_cache, layout = case
    k = torch.randn(B, T_new, H_kv, D, device=DEVICE).to(dtype)
    v = torch.randn_like(k)
    kw = {}
    if layout == "paged":
        page = T_cache
        per_seq = 3  # pages per sequence: room for 3 * page keys
        n_pages = B * per_seq + 2
        k_cache, v_cache = _caches(n_pages, page, H_kv, D, dtype)
        kw["block_table"] = torch.randperm(n_pages, device=DEVICE)[:B * per_seq].view(B, per_seq).int().contiguous()
        capacity = per_seq * page
    else:
        n_rows = B + 3 if layout == "batch_idx" else B
        k_cache, v_cache = _caches(n_rows, T_cache, H_kv, D, dtype)
        if layout == "batch_idx":
            kw["batch_idx"] = torch.randperm(n_rows, device=DEVICE)[:B].int()
        capacity = T_cache
    # Lengths from 0 to full after the append, the first sequence empty.
    seqlens = torch.randint(0, capacity - T_new + 1, (B,), device=DEVICE).int()
    seqlens[0], seqlens[-1] = 0, capacity - T_new
    want_k, want_v = k_cache.clone(), v_cache.clone()
    append_kv(want_k, want_v, k, v, seqlens, **kw)
    new_seqlens = append_kv_triton(k_cache, v_cache, k, v, seqlens, **kw)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    assert new_seqlens.dtype == torch.int32 and torch.equal(new_seqlens, seqlens + T_new)


def test_append_strided_new_rows():
    # k and v as views of a [B, Hkv, Tnew, D] tensor: their own strides are followed.
    k_cache, v_cache = _caches(2, 30, 2, 32, torch.float16)
    kv = torch.randn(2, 2, 2, 4, 32, device=DEVICE).half()
    k, v = kv[0].transpose(1, 2), kv[1].transpose(1, 2)
    seqlens = torch.tensor([3, 26], dtype=torch.int32, device=DEVICE)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    append_kv(want_k, want_v, k, v, seqlens)
    append_kv_triton(k_cache, v_cache, k, v, seqlens)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_append_nothing_new():
    # Zero new rows: the caches unchanged, the lengths as they were.
    k_cache, v_cache = _caches(2, 8, 1, 16, torch.float16)
    before = k_cache.clone()
    k = torch.zeros(2, 0, 1, 16, device=DEVICE).half()
    seqlens = torch.tensor([1, 5], dtype=torch.int32, device=DEVICE)
    new = append_kv_triton(k_cache, v_cache, k, k, seqlens)
    assert torch.equal(k_cache, before) and torch.equal(new, seqlens)


def _tables(T_ro, rot_half, dtype):
    angle = torch.rand(T_ro, rot_half, device=DEVICE) * 6.3
    return angle.cos().to(dtype), angle.sin().to(dtype)


# (B, T, H, D, rotary_dim): decoding and several tokens, rotary over part of the head and all of
# it, head counts and dims that are not powers of two.
ROTARY_CASES = [(2, 1, 4, 64, 64), (2, 3, 3, 40, 16), (1, 5, 2, 72, 24)]


@pytest.mark.parametrize("interleaved", [True, False], ids=["gptj", "neox"])
@pytest.mark.parametrize("same_position", [False, True], ids=["per-token", "same"])
@pytest.mark.parametrize("case", ROTARY_CASES, ids=lambda c: "-".join(map(str, c)))
def test_rotary_q_matches_torch(case, same_position, interleaved):
    B, T, H, D, rot = case
    dtype = torch.float16
    cos, sin = _tables(40, rot // 2, dtype)
    q = torch.randn(B, T, H, D, device=DEVICE).to(dtype)
    seqlens = torch.randint(0, 40 - T, (B,), device=DEVICE).int()
    want = apply_rotary(q, cos, sin, rotary_positions(seqlens, T, same_position=same_position),
                        interleaved=interleaved)
    got = rotary_q_triton(q, cos, sin, seqlens, interleaved=interleaved, same_position=same_position)
    torch.testing.assert_close(got, want)
    # The features past rotary_dim pass through untouched.
    assert torch.equal(got[..., rot:], q[..., rot:])


@pytest.mark.parametrize("interleaved", [True, False], ids=["gptj", "neox"])
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_append_rotary_matches_torch(layout, interleaved):
    # The new keys rotated at cache_seqlens[b] + i as they are written; v as it is.
    B, T_new, H_kv, D, rot = 2, 3, 3, 40, 16
    dtype = torch.float16
    cos, sin = _tables(64, rot // 2, dtype)
    k = torch.randn(B, T_new, H_kv, D, device=DEVICE).to(dtype)
    v = torch.randn_like(k)
    kw = {}
    if layout == "paged":
        k_cache, v_cache = _caches(6, 16, H_kv, D, dtype)
        kw["block_table"] = torch.randperm(6, device=DEVICE)[:4].view(B, 2).int().contiguous()
    else:
        k_cache, v_cache = _caches(B, 32, H_kv, D, dtype)
    seqlens = torch.tensor([0, 32 - T_new], dtype=torch.int32, device=DEVICE)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    k_rot = apply_rotary(k, cos, sin, rotary_positions(seqlens, T_new), interleaved=interleaved)
    append_kv(want_k, want_v, k_rot, v, seqlens, **kw)
    append_kv_triton(k_cache, v_cache, k, v, seqlens, rotary=(cos, sin, interleaved), **kw)
    torch.testing.assert_close(k_cache, want_k)
    assert torch.equal(v_cache, want_v)
