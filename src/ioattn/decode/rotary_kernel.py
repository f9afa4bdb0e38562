"""Rotary position embedding in Triton: the rotation of one token's heads (used by append.py on
the new keys as it writes them, and here on the queries), so a decoding step with rotary costs
two launches where rotary.py's torch version takes some thirty (about fourteen ops per tensor).

The math is rotary.py's: the first ``rotary_dim = 2 · ROT_HALF`` features of each head are
paired (interleaved ``(2j, 2j + 1)`` or ``(j, j + ROT_HALF)``), each pair ``(x1, x2)`` becomes
``(x1·cos − x2·sin, x1·sin + x2·cos)`` with the table's row at the token's position, computed in
fp32 and rounded once; the other features pass through. The CPU backend keeps rotary.py; the
tests compare the two.
"""
import triton
import triton.language as tl

from .._utils import empty, next_pow2
from ..flash.fwd import device_guard
from ..launch import launch_site


@triton.jit
def _rotate_heads(X, OUT, COS, SIN, pos, stride_xh, stride_oh, stride_cos, H, D: tl.constexpr,
                  ROT_HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Write to ``OUT`` the heads ``X [H, D]`` (head stride given, unit feature stride) of one
    token at position ``pos``, rotated. The rotated pairs and the passed-through features are
    disjoint stores, so no two threads write one element."""
    o_h = tl.arange(0, BLOCK_H)
    o_r = tl.arange(0, BLOCK_R)
    m_h = o_h < H
    m_r = o_r < ROT_HALF
    row = pos.to(tl.int64) * stride_cos
    b_cos = tl.load(COS + row + o_r, mask=m_r, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_R]
    b_sin = tl.load(SIN + row + o_r, mask=m_r, other=0.0).to(tl.float32)[None, :]
    if INTERLEAVED:
        i1, i2 = 2 * o_r, 2 * o_r + 1
    else:
        i1, i2 = o_r, o_r + ROT_HALF
    m = m_h[:, None] & m_r[None, :]
    p_x = X + o_h[:, None] * stride_xh
    p_o = OUT + o_h[:, None] * stride_oh
    x1 = tl.load(p_x + i1[None, :], mask=m, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_R]
    x2 = tl.load(p_x + i2[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(p_o + i1[None, :], (x1 * b_cos - x2 * b_sin).to(OUT.dtype.element_ty), mask=m)
    tl.store(p_o + i2[None, :], (x1 * b_sin + x2 * b_cos).to(OUT.dtype.element_ty), mask=m)
    o_d = tl.arange(0, BLOCK_D)
    m_pass = m_h[:, None] & ((o_d >= 2 * ROT_HALF) & (o_d < D))[None, :]
    tl.store(p_o + o_d[None, :], tl.load(p_x + o_d[None, :], mask=m_pass), mask=m_pass)


@triton.jit
def _rotary_q_kernel(Q, OUT, COS, SIN, SEQLENS, stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
                     stride_cos, T_q, H, D: tl.constexpr, ROT_HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
                     SAME_POSITION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """Program ``b · T_q + i`` rotates query i of sequence b at ``SEQLENS[b] + i``, or at
    ``SEQLENS[b]`` with ``SAME_POSITION`` (flash-attn's queries when neither causal nor local)."""
    i_bt = tl.program_id(0)
    i_b, i_t = i_bt // T_q, i_bt % T_q
    pos = tl.load(SEQLENS + i_b)
    if not SAME_POSITION:
        pos += i_t
    i_b64, i_t64 = i_b.to(tl.int64), i_t.to(tl.int64)
    _rotate_heads(Q + i_b64 * stride_qb + i_t64 * stride_qt, OUT + i_b64 * stride_ob + i_t64 * stride_ot, COS, SIN,
                  pos, stride_qh, stride_oh, stride_cos, H, D, ROT_HALF, INTERLEAVED, BLOCK_H, BLOCK_R, BLOCK_D)


def rotary_blocks(H: int, D: int, rot_half: int) -> dict:
    """The power-of-two tile sides of :func:`_rotate_heads` for H heads of D features."""
    return dict(BLOCK_H=next_pow2(H), BLOCK_R=next_pow2(rot_half), BLOCK_D=next_pow2(D))


def rotary_q_triton(q, cos, sin, cache_seqlens, *, interleaved: bool, same_position: bool):
    """rotary.py's ``apply_rotary(q, cos, sin, rotary_positions(cache_seqlens, Tq, same_position))``
    in one launch: a new ``[B, Tq, H, D]`` tensor in q's dtype. Arguments already validated:
    q with a unit last stride, the tables ``[T_ro, rotary_dim / 2]`` contiguous in q's dtype."""
    B, T_q, H, D = q.shape
    out = empty((B, T_q, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    rot_half = cos.shape[1]
    key = ("rotary_q", q.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr(), cache_seqlens.data_ptr(),
           q.shape, q.stride(), cos.shape, cos.stride(0), q.dtype, cos.dtype, bool(interleaved), bool(same_position))
    with device_guard(q):
        launch_site(key, lambda: (
            _rotary_q_kernel, (B * T_q,),
            (q, out, cos, sin, cache_seqlens, *q.stride()[:3], *out.stride()[:3], cos.stride(0), T_q, H),
            dict(D=D, ROT_HALF=rot_half, INTERLEAVED=bool(interleaved), SAME_POSITION=bool(same_position),
                 **rotary_blocks(H, D, rot_half), num_warps=4)))
    return out
