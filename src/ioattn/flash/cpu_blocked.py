"""Blocked CPU attention in plain torch, for what torch's CPU flash kernel cannot express: a sliding
window with a left bound, softcap, ALiBi and dropout.

Q is cut into blocks of ``BLOCK_M`` rows. A block's rows see keys in a band around the aligned
diagonal, so each block touches only the key range ``[lo, hi)`` that one of its rows can see
(`key_range`): the work grows with the window, not with T, and the scores of one block,
``[B, H, BLOCK_M, hi - lo]``, are the largest temporary (linear in T). The softmax of a block is
exact, not online: every key its rows see is in the one range.

GQA/MQA without expanding K/V: the G query heads of a KV head are folded into the rows,
``[B, Hkv, G·BLOCK_M, D]``, so one batched matmul per block serves the whole group, and in the
backward the matmul that gives dk/dv sums over the group by itself.

Dropout: the keep mask of each block is made from the seed and the indices of its entries by a
counter-based hash (`keep_mask`), so the backward regenerates it block by block and no T×T mask
is stored; the kept probabilities are scaled by ``1 / (1 − p)``, lse stays undropped.

Math in fp32 (fp64 for fp64 inputs) on upcast copies of K and V. lse is fp32, or fp64 for fp64
inputs, as on torch's kernel path (an fp32 lse would cap the fp64 gradients at ~1e−7).
"""
import torch

from .. import _utils

# Measured fwd+bwd on a 2-core AVX2 host (2 threads), fp32, B=1, H=8, D=64, T=2048, causal,
# window left 64 / 256 / 1024 / softcap over all keys, ms: 32 rows 83 / 91 / 152 / 240, 64 rows
# 56 / 75 / 132 / 218, 96 rows 49 / 68 / 122 / 209, 128 rows 52 / 70 / 127 / 213, 192 rows
# 60 / 76 / 136 / 222, 256 rows 71 / 91 / 145 / 245. Wider blocks compute more scores outside
# the band, narrower ones run smaller matmuls (worse with more threads) and more Python per
# row; on one thread 64 rows is best, 5-15% ahead of 128.
BLOCK_M = 128
# Bytes of one block's fp32 scores at most: a block shrinks (down to MIN_BLOCK_M rows) when
# B·H·BLOCK_M·(keys per block) is larger, so the temporaries stay moderate at large B·H·Tk.
SCORES_BUDGET = 64 << 20
MIN_BLOCK_M = 16


# splitmix64 (Steele, Lea, Flood 2014) and murmur3's fmix32: increments and multipliers as the
# signed values of the same bits (torch's integer arithmetic wraps like unsigned; it has no
# uint64 ops).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_FMIX = (0x85EBCA6B - (1 << 32), 0xC2B2AE35 - (1 << 32))


def _shr(x, n: int, bits: int, out=None):
    """Logical right shift of an int tensor of ``bits`` bits (torch's ``>>`` is arithmetic)."""
    return torch.bitwise_right_shift(x, n, out=out).bitwise_and_((1 << (bits - n)) - 1)


def _splitmix64_(z):
    """splitmix64's finalizer, in place on an int64 tensor: a bijection whose every output bit
    depends on every input bit, so consecutive counters give independent-looking numbers."""
    z.bitwise_xor_(_shr(z, 30, 64)).mul_(_MIX1)
    z.bitwise_xor_(_shr(z, 27, 64)).mul_(_MIX2)
    return z.bitwise_xor_(_shr(z, 31, 64))


def _hash32(seed: int, index):
    """High 32 bits of splitmix64 of ``(seed, index)`` for an int64 tensor, as int32."""
    return _splitmix64_(index.mul(_GOLDEN).add_(seed)).bitwise_right_shift_(32).to(torch.int32)


