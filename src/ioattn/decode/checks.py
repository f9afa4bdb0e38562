"""Argument checks of flash_attn_with_kvcache, all before the cache is touched.

Two stages: :func:`check_kvcache_args` checks types, shapes, dtypes and devices (the public
function calls it; it never reads tensor values), and :func:`check_kvcache_values` checks what
depends on the values (lengths, indices, page numbers) on a host copy of the small index tensors.
The second runs inside the op, so that it also runs under torch.compile, and costs one device
synchronization; IOATTN_CHECK_VALUES=0 turns it off for callers whose indices are right by
construction (a server's scheduler), and then bad indices are undefined behaviour, as in
flash-attn.
"""
import torch

from ..flash.checks import check_alibi, check_qkv, check_scale, check_softcap, check_window


def _check_index(t, name, shape, device):
    """None, or an int32 tensor of ``shape`` on ``device`` (returned contiguous)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")
    return t.contiguous()


def _check_cache(q, k_cache, v_cache, paged: bool):
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            layout = "[num_blocks, page_size, Hkv, D]" if paged else "[B_cache, Tcache, Hkv, D]"
            raise ValueError(f"{name} must have 4 dims {layout}, got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            # The append writes into the caller's cache; a copy would silently drop it.
            raise ValueError(f"{name} must have a contiguous last dim (it is written in place)")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q, k_cache, v_cache must share one dtype, got {q.dtype}, {k_cache.dtype}, "
                        f"{v_cache.dtype}")
    # check_qkv checks the dims, dtypes, devices and heads; the cache's batch is checked below.
    view = k_cache[:1].expand(q.shape[0], -1, -1, -1)
    check_qkv(q, view, view, names=("q", "k_cache", "v_cache"))
    if paged:
        page = k_cache.shape[1]
        if page < 16 or page & (page - 1):
            raise ValueError(f"page size (k_cache.shape[1]) must be a power of two >= 16, got {page}")


def check_kvcache_args(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                       cache_batch_idx, cache_leftpad, block_table, softmax_scale, window_size,
                       softcap, alibi_slopes, num_splits):
    """Shape, dtype and device checks. Returns a dict of the normalized arguments: q with a
    contiguous last dim, cache_seqlens as an int32 tensor ``[B]`` (and ``host_seqlen``, the int
    it was made from, when given as an int or None), window as a pair of ints, scale and softcap
    as floats."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q must be a 4-dim tensor [B, Tq, H, D], got {got}")
    paged = block_table is not None
    _check_cache(q, k_cache, v_cache, paged)
    B, Tq, H, D = q.shape
    Hkv = k_cache.shape[2]
    dev = q.device
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or both None)")
    if k is not None:
        if not isinstance(k, torch.Tensor) or k.dim() != 4 or k.shape[0] != B or k.shape[2:] != (Hkv, D):
            got = tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
            raise ValueError(f"k must have shape [B, Tnew, Hkv, D] = [{B}, Tnew, {Hkv}, {D}], got {got}")
        if not isinstance(v, torch.Tensor) or v.shape != k.shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {got}")
        for name, t in (("k", k), ("v", v)):
            if t.dtype != q.dtype:
                raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
            if t.device != dev:
                raise ValueError(f"{name} must be on q's device {dev}, got {t.device}")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together (or both None)")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin need the new k and v: rotary is applied to "
                             "the keys as they are appended")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"{name} must be a 2-dim tensor [T_ro, rotary_dim / 2]")
            if t.dtype != q.dtype:
                raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
            if t.device != dev:
                raise ValueError(f"{name} must be on q's device {dev}, got {t.device}")
        if rotary_sin.shape != rotary_cos.shape:
            raise ValueError(f"rotary_sin must have rotary_cos's shape {tuple(rotary_cos.shape)}, "
                             f"got {tuple(rotary_sin.shape)}")
        if not 1 <= 2 * rotary_cos.shape[1] <= D:
            raise ValueError(f"rotary_dim = 2 * rotary_cos.shape[1] = {2 * rotary_cos.shape[1]} "
                             f"must be in [2, D = {D}]")
    if isinstance(cache_seqlens, bool):
        raise TypeError("cache_seqlens must be an int, an int32 tensor [B] or None, got bool")
    host_seqlen = None
    if cache_seqlens is None or isinstance(cache_seqlens, int):
        if cache_seqlens is None:
            # flash-attn's meaning: every sequence fills its whole cache.
            cache_seqlens = capacity(k_cache, block_table)
        host_seqlen = cache_seqlens
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=dev)
    cache_seqlens = _check_index(cache_seqlens, "cache_seqlens", (B,), dev)
    cache_batch_idx = _check_index(cache_batch_idx, "cache_batch_idx", (B,), dev)
    cache_leftpad = _check_index(cache_leftpad, "cache_leftpad", (B,), dev)
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
            raise ValueError("block_table must be a 2-dim int32 tensor [B, max_blocks]")
        block_table = _check_index(block_table, "block_table", (B, block_table.shape[1]), dev)
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table: index the "
                             "pages through the block table instead")
    elif k_cache.shape[0] < B and cache_batch_idx is None:
        raise ValueError(f"k_cache holds {k_cache.shape[0]} sequences but q has B = {B}; pass "
                         "cache_batch_idx to pick rows of a smaller batch")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = heuristic), got {num_splits!r}")
    return dict(q=q if q.stride(-1) == 1 else q.contiguous(),
                k=k if k is None or k.stride(-1) == 1 else k.contiguous(),
                v=v if v is None or v.stride(-1) == 1 else v.contiguous(),
                rotary_cos=None if rotary_cos is None else rotary_cos.contiguous(),
                rotary_sin=None if rotary_sin is None else rotary_sin.contiguous(),
                cache_seqlens=cache_seqlens, host_seqlen=host_seqlen, cache_batch_idx=cache_batch_idx,
                cache_leftpad=cache_leftpad, block_table=block_table,
                softmax_scale=check_scale(softmax_scale, D), window=check_window(window_size),
                softcap=check_softcap(softcap), alibi_slopes=check_alibi(alibi_slopes, q))


