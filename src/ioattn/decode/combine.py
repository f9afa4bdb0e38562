"""The combine step of split-KV decoding: merge the splits' partial results by their lse.

The same rule as :func:`ioattn.merge.merge_partials_many` (which ring attention uses on whole
tensors), in one small Triton kernel: in torch it takes about seven elementwise launches, which
at decoding sizes cost more than the merge's few kilobytes of traffic. A program merges one row
(one query of one head) over all splits.

On Hopper and later the combine is a programmatic dependent launch (PDL): the split kernel lets
it launch once every split program has started, and its programs wait in ``gdc_wait`` until the
split kernel's writes are complete and visible, so its launch and start overlap the splits' last
wave instead of following it.
"""
import functools

import torch
import triton
import triton.language as tl

from .. import _env
from .._utils import empty, next_pow2
from ..launch import launch_site
from ..flash.config import padded_head_dim
from ..flash.fwd import device_guard

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older triton: no PDL
    gdc_launch_dependents = gdc_wait = None

# Switched off by tests and the sweep to compare (see use_pdl).
PDL = True


@functools.cache
def _sm90_or_later(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(t: torch.Tensor) -> bool:
    """Whether split kernel and combine on ``t``'s device pair up by programmatic dependent launch:
    compiled (not the interpreter, which has no grid dependency control) on sm_90 or later."""
    return (PDL and gdc_wait is not None and t.is_cuda and not _env.interpret()
            and _sm90_or_later(t.device.index if t.device.index is not None else torch.cuda.current_device()))


@triton.jit
def _combine_kernel(O_PARTS, LSE_PARTS, O, LSE, num_splits, stride_os, stride_ls, T_q, H,
                    stride_ob, stride_ot, stride_oh, D: tl.constexpr, HEAD_DIM: tl.constexpr,
                    SPLITS: tl.constexpr, WAIT_PRIOR: tl.constexpr):
    if WAIT_PRIOR:
        # Launched as a dependent of the split kernel (use_pdl): nothing of its output is read
        # before it has completed.
        gdc_wait()
    # Row r of the partials' [B, Tq, H] layout (contiguous, D innermost for the outputs).
    i_r = tl.program_id(0).to(tl.int64)
    i_h = i_r % H
    i_t = (i_r // H) % T_q
    i_b = i_r // (H * T_q)
    o_s = tl.arange(0, SPLITS)
    o_d = tl.arange(0, HEAD_DIM)
    m_s = o_s < num_splits
    m_d = o_d < D
    b_lse = tl.load(LSE_PARTS + o_s * stride_ls + i_r, mask=m_s, other=float("-inf"))  # [SPLITS]
    m = tl.max(b_lse, 0)
    # Every split empty: the row saw no key (out 0, lse -inf); shift by 0 to avoid -inf - -inf.
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(b_lse - m_shift)  # [SPLITS]
    total = tl.sum(w, 0)
    p_parts = O_PARTS + o_s[:, None].to(tl.int64) * stride_os + i_r * D + o_d[None, :]
    b_o = tl.load(p_parts, mask=m_s[:, None] & m_d[None, :], other=0.0)  # [SPLITS, HEAD_DIM]
    total_safe = tl.where(total == 0.0, 1.0, total)
    acc = tl.sum(w[:, None] * b_o, 0) / total_safe  # [HEAD_DIM]
    lse = tl.where(total == 0.0, float("-inf"), m_shift + tl.log(total_safe))
    tl.store(O + i_b * stride_ob + i_t * stride_ot + i_h * stride_oh + o_d, acc.to(O.dtype.element_ty),
             mask=m_d)
    tl.store(LSE + (i_b * H + i_h) * T_q + i_t, lse)


def combine_splits(out_parts, lse_parts, dtype, *, pdl: bool = False):
    """Merge partials out ``[S, B, Tq, H, D]`` fp32 and lse ``[S, B, Tq, H]`` (both contiguous)
    into out ``[B, Tq, H, D]`` of ``dtype`` and lse fp32 ``[B, H, Tq]``. ``pdl``: launched as a
    programmatic dependent of the kernel that wrote the partials (see :func:`use_pdl`)."""
    S, B, T_q, H, D = out_parts.shape
    out = empty((B, T_q, H, D), dtype=dtype, device=out_parts.device)
    lse = empty((B, H, T_q), dtype=lse_parts.dtype, device=out_parts.device)
    key = ("combine", out_parts.data_ptr(), lse_parts.data_ptr(), out.data_ptr(), lse.data_ptr(), out_parts.shape,
           out_parts.dtype, lse_parts.dtype, dtype, pdl)
    with device_guard(out_parts):
        launch_site(key, lambda: (
            _combine_kernel, (B * T_q * H,),
            (out_parts, lse_parts, out, lse, S, out_parts.stride(0), lse_parts.stride(0), T_q, H,
             out.stride(0), out.stride(1), out.stride(2)),
            dict(D=D, HEAD_DIM=padded_head_dim(D), SPLITS=max(2, next_pow2(S)), WAIT_PRIOR=pdl,
                 num_warps=1 if D <= 64 else 4, **({"launch_pdl": True} if pdl else {}))))
    return out, lse