def keep_mask(seed: int, rows, cols, dropout_p: float):
    """Bool keep mask ``[*rows.shape, len(cols)]``: a key is kept with probability
    ``1 − dropout_p``, independently of every other.

    ``rows`` are int64 indices of (b, h, i) rows, ``(b·H + h)·Tq + i`` as in the Triton kernels
    (dropout.py), ``cols`` int64 key indices; the bits differ from the kernels' Philox ones
    (the backends' masks agree in distribution, not bit for bit). Each row and each key gets a
    64-bit hash of the seed (keys at negative indices, so no key hash is a row's); an entry is
    murmur3's fmix32 of the xor of the two. Only that last step runs per entry, in int32:
    measured for 1M entries on one thread of a shared 2-core AVX2 host, 3-5 ms against 8-25 ms
    for splitmix64 per entry in int64 (whose int64 multiplies do not vectorize on AVX2), which
    took longer than the attention forward of the same block.
    """
    row_hash, col_hash = _hash32(seed, rows.flatten()), _hash32(seed, -1 - cols)
    keep = torch.empty(row_hash.shape + col_hash.shape, dtype=torch.bool)
    # The hashes are uniform over the int32 range: a fraction p of them lie below this, to 2^-32.
    threshold = min(-(1 << 31) + round(dropout_p * (1 << 32)), (1 << 31) - 1)
    # In chunks of ~64K entries: the int32 temporaries of a whole block would be 8× its mask,
    # and those of a chunk stay in cache.
    chunk = max(1, (1 << 16) // max(1, len(col_hash)))
    for r0 in range(0, len(row_hash), chunk):
        z = row_hash[r0:r0 + chunk, None] ^ col_hash
        tmp = torch.empty_like(z)
        for shift, mult in zip((16, 13, 16), (*_FMIX, None)):
            z.bitwise_xor_(_shr(z, shift, 32, out=tmp))
            if mult is not None:
                z.mul_(mult)
        torch.ge(z, threshold, out=keep[r0:r0 + chunk])
    return keep.view(rows.shape + col_hash.shape)


def block_keep(seed: int, dropout_p: float, B: int, H: int, Tq: int, i0: int, i1: int, lo: int,
               hi: int):
    """Keep mask ``[B, H, i1 - i0, hi - lo]`` of rows ``[i0, i1)`` and keys ``[lo, hi)``."""
    rows = torch.arange(B * H).view(B, H, 1) * Tq + torch.arange(i0, i1)
    return keep_mask(seed, rows, torch.arange(lo, hi), dropout_p)


def sequence_seed(seed: int, b: int) -> int:
    """The seed of sequence b of a varlen batch, which the CPU backend runs one by one as B = 1:
    without it, sequences of equal lengths would share one mask."""
    return int(_splitmix64_(torch.tensor(b + 1).mul_(_GOLDEN).add_(seed)))


def key_range(i0: int, i1: int, Tk: int, diag_offset: int, left: int, right: int):
    """Keys ``[lo, hi)`` that any query row in ``[i0, i1)`` can see (empty when ``hi <= lo``).

    Query i sees key j iff ``i + diag_offset - left <= j <= i + diag_offset + right``, a
    negative bound leaving its side open; so the range is at most ``i1 - i0 + left + right``
    wide when both sides are bounded.
    """
    lo = 0 if left < 0 else max(0, i0 + diag_offset - left)
    hi = Tk if right < 0 else min(Tk, i1 + diag_offset + right)
    return lo, hi


def block_rows(B: int, H: int, Tk: int, left: int, right: int, itemsize: int) -> int:
    """Rows per Q block: BLOCK_M, halved while one block's scores exceed SCORES_BUDGET."""
    bq = BLOCK_M
    while bq > MIN_BLOCK_M:
        keys = Tk if left < 0 or right < 0 else min(Tk, bq + left + right)
        if B * H * bq * keys * itemsize <= SCORES_BUDGET:
            break
        bq //= 2
    return bq


# torch's exp is slow on x86 below its normal range (fp32, one thread: 37× for subnormal results,
# 12× under −104, 3.5× at −inf), which ALiBi's far keys hit (the forward ran 2.5× slower). So
# its argument is clamped at −80 (fp64: −700); the error, e^−80 ≈ 2e−35 per key against a row
# sum >= 1, lies far below rounding, and hidden keys are set back to exactly 0.
_EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(x, i0, i1, Hkv, cdt, mult=None):
    """Rows ``[i0, i1)`` of ``x [B, T, H, D]`` as ``[B, Hkv, G·(i1 - i0), D]`` in ``cdt``,
    times ``mult`` if given (then always a new tensor, never a view of ``x``)."""
    B, _, H, D = x.shape
    x = x[:, i0:i1].transpose(1, 2).to(cdt)
    if mult is not None:
        x = x * mult
    return x.reshape(B, Hkv, (H // Hkv) * (i1 - i0), D)


def _heads_first(x, cdt):
    # [B, T, Hkv, D] -> contiguous [B, Hkv, T, D]: one copy, so each block's matmul reads
    # a dense slice instead of copying a strided one again
    return x.transpose(1, 2).to(cdt).contiguous()


def _workspace(count, B, H, bq, Tk, left, right, cdt):
    """``count`` flat buffers, each the size of one block's largest scores.

    Every block writes its scores into these (matmul ``out=``) instead of allocating: the
    sizes change from block to block, and fresh allocations of them fragment the heap and cost
    page faults (measured, causal softcap, H=4, T=8192: forward peak RSS 63 MiB vs 47 MiB here;
    the score matmuls alone 1.5× slower).
    """
    keys = Tk if left < 0 or right < 0 else min(Tk, bq + left + right)
    return [torch.empty(B * H * bq * keys, dtype=cdt) for _ in range(count)]


def _tile(buf, *shape):
    # the first prod(shape) elements of a workspace buffer, as a contiguous tensor
    numel = 1
    for size in shape:
        numel *= size
    return buf[:numel].view(shape)


def _scores(qs, kt, i0, i1, lo, hi, H, diag_offset, left, right, softcap, neg_slopes, ws,
            attn_mask=None):
    """Final scores of rows ``[i0, i1)`` against keys ``[lo, hi)``: ``[B, H, i1 - i0, hi - lo]``,
    in ``ws[0]``.

    ``qs`` holds the rows of q already multiplied by the softmax scale (divided by softcap when
    it is on), so no pass over the scores is spent on the scale. Hidden keys are −inf. Given a
    second buffer ``ws[1]``, the tanh of the softcap is kept there (for its derivative) and
    returned; else None. Also returns the masks applied, for `_exp_`.
    """
    B, bq, n = qs.shape[0], i1 - i0, hi - lo
    s = _tile(ws[0], B, H, bq, n)
    # [B, Hkv, G·bq, n] viewed as [B, H, bq, n]: query head h = kv_head·G + g
    torch.matmul(qs, kt[:, :, lo:hi].transpose(-1, -2), out=s.view(qs.shape[:-1] + (n,)))
    t = None
    if softcap > 0 and len(ws) > 1:
        t = torch.tanh(s, out=_tile(ws[1], B, H, bq, n))
        torch.mul(t, softcap, out=s)
    elif softcap > 0:
        s.tanh_().mul_(softcap)
    if neg_slopes is not None:
        # |i + diag_offset − j| for the block, [bq, n]
        dist = torch.arange(i0 + diag_offset, i1 + diag_offset)[:, None] - torch.arange(lo, hi)
        s.addcmul_(neg_slopes, dist.abs_().to(s.dtype))
    # Only the columns some row of the block misses need a mask: at most bq of them on each
    # side (every hidden pair of the block lies in one), so masking costs O(bq²), not O(bq·n).
    masks = []
    if right >= 0 and i0 + diag_offset + right + 1 < hi:
        masks.append(_mask_cols(i0, i1, lo, max(lo, i0 + diag_offset + right + 1), hi,
                                diag_offset, left, right))
    if left >= 0 and i1 - 1 + diag_offset - left > lo:
        masks.append(_mask_cols(i0, i1, lo, lo, min(hi, i1 - 1 + diag_offset - left),
                                diag_offset, left, right))
    for cols, hidden in masks:
        s[..., cols].masked_fill_(hidden, float("-inf"))
    if attn_mask is not None:
        # SDPA's mask (an expanded [B, H, Tq, Tk] view), last, as in the kernels. The keys it
        # hides join `masks`, so that `_exp_` gives them exactly 0 (its floor would not) and a
        # row it hides entirely sums to 0, which makes its lse −inf.
        am = attn_mask[:, :, i0:i1, lo:hi]
        if am.dtype == torch.bool:
            hidden = ~am
        else:
            s.add_(am)
            hidden = am == float("-inf")
        s.masked_fill_(hidden, float("-inf"))
        masks.append((slice(None), hidden))
    return s, t, masks


def _mask_cols(i0, i1, lo, a, b, diag_offset, left, right):
    """``(columns, hidden)``: which keys of ``[a, b)`` each row of ``[i0, i1)`` does not see."""
    # rel[i, j] = j − (i + diag_offset): the key's distance right of the aligned diagonal
    rel = torch.arange(a, b) - torch.arange(i0 + diag_offset, i1 + diag_offset)[:, None]
    hidden = torch.zeros(rel.shape, dtype=torch.bool)
    if right >= 0:
        hidden |= rel > right
    if left >= 0:
        hidden |= rel < -left
    return slice(a - lo, b - lo), hidden


def _exp_(x, masks):
    """In-place exp of ``x`` (scores minus the row max or lse), hidden keys exactly 0."""
    x.clamp_(min=_EXP_FLOOR[x.dtype]).exp_()
    for cols, hidden in masks:
        x[..., cols].masked_fill_(hidden, 0.0)
    return x


def _neg_slopes(alibi_slopes, B, H, cdt):
    # [H] or [B, H] -> [B, H, 1, 1], negated so the bias is one addcmul
    if alibi_slopes is None:
        return None
    return alibi_slopes.to(cdt).expand(B, H).neg()[:, :, None, None]


def blocked_fwd(q, k, v, softmax_scale: float, diag_offset: int, left: int, right: int,
                softcap: float, alibi_slopes, dropout_p: float = 0.0, seed: int = 0, attn_mask=None):
    """Forward over Q blocks; ``(left, right)`` already hold causal (right = 0), −1 = open.
    With ``dropout_p > 0`` the probabilities are dropped by `block_keep` of ``seed``.
    ``attn_mask`` is SDPA's, expanded to ``[B, H, Tq, Tk]`` (bool or additive).

    Returns ``(out, lse)``: out ``[B, Tq, H, D]`` in q's dtype, lse ``[B, H, Tq]`` in the
    compute dtype (fp32; fp64 for fp64 inputs).
    """
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    cdt = _compute_dtype(q.dtype)
    kt, vt = _heads_first(k, cdt), _heads_first(v, cdt)
    neg_slopes = _neg_slopes(alibi_slopes, B, H, cdt)
    score_mult = softmax_scale / softcap if softcap > 0 else softmax_scale
    out = _utils.empty((B, Tq, H, D), dtype=q.dtype, device=q.device)
    lse = _utils.empty((B, H, Tq), dtype=cdt, device=q.device)
    bq = block_rows(B, H, Tk, left, right, kt.element_size())
    ws = _workspace(1, B, H, min(bq, Tq), Tk, left, right, cdt)
    for i0 in range(0, Tq, bq):
        i1 = min(i0 + bq, Tq)
        lo, hi = key_range(i0, i1, Tk, diag_offset, left, right)
        if hi <= lo:
            out[:, i0:i1].zero_()
            lse[:, :, i0:i1].fill_(float("-inf"))
            continue
        qs = _rows(q, i0, i1, Hkv, cdt, score_mult)
        s, _, masks = _scores(qs, kt, i0, i1, lo, hi, H, diag_offset, left, right, softcap,
                              neg_slopes, ws, attn_mask)
        # A row that sees no key has max −inf; 0 instead keeps s − m at −inf, not NaN, and
        # `_exp_` zeroes the row (all its keys are hidden).
        m = s.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)
        p = _exp_(s.sub_(m), masks)
        l = p.sum(-1, keepdim=True)
        if dropout_p > 0:
            # After the row sum: dropout acts on the normalized P, whose normalizer it leaves alone.
            p.mul_(block_keep(seed, dropout_p, B, H, Tq, i0, i1, lo, hi))
        o = torch.matmul(p.view(B, Hkv, -1, hi - lo), vt[:, :, lo:hi]).view(B, H, i1 - i0, D)
        # l >= 1 wherever a key is seen (its max term is exp(0)); where none is, o is 0 and l 0.
        o.div_(l.clamp_min(1.0))
        if dropout_p > 0:
            o.mul_(1.0 / (1.0 - dropout_p))
        out[:, i0:i1] = o.transpose(1, 2)
        lse[:, :, i0:i1] = (m + l.log()).squeeze(-1)
    return out, lse


def blocked_bwd(dout, q, k, v, out, lse, softmax_scale: float, diag_offset: int, left: int,
                right: int, softcap: float, alibi_slopes, dropout_p: float = 0.0, seed: int = 0,
                attn_mask=None):
    """Backward over Q blocks from the final ``(out, lse)``: P = exp(s − lse) is recomputed,
    Δ = rowsum(dO∘O), dS = P∘(dP − Δ) (times 1 − tanh² under softcap); dq is written per
    block, dk/dv accumulate over blocks in the compute dtype. With dropout the forward's mask Z
    is regenerated: dv takes (P∘Z/(1 − p))ᵀ dO and dP is (dO Vᵀ)∘Z/(1 − p); Δ = rowsum(dO∘O)
    still equals rowsum(P∘dP).

    Returns ``(dq, dk, dv)`` with the shapes and dtypes of q, k, v.
    """
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    cdt = _compute_dtype(q.dtype)
    dq = _utils.empty(q.shape, dtype=q.dtype, device=q.device)
    # [B·Hkv, Tk, D]: each block adds its [B·Hkv, n, D] matmul in place (baddbmm_), no temporary
    dk_acc = torch.zeros(B * Hkv, Tk, D, dtype=cdt)
    dv_acc = torch.zeros(B * Hkv, Tk, D, dtype=cdt)
    _bwd_blocks(dout, q, k, v, out, lse, dq, dk_acc, dv_acc, softmax_scale, diag_offset, left,
                right, softcap, alibi_slopes, dropout_p, seed, attn_mask)
    # Only now, with the K/V copies and the workspace gone, the [B, Tk, Hkv, D] results
    dk = _utils.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = _utils.empty(v.shape, dtype=v.dtype, device=v.device)
    dk.copy_(dk_acc.view(B, Hkv, Tk, D).transpose(1, 2))
    dv.copy_(dv_acc.view(B, Hkv, Tk, D).transpose(1, 2))
    return dq, dk, dv


def _bwd_blocks(dout, q, k, v, out, lse, dq, dk_acc, dv_acc, softmax_scale, diag_offset, left,
                right, softcap, alibi_slopes, dropout_p, seed, attn_mask):
    """The loop of `blocked_bwd`: writes dq, adds into dk_acc and dv_acc."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    cdt = dk_acc.dtype
    kt, vt = _heads_first(k, cdt), _heads_first(v, cdt)
    neg_slopes = _neg_slopes(alibi_slopes, B, H, cdt)
    # Rows that see no key (lse −inf) get +inf: s − lse is then −inf, not NaN (−inf − −inf),
    # and every key of such a row is hidden, so `_exp_` gives it P = 0.
    lse = lse.to(cdt).masked_fill(torch.isneginf(lse), float("inf"))[..., None]
    bm = block_rows(B, H, Tk, left, right, kt.element_size())
    # scores/P then dP/dS; under softcap, the tanh then P·(1 − tanh²) then dP/dS
    ws = _workspace(2, B, H, min(bm, Tq), Tk, left, right, cdt)
    for i0 in range(0, Tq, bm):
        i1 = min(i0 + bm, Tq)
        lo, hi = key_range(i0, i1, Tk, diag_offset, left, right)
        if hi <= lo:
            dq[:, i0:i1].zero_()
            continue
        bq, n = i1 - i0, hi - lo
        # q·scale serves dk (dS is taken w.r.t. the scaled scores) and, divided by softcap,
        # the scores
        qb = _rows(q, i0, i1, Hkv, cdt, softmax_scale)
        qs = qb * (1.0 / softcap) if softcap > 0 else qb
        dob = _rows(dout, i0, i1, Hkv, cdt)
        # [B, Hkv, G·bq, 1], rows in the order of the scores
        delta = (dob * _rows(out, i0, i1, Hkv, cdt)).sum(-1, keepdim=True)
        s, t, masks = _scores(qs, kt, i0, i1, lo, hi, H, diag_offset, left, right, softcap,
                              neg_slopes, ws, attn_mask)
        p = _exp_(s.sub_(lse[:, :, i0:i1]), masks).view(B, Hkv, -1, n)
        # 3-D views for baddbmm_: [B·Hkv, G·bq, n] and [B·Hkv, G·bq, D]
        dob3, qb3 = dob.flatten(0, 1), qb.flatten(0, 1)
        if t is None:
            p_grad, dp = p, _tile(ws[1], *p.shape)
        else:
            # P·(1 − tanh²) over the tanh, so P's buffer is free for dP: two buffers, not three
            p_grad = torch.addcmul(p, p, t.square_().view(p.shape), value=-1.0, out=t.view(p.shape))
            dp = p
        if dropout_p > 0:
            keep = block_keep(seed, dropout_p, B, H, Tq, i0, i1, lo, hi).view(p.shape)
            # P∘Z goes into dP's buffer, written only below (P's own under softcap, whose
            # derivative holds P by now), and 1 / (1 − p) into baddbmm's alpha: no third buffer.
            p_kept = torch.mul(p, keep, out=dp)
            dv_acc[:, lo:hi].baddbmm_(p_kept.flatten(0, 1).transpose(1, 2), dob3, alpha=1.0 / (1.0 - dropout_p))
        else:
            dv_acc[:, lo:hi].baddbmm_(p.flatten(0, 1).transpose(1, 2), dob3)
        torch.matmul(dob, vt[:, :, lo:hi].transpose(-1, -2), out=dp)
        if dropout_p > 0:
            dp.mul_(keep).mul_(1.0 / (1.0 - dropout_p))
        ds = dp.sub_(delta).mul_(p_grad)
        dqb = torch.matmul(ds, kt[:, :, lo:hi]).view(B, H, bq, D)
        dq[:, i0:i1] = dqb.mul_(softmax_scale).transpose(1, 2)
        dk_acc[:, lo:hi].baddbmm_(ds.flatten(0, 1).transpose(1, 2), qb3)
