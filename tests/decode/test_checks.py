"""Bad input to flash_attn_with_kvcache (src/ioattn/decode/checks.py): a clear error naming the
argument, raised before any launch, with the caches left exactly as they were."""
import pytest
import torch

from ioattn import flash_attn_with_kvcache

from .cases import DEVICE, make_case


def _base(device="cpu"):
    # Paged 16-token pages, 2 sequences of capacity 64, one new token, rotary on.
    return make_case(2, 1, 1, 64, 4, 2, 32, [20, 50], dtype=torch.float16, device=device, page_size=16,
                     rotary_dim=16)


def _i32(kw, values):
    return torch.tensor(values, dtype=torch.int32, device=kw["q"].device)


def _bad_table(kw):
    kw["block_table"][1, 2] = kw["k_cache"].shape[0]


def _negative_table(kw):
    kw["block_table"][0, 0] = -1


def _short_rotary(kw):
    kw["rotary_cos"], kw["rotary_sin"] = kw["rotary_cos"][:50], kw["rotary_sin"][:50]


def _full_cache(kw):
    kw["cache_seqlens"][1] = 64


# (name, how to spoil a good call, error type, words the message must contain)
BAD = [
    ("block_table out of range", _bad_table, ValueError, "block_table[1]"),
    ("block_table negative", _negative_table, ValueError, "block_table[0]"),
    ("cache too small for the append", _full_cache, ValueError, "cache too small"),
    ("rotary tables too short", _short_rotary, ValueError, "rotary tables too short"),
    ("k dtype", lambda kw: kw.update(k=kw["k"].float()), TypeError, "k must have q's dtype"),
    ("cache dtype", lambda kw: kw.update(v_cache=kw["v_cache"].bfloat16()), TypeError, "v_cache"),
    ("rotary dtype", lambda kw: kw.update(rotary_sin=kw["rotary_sin"].float()), TypeError, "rotary_sin"),
    ("seqlens dtype", lambda kw: kw.update(cache_seqlens=kw["cache_seqlens"].long()), TypeError,
     "cache_seqlens must be int32"),
    ("seqlens negative", lambda kw: kw["cache_seqlens"].fill_(-1), ValueError, "cache_seqlens must be >= 0"),
    ("seqlens shape", lambda kw: kw.update(cache_seqlens=kw["cache_seqlens"][:1]), ValueError, "cache_seqlens"),
    ("leftpad past seqlens", lambda kw: kw.update(cache_leftpad=_i32(kw, [0, 51])), ValueError, "cache_leftpad"),
    ("k without v", lambda kw: kw.update(v=None), ValueError, "k and v"),
    ("k shape", lambda kw: kw.update(k=kw["k"][..., :16]), ValueError, "k must have shape"),
    ("rotary without k", lambda kw: kw.update(k=None, v=None), ValueError, "rotary_cos"),
    ("rotary_dim > D", lambda kw: kw.update(rotary_cos=kw["rotary_cos"].new_ones(80, 20),
                                            rotary_sin=kw["rotary_sin"].new_ones(80, 20)),
     ValueError, "rotary_dim"),
    ("page size", lambda kw: kw.update(k_cache=kw["k_cache"][:, :12], v_cache=kw["v_cache"][:, :12]),
     ValueError, "page size"),
    ("batch idx with pages", lambda kw: kw.update(cache_batch_idx=_i32(kw, [0, 1])), ValueError, "cache_batch_idx"),
    ("heads", lambda kw: kw.update(q=kw["q"].new_ones(2, 1, 3, 32)), ValueError, "heads"),
    ("num_splits", lambda kw: kw.update(num_splits=-1), ValueError, "num_splits"),
    ("window", lambda kw: kw.update(window_size=(-2, 0)), ValueError, "window_size"),
]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("name, spoil, error, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_leaves_cache_unchanged(name, spoil, error, words, backend, monkeypatch):
    monkeypatch.setenv("IOATTN_BACKEND", backend)
    # The Triton kernels take CUDA tensors where there is a GPU, CPU ones in the interpreter.
    kw = _base("cpu" if backend == "cpu" else DEVICE)
    flash_attn_with_kvcache(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    spoil(kw)
    before = kw["k_cache"].clone(), kw["v_cache"].clone()
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        flash_attn_with_kvcache(**kw)
    assert torch.equal(kw["k_cache"], before[0]) and torch.equal(kw["v_cache"], before[1])


def test_contiguous_cache_errors():
    kw = make_case(2, 1, 1, 32, 4, 2, 16, [3, 4], dtype=torch.float16, device="cpu", batch_rows=4)
    before = kw["k_cache"].clone()
    with pytest.raises(ValueError, match="cache_batch_idx must index"):
        flash_attn_with_kvcache(**dict(kw, cache_batch_idx=torch.tensor([0, 4], dtype=torch.int32)))
    with pytest.raises(ValueError, match="must not repeat"):
        flash_attn_with_kvcache(**dict(kw, cache_batch_idx=torch.tensor([1, 1], dtype=torch.int32)))
    with pytest.raises(ValueError, match="holds 1 sequences"):
        flash_attn_with_kvcache(**dict(kw, k_cache=kw["k_cache"][:1], v_cache=kw["v_cache"][:1],
                                       cache_batch_idx=None))
    with pytest.raises(ValueError, match="contiguous last dim"):
        flash_attn_with_kvcache(**dict(kw, k_cache=kw["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)))
    assert torch.equal(kw["k_cache"], before)


def test_value_checks_can_be_skipped(monkeypatch):
    # IOATTN_CHECK_VALUES=0 skips the host copy; a good call gives the same result.
    kw = _base()
    ref = flash_attn_with_kvcache(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    monkeypatch.setenv("IOATTN_CHECK_VALUES", "0")
    torch.testing.assert_close(flash_attn_with_kvcache(**kw), ref)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_int_seqlens_are_checked_on_the_host(backend, monkeypatch):
    # cache_seqlens as an int (or None, full caches) without index tensors: the same checks and
    # messages on the host values, no read-back of a device tensor (check_kvcache_values, which
    # makes it, is not reached), and the same result as the tensor form.
    from ioattn.decode import ops

    monkeypatch.setenv("IOATTN_BACKEND", backend)
    device = "cpu" if backend == "cpu" else DEVICE
    kw = make_case(2, 1, 1, 48, 4, 2, 32, [30, 30], dtype=torch.float16, device=device, rotary_dim=16)
    tensor_form = flash_attn_with_kvcache(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    monkeypatch.setattr(ops, "check_kvcache_values", lambda *a: pytest.fail("read the lengths back"))
    got = flash_attn_with_kvcache(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
                                  | dict(cache_seqlens=30))
    torch.testing.assert_close(got, tensor_form, atol=0, rtol=0)
    before = kw["k_cache"].clone(), kw["v_cache"].clone()
    for seqlens, words in ((48, "cache too small"), (None, "cache too small"), (-1, "cache_seqlens must be >= 0")):
        with pytest.raises(ValueError, match=words):
            flash_attn_with_kvcache(**kw | dict(cache_seqlens=seqlens))
    with pytest.raises(ValueError, match="rotary tables too short"):
        flash_attn_with_kvcache(**kw | dict(cache_seqlens=10, rotary_cos=kw["rotary_cos"][:10],
                                            rotary_sin=kw["rotary_sin"][:10]))
    assert torch.equal(kw["k_cache"], before[0]) and torch.equal(kw["v_cache"], before[1])
    # Without k and v, None means full caches: nothing to append, nothing to check on the device.
    flash_attn_with_kvcache(kw["q"], kw["k_cache"], kw["v_cache"], cache_seqlens=None)
