"""The one-pass backward's last step: ``dq = softmax_scale · dq_acc`` in q's dtype.

bwd_fused.py's kernels add dQ into an fp32 buffer (bulk reductions or atomics need it). This
pass reads that buffer once and writes dq: 6 bytes an element at bf16, memory-bound. It was
``torch.mul(dq_acc, scale, out=dq)``, which takes torch's element-wise path for mixed dtypes
(one element at a time per thread, no vector loads) and ran 66 µs on the paper grid's D = 128
calls (33.5 M elements, 3.0 TB/s) on the H200, where cuDNN's own dQ conversion took 56 µs
(benchmarks/LOG.md v1.27). Here each program moves BLOCK contiguous elements with 16-byte loads.

Flat and contiguous on both sides (the caller's buffers are), so the kernel knows no shapes.
"""
import triton
import triton.language as tl

from .._utils import cdiv
from ..launch import launch_site

# Elements a program converts, and its warps: 32 elements a thread, eight 16-byte loads.
BLOCK = 4096
NUM_WARPS = 4


@triton.jit
def _dq_cast_kernel(DQ_ACC, DQ, scale, N, BLOCK: tl.constexpr):
    # int64 offsets: dq of a long batch can pass 2^31 elements.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    # The buffer is read once and dropped: keep L2 for what the caller runs next.
    x = tl.load(DQ_ACC + offs, mask=mask, eviction_policy="evict_first")
    tl.store(DQ + offs, (x * scale).to(DQ.dtype.element_ty), mask=mask)


def dq_cast(dq_acc, dq, softmax_scale: float) -> None:
    """Write ``dq = softmax_scale · dq_acc`` rounded to dq's dtype. Both contiguous, same number of
    elements (dq_acc fp32); launched on the current device (the caller's guard)."""
    n = dq.numel()
    if not (dq_acc.is_contiguous() and dq.is_contiguous()) or dq_acc.numel() != n:
        raise ValueError("dq_acc, dq: must be contiguous with the same number of elements")
    if n == 0:
        return
    scale = float(softmax_scale)
    launch_site(("dq_cast", dq_acc.data_ptr(), dq.data_ptr(), n, dq_acc.dtype, dq.dtype, scale, BLOCK, NUM_WARPS),
                lambda: (_dq_cast_kernel, (cdiv(n, BLOCK),), (dq_acc, dq, scale, n),
                         dict(BLOCK=BLOCK, num_warps=NUM_WARPS)))
