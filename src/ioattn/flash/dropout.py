"""Attention dropout in the Triton kernels: the keep mask, made inside them from a seed.

Every (batch, head, query row, key) of the score matrix owns one Philox counter: its linear
index in ``[B, H, Tq, Tk]`` (varlen: in ``[H, total_q, Tk_max]``, the packed rows one after the
other, Tk_max the longest key sequence). ``tl.rand(seed, counter)`` turns it into a uniform
number in [0, 1), and the key is kept iff that number is >= dropout_p. The mask is a function of
the indices alone, not of the tiles: the forward and both backward kernels, which walk the matrix
in different orders and tile sizes (the dK/dV pass transposed), regenerate the same mask, and no
``Tq × Tk`` mask is ever stored. Counters are int64: B·H·Tq·Tk passes 2³¹ at moderate sizes, and
``tl.rand`` feeds the high 32 bits to Philox as a second counter word.

The seed comes from torch's CPU generator (see :func:`draw_seed` in ops.py) and is passed as an
int64 kernel argument that Triton does not specialize on, so a new seed never recompiles.
"""
import torch
import triton
import triton.language as tl

from .._utils import cdiv
from ..launch import launch


def dropout_args(dropout_p: float, seed: int) -> dict:
    """The kernels' dropout arguments; with ``dropout_p == 0`` HAS_DROPOUT compiles them out."""
    return dict(seed=int(seed), dropout_p=float(dropout_p), HAS_DROPOUT=dropout_p > 0)


@triton.jit
def _dropout_keep(seed, o_rows, o_cols, dropout_p):
    """Keep mask of the counters ``o_rows + o_cols`` (they broadcast to the tile's shape, in
    either orientation): ``o_rows`` the int64 first counter of each row (``row · Tk``),
    ``o_cols`` the key indices."""
    return tl.rand(seed, o_rows + o_cols) >= dropout_p


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(KEEP, seed, dropout_p, T_q, T_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    i_m, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # The counter of (b, h, i, j) is also its index in a contiguous [B, H, Tq, Tk] tensor.
    o_rows = (i_bh.to(tl.int64) * T_q + o_m) * T_k
    b_keep = _dropout_keep(seed, o_rows[:, None], o_n[None, :], dropout_p)
    m = (o_m < T_q)[:, None] & (o_n < T_k)[None, :]
    tl.store(KEEP + o_rows[:, None] + o_n[None, :], b_keep.to(tl.int8), mask=m)


def dropout_mask_triton(seed: int, B: int, H: int, T_q: int, T_k: int, dropout_p: float,
                        device) -> torch.Tensor:
    """The Triton kernels' keep mask as a dense bool ``[B, H, Tq, Tk]``: for tests and
    benchmarks at small sizes only (it is the T×T tensor the kernels never store).

    The varlen kernels' mask of sequence b is ``dropout_mask_triton(seed, 1, H, total_q,
    Tk_max, p)[0, :, cu_q[b]:cu_q[b + 1], :Tk_b]``.
    """
    keep = torch.empty(B, H, T_q, T_k, dtype=torch.int8, device=device)
    if keep.numel() == 0:
        return keep.bool()
    # fwd.py imports this module for _dropout_keep; importing it back at the top would be a cycle.
    from .fwd import device_guard

    # Large tiles: the interpreter pays per program (32 x 32 tiles took 21 s for 1M entries).
    BLOCK_M, BLOCK_N = 64, 128
    with device_guard(keep):
        launch(
            _dropout_mask_kernel, (cdiv(T_q, BLOCK_M), cdiv(T_k, BLOCK_N), B * H),
            keep, seed, dropout_p, T_q, T_k, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return keep.bool()
