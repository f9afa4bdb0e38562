"""Backward preprocessing: ``delta = rowsum(dO ∘ O)``, the term softmax's gradient subtracts.

With ``P = softmax(S)``, ``dS = P ∘ (dP − delta)`` where ``delta_i = Σ_j P_ij dP_ij = dO_i · O_i``;
computing it once per row here saves both backward kernels a pass over the keys.

The one-pass backward (bwd_fused.py) also needs its fp32 dQ buffer zeroed; the same programs
write those zeros (``dq_acc``), one launch fewer than a separate fill on a path whose short
calls wait on the host.
"""
import triton
import triton.language as tl

from .._utils import cdiv
from ..launch import launch_site


@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, DQ_ACC,
                           stride_ob, stride_ot, stride_oh,
                           stride_dob, stride_dot, stride_doh,
                           T_q, H, D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                           ZERO_DQ: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, HEAD_DIM)
    m_m = o_m < T_q
    m_od = m_m[:, None] & (o_d < D)[None, :]
    p_o = O + i_b * stride_ob + i_h * stride_oh + o_m.to(tl.int64)[:, None] * stride_ot + o_d[None, :]
    p_do = DO + i_b * stride_dob + i_h * stride_doh + o_m.to(tl.int64)[:, None] * stride_dot + o_d[None, :]
    b_o = tl.load(p_o, mask=m_od, other=0.0).to(tl.float32)  # [BLOCK_M, HEAD_DIM]
    b_do = tl.load(p_do, mask=m_od, other=0.0).to(tl.float32)  # [BLOCK_M, HEAD_DIM]
    b_delta = tl.sum(b_o * b_do, 1)  # [BLOCK_M]
    tl.store(DELTA + (i_b * H + i_h) * T_q + o_m, b_delta, mask=m_m)
    if ZERO_DQ:
        # DQ_ACC: contiguous fp32 [B, Tq, H, D]
        p_dq = DQ_ACC + ((i_b * T_q + o_m.to(tl.int64)[:, None]) * H + i_h) * D + o_d[None, :]
        tl.store(p_dq, tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32), mask=m_od)


def bwd_preprocess(out, dout, delta, HEAD_DIM: int, dq_acc=None):
    """Write ``delta [B, H, Tq]`` (fp32, contiguous) from out and dout ``[B, Tq, H, D]``, and zeros
    into ``dq_acc`` when given (fp32, contiguous, out's shape)."""
    B, T_q, H, D = out.shape
    # Memory-bound: about 4096 elements of each input per program, whatever the head dim.
    BLOCK_M = max(16, 4096 // HEAD_DIM)
    grid = (cdiv(T_q, BLOCK_M), B * H)
    acc = delta if dq_acc is None else dq_acc
    key = ("bwd_preprocess", out.data_ptr(), dout.data_ptr(), delta.data_ptr(), acc.data_ptr(), dq_acc is None,
           out.shape, out.stride(), dout.stride(), out.dtype, dout.dtype, delta.dtype, acc.dtype, HEAD_DIM)
    launch_site(key, lambda: (
        _bwd_preprocess_kernel, grid,
        (out, dout, delta, acc, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
         dout.stride(2), T_q, H),
        dict(D=D, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, ZERO_DQ=dq_acc is not None, num_warps=4)))
