"""FlashAttention-2 backward for Hopper in one pass over the scores: dQ added with atomics.

The two-pass backward (bwd_tma.py) is deterministic but recomputes ``S = q·kᵀ`` and
``dP = dO·vᵀ`` in both of its passes: seven matmuls where the math needs five. Here one launch of
bwd_tma.py's dK/dV kernel (a program holds BLOCK_N keys of one KV head and visits the query
blocks that see them) does it all, with ``ADD_DQ``: from each block's ``dS`` it also forms that
block's share of dQ, ``dS·k`` (or its transpose ``kᵀ·dSᵀ``, ``FusedBwdConfig.dq_t``, which Triton
compiles without moving dSᵀ through shared memory first), and adds it into an fp32 buffer that
every key block of the head adds into. The order of those adds varies from run to run, so dQ is
not bit-reproducible (flash-attn's ``deterministic=False``); dK and dV are, and
``deterministic=True`` keeps the two-pass kernels.

Two more launches than the kernel itself: bwd_preprocess.py writes ``delta = rowsum(dO ∘ O)`` (the
dQ pass computed it in the two-pass backward) and zeroes the fp32 buffer, and bwd_dq_cast.py
scales and casts the buffer into dq at the end. On short sequences that host time is a large share of the
call, which is why config.py chooses per sequence length.

How dQ is added (``FusedBwdConfig.tma_reduce``): element-wise ``tl.atomic_add`` runs everywhere,
Triton's interpreter included; the copy engine's bulk reduction (``desc.atomic_add``,
``cp.reduce.async.bulk.tensor`` on sm_90) adds a whole tile per instruction but has no
interpreter path, so only GPU tests cover it.
"""
import dataclasses

import torch

from .. import _env
from .._utils import empty
from . import bwd_gluon, bwd_gluon_rows
from .bwd import backward_buffers
from .bwd_dq_cast import dq_cast
from .bwd_preprocess import bwd_preprocess
from .bwd_tma import dkdv_launch, hopper_bwd_inputs
from .config import FusedBwdConfig
from .fwd import device_guard


def fused_pass(q, k, v, dout, lse, delta, dk, dv, dq_acc, softmax_scale: float, causal: bool, diag_offset: int,
               config: FusedBwdConfig):
    """Launch the kernel alone: writes ``dk``, ``dv`` and adds ``dS·k`` (not yet scaled) into
    ``dq_acc``, fp32 with q's shape, which must hold zeros (or what to add to). ``config.gluon``
    runs bwd_gluon.py's kernel (with ``config.rows`` bwd_gluon_rows.py's) where it can run
    (IOATTN_GLUON=0, CPU tensors or fp32 run the Triton kernel with the same tiles)."""
    if config.gluon and _env.gluon() and bwd_gluon.gluon_dkdv_supported(q):
        launcher = bwd_gluon_rows.fused_gluon_rows if config.rows else bwd_gluon.fused_gluon
        launcher(q, k, v, dout, lse, delta, dk, dv, dq_acc, softmax_scale, causal, diag_offset, config)
        return
    dkdv_launch(q, k, v, dout, lse, delta, dk, dv, softmax_scale, causal, diag_offset, config.BLOCK_M,
                config.BLOCK_N, config.num_warps, config.num_stages, config.device_desc, dq_acc, config.tma_reduce,
                config.dq_t)


def flash_bwd_fused(dout, q, k, v, out, lse, softmax_scale: float, causal: bool, diag_offset: int, *,
                    config: FusedBwdConfig):
    """Attention backward in one pass with dQ added atomically: :func:`ioattn.flash.bwd_tma.flash_bwd_tma`'s
    contract and inputs (every feature off, Hopper or the interpreter), except that dq's last bits
    may differ between runs.

    With GQA and ``config.expand_kv`` it runs over K and V repeated to the query heads
    (:func:`_expanded`).

    Returns:
        ``(dq, dk, dv)``, contiguous, with the shapes and dtypes of q, k, v.
    """
    group = q.shape[2] // k.shape[2]
    if config.expand_kv and group > 1:
        return _expanded(dout, q, k, v, out, lse, softmax_scale, causal, diag_offset, config, group)
    return _one_pass(dout, q, k, v, out, lse, softmax_scale, causal, diag_offset, config)


def _one_pass(dout, q, k, v, out, lse, softmax_scale: float, causal: bool, diag_offset: int,
              config: FusedBwdConfig):
    """:func:`flash_bwd_fused` on the heads as given. dq, dk and dv are allocated apart: views
    of one allocation would save two allocations, but the custom op that returns them under
    torch.compile (ops.flash_bwd) may not return outputs that alias each other."""
    dout, out, lse = hopper_bwd_inputs(dout, q, out, lse)
    # Linear in T, like everything else: one fp32 copy of dq's shape, zeroed by the preprocess.
    dq_acc = empty(q.shape, dtype=torch.float32, device=q.device)
    delta, dq, dk, dv = backward_buffers(q, k, v)
    with device_guard(q):
        bwd_preprocess(out, dout, delta, q.shape[-1], dq_acc=dq_acc)
        fused_pass(q, k, v, dout, lse, delta, dk, dv, dq_acc, softmax_scale, causal, diag_offset, config)
        # The scale dK takes at the end in the kernel, dQ takes here, in the cast to q's dtype.
        dq_cast(dq_acc, dq, softmax_scale)
    return dq, dk, dv


def _expanded(dout, q, k, v, out, lse, softmax_scale, causal, diag_offset, config, group: int):
    """GQA through the MHA kernel (``config.expand_kv``): K and V repeated to the query heads
    (head h reads KV head h // group, as the kernels do), one program per query head's keys
    instead of one that walks the whole group (bwd_gluon_rows.py's programs are per KV head:
    with 8 query heads to a KV head that made 512 long programs at T = 8192, config.py), then dK
    and dV summed over each group, accumulated in fp32 by torch's reduction and rounded once.
    The copies are linear in T: K and V and their gradients at the query heads' count."""
    k_x, v_x = (x.repeat_interleave(group, dim=2) for x in (k, v))
    dq, dk_x, dv_x = _one_pass(dout, q, k_x, v_x, out, lse, softmax_scale, causal, diag_offset,
                               dataclasses.replace(config, expand_kv=False))
    B, T_k, H_kv, D = k.shape
    return dq, dk_x.view(B, T_k, H_kv, group, D).sum(3), dv_x.view(B, T_k, H_kv, group, D).sum(3)
