"""FlashAttention forward for Hopper written in Gluon: the same contract as fwd_tma.py's kernel,
with the tensor-core work scheduled by hand.

Why Gluon: triton's ``tl.dot`` on sm_90 waits for every QKᵀ wgmma right after issuing it
(``wgmma.wait_group 0``, benchmarks/LOG.md v1.9), so the softmax of a key block never overlaps
a matrix multiply and the forward stalls at 0.85-0.9x cuDNN. Here each step issues block j's
QKᵀ and block j-1's P·V asynchronously, waits for the QKᵀ alone (``warpgroup_mma_wait(1)``),
runs block j's softmax while P·V is still on the tensor cores, and only then waits for it and
rescales the accumulator (FlashAttention-3's intra-warpgroup overlap). K and V tiles stream
through rings of shared-memory slots filled by TMA (K's NUM_STAGES deep, V's V_STAGES), each
slot with its own mbarrier; a slot is refilled once every warp is past the matrix multiplies that
read it.

Two kernels: :func:`_fwd_gluon_kernel` refills the slots from the compute warps themselves;
:func:`_fwd_gluon_ws_kernel` gives the loads to one loader warp (warp specialization) with a
ready and an empty mbarrier per slot, so compute warps never wait on a barrier over the whole
program. fwd_pingpong.py's kernel, which runs two of the latter's compute loops side by side,
replaced both in config.py's tables (benchmarks/LOG.md v1.14), except that D = 64 causal
attention below 2048 keys runs the first again, with V's ring shallower than K's and its
registers capped so that four programs share an SM (v1.29). Their pieces are the ping-pong
kernel's: this module's ring, key range and epilogue, and fwd_gluon_loop.py's
warp-specialized key loop.

Layout: BLOCK_M query rows per program, 4 warps (one warpgroup) per 64 rows; the accumulators
use the wgmma (NVMMA v3) register layout, and P goes from the scores' layout to the A-operand
layout of the P·V wgmma without leaving registers. Descriptors are fwd_tma.py's: 4D over the
``[B, H, T, D]`` view with ``[1, 1, BLOCK, D]`` tiles, so rows past T read as zeros and stores
past Tq are dropped, per (batch, head).

GPU only (Gluon has no interpreter); tests/flash/test_fwd_gluon.py compiles it for sm_90
without a GPU and compares it with the reference on the H200.
"""
import functools

import torch

from .._utils import cdiv, empty
from ..launch import launch_site
from .fwd import LOG2E, diag_band, device_guard
from .tma import head_major_desc

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                   warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    HAS_GLUON = True
except ImportError:  # older triton: the Triton TMA kernel runs instead
    HAS_GLUON = False

if HAS_GLUON:
    from .fwd_gluon_loop import _softmax_step, _ws_consumer, _ws_loader

    # Registers per thread of two 4-warp compute partitions and of the loader warp's (padded)
    # warpgroup, in the kernels with two compute warpgroups (fwd_pingpong.py, bwd_gluon.py): 2 x
    # 128 x 240 + 128 x 24 fits the SM's 64K registers with one program per SM.
    COMPUTE_REGS = gl.constexpr(240)
    LOADER_REGS = gl.constexpr(24)


