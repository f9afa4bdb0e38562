"""Shared vocabulary of the decode tests: random KV-cache problems, the feature cases every
backend runs, and the check of one call against the dense reference (kvcache_ref)."""
import math

import torch

from ioattn import flash_attn_with_kvcache
from ioattn.decode.reference import kvcache_ref
from ioattn.decode.rotary import apply_rotary
from ioattn.testing import assert_close

from ..flash.test_fwd import assert_lse

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def paginate(k_cache, v_cache, page_size, *, spare=3):
    """``(k_paged, v_paged, block_table)``: the rows of contiguous ``[B, Tcap, Hkv, D]`` caches cut
    into pages stored in shuffled order among ``spare`` unused (random) pages."""
    B, Tcap = k_cache.shape[:2]
    per_seq = Tcap // page_size
    n = B * per_seq + spare
    perm = torch.randperm(n, device=k_cache.device)[: B * per_seq]

    def one(cache):
        paged = torch.randn(n, page_size, *cache.shape[2:], device=cache.device).to(cache.dtype)
        paged[perm] = cache.reshape(B * per_seq, page_size, *cache.shape[2:])
        return paged
    return one(k_cache), one(v_cache), perm.view(B, per_seq).to(torch.int32)


def make_case(B, Tq, Tnew, Tcap, H, Hkv, D, seqlens, *, dtype, device=DEVICE, page_size=None,
              leftpad=False, batch_rows=None, rotary_dim=0, interleaved=True, alibi=False, **options):
    """Keyword arguments of one flash_attn_with_kvcache call: caches of capacity Tcap holding
    ``seqlens[b]`` keys, Tnew new keys (0: none), optional paging, leftpad, a cache with
    ``batch_rows`` rows indexed by a random cache_batch_idx, rotary tables, ALiBi slopes."""
    rows = batch_rows or B
    k_cache = torch.randn(rows, Tcap, Hkv, D, device=device).to(dtype)
    v_cache = torch.randn(rows, Tcap, Hkv, D, device=device).to(dtype)
    kw = dict(q=torch.randn(B, Tq, H, D, device=device).to(dtype),
              cache_seqlens=seqlens if isinstance(seqlens, int) else
              torch.tensor(seqlens, dtype=torch.int32, device=device), **options)
    if Tnew:
        kw["k"] = torch.randn(B, Tnew, Hkv, D, device=device).to(dtype)
        kw["v"] = torch.randn(B, Tnew, Hkv, D, device=device).to(dtype)
    if batch_rows:
        kw["cache_batch_idx"] = torch.randperm(rows)[:B].to(torch.int32).to(device)
    if page_size:
        k_cache, v_cache, kw["block_table"] = paginate(k_cache, v_cache, page_size)
    if leftpad:
        kw["cache_leftpad"] = torch.tensor([s * 2 // 5 for s in seqlens], dtype=torch.int32, device=device)
    if rotary_dim:
        angle = torch.rand(Tcap + Tq, rotary_dim // 2, device=device) * 2 * math.pi
        kw.update(rotary_cos=angle.cos().to(dtype), rotary_sin=angle.sin().to(dtype),
                  rotary_interleaved=interleaved)
    if alibi:
        kw["alibi_slopes"] = (torch.rand(B, H, device=device) * 0.3 + 0.01).float()
    kw.update(k_cache=k_cache, v_cache=v_cache)
    return kw


def _ref_args(kw):
    ref = {k: v for k, v in kw.items() if k not in ("window_size", "num_splits", "rotary_interleaved")}
    ref["window"] = kw.get("window_size", (-1, -1))
    if isinstance(kw["cache_seqlens"], int):
        ref["cache_seqlens"] = torch.full((kw["q"].shape[0],), kw["cache_seqlens"], dtype=torch.int32,
                                          device=kw["q"].device)
    ref["rotary_interleaved"] = kw.get("rotary_interleaved", True)
    return ref


def rounding_floor(ref, dtype) -> float:
    """Half an ulp of ``dtype`` at the reference's largest magnitude: the rounding of a correctly
    rounded output, which no implementation avoids. With the few keys of these tiny caches the
    plain-PyTorch error is itself about that size, and 2x it alone failed ~1% of fresh bf16 draws
    (ratios up to 2.8 in 2000 draws) while the outputs were within one rounding of exact."""
    if dtype == torch.float32:
        return 1e-5
    top = ref.abs().max().item()
    return 0.5 * torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(top)) if top > 0 else 1e-4


def prerotate(kw):
    """The reference's arguments with q and the new k already rotated, in their own dtype, and
    no rotary tables. Positions as flash-attn documents them: the new keys at cache_seqlens[b] + i,
    the queries there too when causal or local, else all at cache_seqlens[b].

    As in flash-attn's tests, the rotated q and k rounded to the input dtype are the attention's
    inputs for the reference too: the rounding is part of the contract (the rotated k is what the
    cache stores), and a reference that skipped it would charge that shared rounding to the
    attention (an lse check failed ~1 in 200 bf16 draws for that reason alone).
    """
    kw = dict(kw)
    cos, sin = kw.pop("rotary_cos"), kw.pop("rotary_sin")
    interleaved = kw.pop("rotary_interleaved")
    seqlens = kw["cache_seqlens"].long()[:, None]
    local = kw.get("causal", False) or tuple(kw["window"]) != (-1, -1)
    pos_q = seqlens + (torch.arange(kw["q"].shape[1], device=seqlens.device) if local else 0)
    pos_k = seqlens + torch.arange(kw["k"].shape[1], device=seqlens.device)
    kw["q"] = apply_rotary(kw["q"], cos, sin, pos_q.expand(-1, kw["q"].shape[1]), interleaved=interleaved)
    kw["k"] = apply_rotary(kw["k"], cos, sin, pos_k, interleaved=interleaved)
    return kw


def check_kvcache(kw, call=flash_attn_with_kvcache):
    """Run ``call(**kw)`` and hold it to the accuracy rule against kvcache_ref: out and lse 2× the
    plain-PyTorch error, the appended caches equal to the baseline's bit for bit (the same
    rotation, rounded once, is written), rows past the append untouched."""
    ref_kw = _ref_args(kw)
    if ref_kw.get("rotary_cos") is not None:
        ref_kw = prerotate(ref_kw)
    rdt = torch.float64 if kw["q"].dtype == torch.float32 or kw["q"].device.type == "cpu" else torch.float32
    ref, ref_lse, _, _ = kvcache_ref(**{k: (v.to(rdt) if isinstance(v, torch.Tensor) and v.is_floating_point()
                                           and k != "alibi_slopes" else v) for k, v in ref_kw.items()},
                                     upcast=False)
    base, base_lse, k_new, v_new = kvcache_ref(**ref_kw, upcast=False)
    out, lse = call(**kw, return_softmax_lse=True)
    assert out.shape == kw["q"].shape and out.dtype == kw["q"].dtype
    assert lse.shape == (out.shape[0], out.shape[2], out.shape[1]) and lse.dtype == torch.float32
    assert_close("out", out, ref, base, floor=rounding_floor(ref, out.dtype))
    assert_lse(lse, ref_lse, base_lse)
    assert torch.equal(kw["k_cache"], k_new) and torch.equal(kw["v_cache"], v_new), "cache append"
    return out, lse


# (B, Tq, Tnew, Tcap, H, Hkv, D, seqlens, options): every item of the test list.
CASES = {
    "varlen-empty-full": (3, 1, 1, 80, 4, 2, 40, [0, 37, 79], {}),
    "no-append-int-seqlens": (2, 1, 0, 48, 4, 1, 32, 48, {}),
    "paged16-shuffled": (2, 1, 1, 64, 4, 2, 32, [20, 63], dict(page_size=16)),
    "paged32-causal-spec": (2, 3, 3, 64, 4, 2, 16, [0, 40], dict(page_size=32, causal=True)),
    "rotary-interleaved-causal": (2, 2, 2, 48, 4, 2, 32, [5, 30], dict(rotary_dim=16, causal=True)),
    "rotary-neox-noncausal": (2, 2, 2, 48, 4, 1, 32, [5, 30], dict(rotary_dim=32, interleaved=False)),
    "leftpad-causal": (3, 2, 1, 48, 4, 2, 16, [10, 47, 0], dict(leftpad=True, causal=True)),
    "batch-idx-mqa": (2, 1, 1, 40, 4, 1, 40, [7, 33], dict(batch_rows=5)),
    "chunked-prefill-tiles": (1, 20, 20, 64, 4, 2, 16, [30], dict(causal=True)),
    "window-softcap-alibi": (2, 2, 1, 64, 4, 2, 32, [50, 20], dict(window_size=(9, 0), softcap=5.0,
                                                                    alibi=True)),
    "paged-leftpad-alibi-window": (3, 2, 2, 64, 4, 2, 32, [50, 20, 0], dict(page_size=16, leftpad=True, causal=True,
                                                                          alibi=True, window_size=(20, -1))),
    "all-empty": (2, 1, 0, 32, 2, 1, 16, [0, 0], {}),
}