def capacity(k_cache, block_table) -> int:
    """Keys one sequence can hold: the cache's T, or ``max_blocks · page_size`` when paged."""
    if block_table is None:
        return k_cache.shape[1]
    return block_table.shape[1] * k_cache.shape[1]


def check_kvcache_values(k_cache, cache_seqlens, T_new, cache_batch_idx, cache_leftpad, block_table,
                         rotary_len, rotary_q_tokens, *, kernel: bool = False) -> int:
    """Checks on the values of the index tensors; returns the longest key length after the
    append, ``max(cache_seqlens) + T_new``. ``rotary_len`` is the rotary tables' length (0 without
    rotary) and ``rotary_q_tokens`` how many positions from ``cache_seqlens[b]`` q uses.

    The ``[B]`` index vectors come to the host in one transfer, with, for a paged cache, a count
    of bad pages computed on the device (a block table of a long context holds many thousands of
    pages, too many to walk on the host); the conditions are then evaluated on the host. Measured
    on the H200, one decoding call at B = 1 × 1k: 619 µs with the previous checks (every condition
    a small device op) against 304 µs without checks; 272 µs with these. ``kernel``: gather the
    vectors and count the pages in one Triton launch (index_check.py) instead of torch ops (the
    CPU backend's way). The messages are built only when a check fails.
    """
    B = cache_seqlens.shape[0]
    cap = capacity(k_cache, block_table)
    parts = [x for x in (cache_seqlens, cache_leftpad, cache_batch_idx) if x is not None]
    if kernel and (len(parts) > 1 or block_table is not None):
        from .index_check import index_values

        host = index_values(cache_seqlens, cache_leftpad, cache_batch_idx, block_table, T_new, k_cache.shape[1],
                            k_cache.shape[0]).tolist()
        if block_table is not None:
            # The per-sequence counts of bad pages become the one flag the torch path reads.
            n = len(host) - B
            host = host[:n] + [any(host[n:])]
    else:
        if block_table is not None:
            # Only the pages that hold keys are read; entries past them may hold anything.
            lengths = cache_seqlens.long() + T_new
            parts.append(_bad_pages(block_table, lengths, k_cache.shape[1], k_cache.shape[0]).any().view(1))
        host = (torch.cat([x.long() for x in parts]) if len(parts) > 1 else parts[0]).tolist()
    seqlens, rest = host[:B], host[B:]
    bad = _length_flags(seqlens, T_new, cap, rotary_len, rotary_q_tokens)
    if cache_leftpad is not None:
        leftpad, rest = rest[:B], rest[B:]
        bad["leftpad"] = any(p < 0 or p > x for p, x in zip(leftpad, seqlens))
    if cache_batch_idx is not None:
        rows, rest = rest[:B], rest[B:]
        bad["rows"] = any(r < 0 or r >= k_cache.shape[0] for r in rows)
        if T_new:
            bad["repeat"] = len(set(rows)) < len(rows)
    if block_table is not None:
        bad["pages"] = bool(rest[0])
    if any(bad.values()):
        _raise(bad, seqlens, T_new, cap, rotary_len, rotary_q_tokens, k_cache, cache_seqlens, cache_batch_idx,
               cache_leftpad, block_table)
    return max((x + T_new for x in seqlens), default=0)