if HAS_GLUON:

    @gluon.jit
    def _issue_tile(desc, smem, bars, j, n_blocks, i_b, i_hkv, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """Start the TMA load of key block ``j`` (if it exists) of one of K or V into slot
        ``j % STAGES`` of its ring."""
        slot = j % STAGES
        pred = j < n_blocks
        mbarrier.expect(bars.index(slot), desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(desc, [i_b, i_hkv, j * BLOCK_N, 0], bars.index(slot), smem.index(slot),
                                        pred=pred)

    @gluon.jit
    def _ring_barriers(NUM_STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
        """The mbarriers of a ring of NUM_STAGES slots holding two tiles each (K and V, or Q and
        dO) filled by a loader partition: (a ready, b ready, a empty, b empty), one per slot,
        ready ones armed by the loader's expect (count 1), empty ones released by each of the
        ``CONSUMERS`` compute partitions. Fenced by the caller."""
        a_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        b_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        a_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        b_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(a_ready.index(i), count=1)
            mbarrier.init(b_ready.index(i), count=1)
            mbarrier.init(a_empty.index(i), count=CONSUMERS)
            mbarrier.init(b_empty.index(i), count=CONSUMERS)
        return a_ready, b_ready, a_empty, b_empty

    @gluon.jit
    def _invalidate_ring(a_ready, b_ready, a_empty, b_empty, NUM_STAGES: gl.constexpr):
        """Retire :func:`_ring_barriers`' barriers once every partition is done with them."""
        for i in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(a_ready.index(i))
            mbarrier.invalidate(b_ready.index(i))
            mbarrier.invalidate(a_empty.index(i))
            mbarrier.invalidate(b_empty.index(i))

    @gluon.jit
    def _key_blocks(start_m, rows, T_q, T_k, diag_hi, HAS_RIGHT: gl.constexpr, BLOCK_N: gl.constexpr):
        """(key blocks to visit, first block that needs a mask) for query rows ``[start_m, +
        rows)``: every row sees keys [0, n_end), and blocks from mask_from on hide keys past Tk
        or, causal, right of the diagonal (fwd.py's _key_range without a left edge)."""
        last_m = gl.minimum(start_m + rows, T_q) - 1
        if HAS_RIGHT:
            n_end = gl.maximum(gl.minimum(last_m + diag_hi + 1, T_k), 0)
            mask_from = gl.maximum(gl.minimum(start_m + diag_hi + 1, T_k), 0) // BLOCK_N * BLOCK_N
        else:
            n_end = T_k
            mask_from = T_k // BLOCK_N * BLOCK_N
        return (n_end + BLOCK_N - 1) // BLOCK_N, mask_from

    @gluon.jit
    def _epilogue(acc, m_i, l_i, o_smem, desc_o, LSE, i_b, i_h, i_bh, start_m, T_q, BLOCK_M: gl.constexpr,
                  HEAD_DIM: gl.constexpr, row_o: gl.constexpr):
        """Rows ``[start_m, + BLOCK_M)`` from the loop's accumulator, max and sum (log2 domain):
        lse stored directly, O through ``o_smem`` (a Q slot no longer read) and one TMA store,
        clipped at Tq. Rows that saw no key have l = 0 (and acc = 0): output 0 and lse -inf, not NaN."""
        l_o = gl.convert_layout(l_i, row_o)
        empty_row = l_o == 0.0
        l_safe = gl.where(empty_row, 1.0, l_o)
        m_o = gl.convert_layout(m_i, row_o)
        lse = gl.where(empty_row, float("-inf"), (m_o + gl.log2(l_safe)) * 0.6931471805599453)
        o_mo = start_m + gl.arange(0, BLOCK_M, layout=row_o)
        gl.store(LSE + i_bh.to(gl.int64) * T_q + o_mo, lse, mask=o_mo < T_q)
        o_smem.reshape([BLOCK_M, HEAD_DIM]).store((acc / l_safe[:, None]).to(o_smem.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(desc_o, [i_b, i_h, start_m, 0], o_smem)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _fwd_gluon_kernel(desc_q, desc_k, desc_v, desc_o, LSE, T_q, T_k, H, GROUP, diag_hi, qk_scale,
                          HEAD_DIM: gl.constexpr, HAS_RIGHT: gl.constexpr, BLOCK_M: gl.constexpr,
                          BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr,
                          V_STAGES: gl.constexpr):
        """K streams through a ring of NUM_STAGES slots, V through one of V_STAGES: block j's V is
        read a step after its K (by the P·V issued beside block j + 1's QKᵀ), so V's ring can be
        shallower than K's for the same lead (TmaFwdConfig.v_stages says why it would be)."""
        dtype: gl.constexpr = desc_q.dtype
        # wgmma layouts: warps stacked along M (16 rows each), instruction N = the tile's width.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

        i_m, i_bh = gl.program_id(0), gl.program_id(1)
        if HAS_RIGHT:
            # Longest causal tiles first (see fwd_tma.py).
            i_m = gl.num_programs(0) - 1 - i_m
        i_b, i_h = i_bh // H, i_bh % H
        i_hkv = i_h // GROUP
        start_m = i_m * BLOCK_M

        n_blocks, mask_from = _key_blocks(start_m, BLOCK_M, T_q, T_k, diag_hi, HAS_RIGHT, BLOCK_N)

        q_smem = gl.allocate_shared_memory(dtype, [1, 1, BLOCK_M, HEAD_DIM], desc_q.layout)
        k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_N, HEAD_DIM], desc_k.layout)
        v_smem = gl.allocate_shared_memory(dtype, [V_STAGES, 1, 1, BLOCK_N, HEAD_DIM], desc_v.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(k_bars.index(i), count=1)
        for i in gl.static_range(V_STAGES):
            mbarrier.init(v_bars.index(i), count=1)
        fence_async_shared()

        mbarrier.expect(q_bar, desc_q.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_q, [i_b, i_h, start_m, 0], q_bar, q_smem)
        for i in gl.static_range(NUM_STAGES):
            _issue_tile(desc_k, k_smem, k_bars, i, n_blocks, i_b, i_hkv, BLOCK_N, NUM_STAGES)
        for i in gl.static_range(V_STAGES):
            _issue_tile(desc_v, v_smem, v_bars, i, n_blocks, i_b, i_hkv, BLOCK_N, V_STAGES)

        o_m = start_m + gl.arange(0, BLOCK_M, layout=row_s)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=row_s)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        q = q_smem.reshape([BLOCK_M, HEAD_DIM])
        mbarrier.wait(q_bar, phase=0)

        if n_blocks > 0:
            # Block 0: its scores alone, nothing to overlap with yet.
            mbarrier.wait(k_bars.index(0), phase=0)
            s_tok = warpgroup_mma(q, k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                                  use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s_tok, ))
            p, m_i, alpha, l_i = _softmax_step(s, m_i, l_i, 0, mask_from, o_m, T_k, diag_hi, qk_scale,
                                               HAS_RIGHT, BLOCK_N, s_layout)
            for j in range(1, n_blocks):
                slot = j % NUM_STAGES
                prev = (j - 1) % V_STAGES
                # Block j's scores, then block j-1's P·V, both in flight.
                mbarrier.wait(k_bars.index(slot), phase=(j // NUM_STAGES) & 1)
                s_tok = warpgroup_mma(q, k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                                      use_acc=False, is_async=True)
                mbarrier.wait(v_bars.index(prev), phase=((j - 1) // V_STAGES) & 1)
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                o_tok = warpgroup_mma(p_op, v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
                # The scores are ready once at most one wgmma (the P·V) is in flight.
                s = warpgroup_mma_wait(1, deps=(s_tok, ))
                p, m_i, alpha, l_i = _softmax_step(s, m_i, l_i, j * BLOCK_N, mask_from, o_m, T_k, diag_hi,
                                                   qk_scale, HAS_RIGHT, BLOCK_N, s_layout)
                acc, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                # Block j - 1's K and V have been read by every warp's wgmmas: refill their slots
                # with blocks j - 1 + NUM_STAGES (K) and j - 1 + V_STAGES (V).
                gl.thread_barrier()
                _issue_tile(desc_k, k_smem, k_bars, j - 1 + NUM_STAGES, n_blocks, i_b, i_hkv, BLOCK_N, NUM_STAGES)
                _issue_tile(desc_v, v_smem, v_bars, j - 1 + V_STAGES, n_blocks, i_b, i_hkv, BLOCK_N, V_STAGES)
            last = (n_blocks - 1) % V_STAGES
            mbarrier.wait(v_bars.index(last), phase=((n_blocks - 1) // V_STAGES) & 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            o_tok = warpgroup_mma(p_op, v_smem.index(last).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
            acc, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))

        mbarrier.invalidate(q_bar)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(k_bars.index(i))
        for i in gl.static_range(V_STAGES):
            mbarrier.invalidate(v_bars.index(i))

        _epilogue(acc, m_i, l_i, q_smem, desc_o, LSE, i_b, i_h, i_bh, start_m, T_q, BLOCK_M, HEAD_DIM, row_o)


if HAS_GLUON:

    @gluon.jit
    def _fwd_gluon_ws_kernel(desc_q, desc_k, desc_v, desc_o, LSE, T_q, T_k, H, GROUP, diag_hi, qk_scale,
                             HEAD_DIM: gl.constexpr, HAS_RIGHT: gl.constexpr, BLOCK_M: gl.constexpr,
                             BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr):
        """:func:`_fwd_gluon_kernel` with warp specialization: one loader warp issues the TMA loads
        of K and V (FlashAttention-3's producer), the ``num_warps`` of the default partition only
        compute, so no load waits on a matrix multiply and no barrier spans the whole program."""
        dtype: gl.constexpr = desc_q.dtype
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        i_m, i_bh = gl.program_id(0), gl.program_id(1)
        if HAS_RIGHT:
            i_m = gl.num_programs(0) - 1 - i_m
        i_b, i_h = i_bh // H, i_bh % H
        i_hkv = i_h // GROUP
        start_m = i_m * BLOCK_M
        n_blocks, mask_from = _key_blocks(start_m, BLOCK_M, T_q, T_k, diag_hi, HAS_RIGHT, BLOCK_N)

        q_smem = gl.allocate_shared_memory(dtype, [1, 1, BLOCK_M, HEAD_DIM], desc_q.layout)
        k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_N, HEAD_DIM], desc_k.layout)
        v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_N, HEAD_DIM], desc_v.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        k_ready, v_ready, k_empty, v_empty = _ring_barriers(NUM_STAGES, 1)
        fence_async_shared()
        mbarrier.expect(q_bar, desc_q.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_q, [i_b, i_h, start_m, 0], q_bar, q_smem)

        acc, m_i, l_i = gl.warp_specialize([
            # No turns (one compute partition): q_bar stands in for the turn barriers.
            (_ws_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, q_bar, n_blocks,
                            mask_from, start_m, T_k, diag_hi, qk_scale, HAS_RIGHT, BLOCK_M, BLOCK_N, HEAD_DIM,
                            NUM_STAGES, num_warps)),
            (_ws_loader, (desc_k, desc_v, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, n_blocks, i_b, i_hkv,
                          BLOCK_N, NUM_STAGES)),
        ], [1], [24])

        mbarrier.invalidate(q_bar)
        _invalidate_ring(k_ready, v_ready, k_empty, v_empty, NUM_STAGES)
        _epilogue(acc, m_i, l_i, q_smem, desc_o, LSE, i_b, i_h, i_bh, start_m, T_q, BLOCK_M, HEAD_DIM, row_o)


def gluon_supported(q) -> bool:
    """Whether the Gluon kernel can run on inputs fwd_tma.py's ``tma_supported`` accepted:
    compiled on a CUDA device (Gluon has no interpreter) by a triton that has it."""
    return HAS_GLUON and q.is_cuda


@functools.cache
def _smem_layout(block: int, head_dim: int, dtype: torch.dtype):
    # Cached: computing the default layout took 6.8 us on a CPU, and a launch needs four.
    gl_dtype = {torch.bfloat16: gl.bfloat16, torch.float32: gl.float32}.get(dtype, gl.float16)
    return gl.NVMMASharedLayout.get_default_for([1, 1, block, head_dim], gl_dtype)


def _desc(x: torch.Tensor, block: int, cols: int = 0):
    """Gluon's 4D descriptor of ``x [B, T, H, D]`` over its ``[B, H, T, D]`` view, ``[1, 1, block,
    D]`` tiles (``[1, 1, block, cols]`` with ``cols``) in the default (widest-swizzle) shared
    layout: :func:`ioattn.flash.tma.head_major_desc` with Gluon's class, filled in without the
    dataclass's checks for the same reason."""
    layout = _smem_layout(block, cols or x.shape[-1], x.dtype)
    return head_major_desc(x, block, desc_type=GluonDescriptor, layout=layout, cols=cols)


def ws_maxnreg(config) -> int:
    """Register cap per thread for the warp-specialized kernel: its warps are the default
    partition's plus a warpgroup for the loader warp, and 64-row tiles should fit two programs
    per SM (their shared memory does), so the cap is what the register file allows for that;
    the compiler then hands the loader 24 and the compute warps the rest."""
    programs_per_sm = 2 if config.BLOCK_M <= 64 else 1
    return min(256, 65536 // (32 * (config.num_warps + 4) * programs_per_sm) // 8 * 8)


def flash_fwd_gluon(q, k, v, softmax_scale: float, causal: bool, diag_offset: int, *, config):
    """Attention forward with a Gluon kernel: :func:`ioattn.flash.fwd_tma.flash_fwd_tma`'s
    arguments and results (fp16/bf16, D in 64/128, TMA-aligned, every feature off); ``config`` a
    :class:`ioattn.flash.config.TmaFwdConfig` (BLOCK_M = 64 per 4 warps); its
    ``warp_specialize`` picks :func:`_fwd_gluon_ws_kernel`."""
    B, T_q, H, D = q.shape
    T_k, H_kv = k.shape[1], k.shape[2]
    band = diag_band(T_q, T_k, causal, diag_offset, (-1, -1))
    out = empty((B, T_q, H, D), dtype=q.dtype, device=q.device)
    lse = empty((B, H, T_q), dtype=torch.float32, device=q.device)
    M, N = config.BLOCK_M, config.BLOCK_N
    grid = (cdiv(T_q, M), B * H)
    if config.v_stages < 0 or config.maxnreg < 0 or (config.warp_specialize and (config.v_stages or config.maxnreg)):
        # The loader-warp kernel sizes its registers itself (ws_maxnreg) and has one ring.
        raise ValueError(f"config: v_stages and maxnreg (>= 0) apply to the kernel without warp_specialize, "
                         f"got {config}")
    if config.warp_specialize:
        kernel, extra = _fwd_gluon_ws_kernel, dict(maxnreg=ws_maxnreg(config))
    else:
        kernel, extra = _fwd_gluon_kernel, dict(V_STAGES=config.v_stages or config.num_stages)
        if config.maxnreg:
            extra["maxnreg"] = config.maxnreg

    def build():
        return (kernel, grid,
                (_desc(q, M), _desc(k, N), _desc(v, N), _desc(out, M), lse, T_q, T_k, H, H // H_kv,
                 band["diag_hi"], softmax_scale * LOG2E),
                dict(HEAD_DIM=D, HAS_RIGHT=band["HAS_RIGHT"], BLOCK_M=M, BLOCK_N=N, NUM_STAGES=config.num_stages,
                     num_warps=config.num_warps, **extra))

    # The table runs this kernel for D = 64 causal below 2048 keys, where a call's host time
    # shows: its launch is kept per call site (launch.py), as the other forwards' are.
    key = ("fwd_gluon", q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), q.shape, k.shape,
           q.stride(), k.stride(), v.stride(), q.dtype, softmax_scale, causal, diag_offset, config)
    with device_guard(q):
        launch_site(key, build)
    return out, lse