def check_lengths(seqlens: list, T_new: int, cap: int, rotary_len: int, rotary_q_tokens: int) -> int:
    """:func:`check_kvcache_values`'s checks that depend on the lengths alone, on lengths the
    caller keeps on the host (ioattn's cache classes), so nothing is read back from the device;
    same messages. Returns ``max(seqlens) + T_new``."""
    bad = _length_flags(seqlens, T_new, cap, rotary_len, rotary_q_tokens)
    if any(bad.values()):
        _raise(bad, seqlens, T_new, cap, rotary_len, rotary_q_tokens)
    return max((x + T_new for x in seqlens), default=0)


def check_call_lengths(seqlens: list, T_new: int, cap: int, rotary_cos, T_q: int, causal: bool, window) -> int:
    """:func:`check_lengths` for a call's arguments: the rotary tables' length from
    ``rotary_cos`` (None: no rotary), and q's rotary positions from each length: T_q of them when
    causal or windowed, else one (every query at the length, as in flash-attn)."""
    local = bool(causal) or tuple(window) != (-1, -1)
    return check_lengths(seqlens, T_new, cap, 0 if rotary_cos is None else rotary_cos.shape[0],
                         T_q if local else 1)


def _length_flags(seqlens, T_new, cap, rotary_len, rotary_q_tokens) -> dict:
    bad = {"seqlens": any(x < 0 for x in seqlens), "append": any(x + T_new > cap for x in seqlens)}
    if rotary_len:
        bad["rotary"] = any(x + max(T_new, rotary_q_tokens) > rotary_len for x in seqlens)
    return bad


def _bad_pages(block_table, lengths, page: int, num_pages: int):
    """``[B, max_blocks]`` bool: entries of the pages that hold keys and point outside the cache
    (entries past a sequence's pages are never read and may hold anything)."""
    used = torch.arange(block_table.shape[1], device=block_table.device) < (lengths[:, None] + page - 1) // page
    return used & ((block_table < 0) | (block_table >= num_pages))


def _raise(bad, seqlens, T_new, cap, rotary_len, rotary_q_tokens, k_cache=None, cache_seqlens=None,
           cache_batch_idx=None, cache_leftpad=None, block_table=None):
    """The error of the first failed check, with the values that broke it (the index tensors are
    needed only for the checks that read them)."""
    rows = None if cache_batch_idx is None else cache_batch_idx.tolist()

    def bad_pages():
        page = k_cache.shape[1]
        lengths = cache_seqlens.long() + T_new
        b = _bad_pages(block_table, lengths, page, k_cache.shape[0]).any(1).tolist().index(True)
        used = block_table[b, : (seqlens[b] + T_new + page - 1) // page].tolist()
        return f"block_table[{b}] points outside the {k_cache.shape[0]} pages of k_cache: {used}"

    # Messages are built lazily: only the failed check's values are read back.
    messages = {
        "seqlens": lambda: f"cache_seqlens must be >= 0, got {seqlens}",
        "append": lambda: (f"cache too small: appending {T_new} tokens at cache_seqlens = {seqlens} needs "
                           f"up to {max(seqlens) + T_new} rows, the cache holds {cap} per sequence"),
        "leftpad": lambda: (f"cache_leftpad must be in [0, cache_seqlens] for each sequence, got "
                            f"{cache_leftpad.tolist()} with cache_seqlens {seqlens}"),
        "rows": lambda: f"cache_batch_idx must index the {k_cache.shape[0]} rows of k_cache, got {rows}",
        "repeat": lambda: f"cache_batch_idx must not repeat a row when k/v are appended, got {rows}",
        "pages": bad_pages,
        "rotary": lambda: (f"rotary tables too short: positions up to "
                           f"{max(s + max(T_new, rotary_q_tokens) for s in seqlens) - 1} are needed, "
                           f"rotary_cos/rotary_sin have {rotary_len} rows"),
    }
    first = next(key for key in messages if bad.get(key))
    raise ValueError(messages[first]())
