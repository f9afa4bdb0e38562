"""The forwards' key loop for Hopper in Gluon, warp-specialized: the loader partition that streams
K and V through a ring of shared-memory slots, and the compute partition (a warpgroup) that
steps over the key blocks with one block's QKᵀ and the block before's P·V in flight while it
runs a softmax (FlashAttention-3's intra-warpgroup overlap), optionally taking turns on the
tensor cores with other warpgroups. fwd_gluon.py's loader-warp kernel runs one compute
partition, fwd_pingpong.py two or three, fwd_persistent.py two per tile of a persistent
program; each owns its ring, Q and epilogue (fwd_gluon.py's pieces). The softmax step is the
one fwd_gluon.py's kernel without a loader warp uses too.

GPU only (Gluon has no interpreter); compiled for sm_90 without a GPU by
tests/flash/gluon_ptxas.py and checked on the H200 by tests/flash/test_fwd_gluon.py.
"""
try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    HAS_GLUON = True
except ImportError:  # older triton: fwd_gluon.HAS_GLUON is False and nothing here runs
    HAS_GLUON = False

if HAS_GLUON:
    from .gluon_exp2 import _exp2


if HAS_GLUON:

    @gluon.jit
    def _softmax_step(s, m_i, l_i, start_n, mask_from, o_m, T_k, diag_hi, qk_scale,
                      HAS_RIGHT: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr,
                      EXP2_EMU: gl.constexpr = 0):
        """Scores ``s`` (raw q·kᵀ) of key block ``start_n`` → (p, new max, alpha, new sum), in the
        log2 domain with the scale folded into one FMA (as fwd_tma.py). Blocks from ``mask_from``
        on hide keys past Tk and, causal, right of the diagonal. ``EXP2_EMU``: gluon_exp2.py's."""
        if start_n >= mask_from:
            o_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            visible = (o_n < T_k)[None, :]
            if HAS_RIGHT:
                visible = visible & (o_n[None, :] <= o_m[:, None] + diag_hi)
            s = gl.where(visible, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        # Rows that have seen no visible key keep m = -inf; shift them by 0 (p = alpha = 0).
        m_shift = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_shift)
        p = _exp2(s * qk_scale - m_shift[:, None], EXP2_EMU)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, m_new, alpha, l_i

    @gluon.jit
    def _take_turn(turn, step, WG: gl.constexpr, PINGPONG: gl.constexpr):
        """Wait until warpgroup ``WG`` may issue the wgmmas of its ``step`` (fwd_pingpong.py's
        turns; nothing without them)."""
        if PINGPONG:
            mbarrier.wait(turn.index(WG), step & 1)

    @gluon.jit
    def _pass_turn(turn, WG: gl.constexpr, PINGPONG: gl.constexpr, NUM_WG: gl.constexpr = 2):
        """Hand the tensor cores to the next of ``NUM_WG`` warpgroups (round robin), once this
        one's wgmmas are issued."""
        if PINGPONG:
            mbarrier.arrive(turn.index((WG + 1) % NUM_WG), count=1)

    @gluon.jit
    def _ws_loader(desc_k, desc_v, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, n_blocks, i_b, i_hkv,
                   BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, c0=0):
        """Loader partition (one warp): streams key blocks [0, n_blocks) into the slot ring, each
        slot refilled once the consumer has released it (its ``*_empty`` barrier). ``c0``: key
        blocks this partition streamed before (a persistent program's earlier tiles), where the
        ring's slot and phase count from."""
        for j in range(n_blocks):
            c = c0 + j
            slot = c % NUM_STAGES
            # Barriers start as if phase 1 had completed: the first pass through the ring waits
            # for nothing.
            phase = ((c // NUM_STAGES) & 1) ^ 1
            mbarrier.wait(k_empty.index(slot), phase)
            mbarrier.expect(k_ready.index(slot), desc_k.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_k, [i_b, i_hkv, j * BLOCK_N, 0], k_ready.index(slot),
                                            k_smem.index(slot))
            mbarrier.wait(v_empty.index(slot), phase)
            mbarrier.expect(v_ready.index(slot), desc_v.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_v, [i_b, i_hkv, j * BLOCK_N, 0], v_ready.index(slot),
                                            v_smem.index(slot))

    @gluon.jit
    def _p_operand(p, dtype: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_WARPS: gl.constexpr, P_EARLY: gl.constexpr):
        """P as the A operand of the P·V wgmma (16-bit, in registers): as is when already cast
        (``P_EARLY``), else cast and laid out now."""
        if P_EARLY:
            return p
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        return gl.convert_layout(p.to(dtype), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))

    @gluon.jit
    def _consumer_step(q, k_tile, v_prev, s_zero, p, acc, m_i, l_i, start_n, o_m, c, t, turn, k_ready, v_ready,
                       k_empty, v_empty, mask_from, T_k, diag_hi, qk_scale, WG: gl.constexpr, PINGPONG: gl.constexpr,
                       NUM_WG: gl.constexpr, HAS_RIGHT: gl.constexpr, WIDTH: gl.constexpr, HEAD_DIM: gl.constexpr,
                       NUM_STAGES: gl.constexpr, NUM_WARPS: gl.constexpr, EXP2_EMU: gl.constexpr,
                       P_EARLY: gl.constexpr):
        """One step of :func:`_ws_consumer`'s loop, in turn ``t``: the scores of key block
        ``start_n`` (ring count ``c``) over ``k_tile`` ([WIDTH, D]: the slot's tile or its first
        half), the block before's P·V over ``v_prev`` while they run, then the block's softmax;
        ``s_zero``, ``m_i``, ``l_i`` and ``o_m`` in the layouts of WIDTH-wide scores. Returns
        (p, acc, m, l)."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                           instr_shape=[16, WIDTH, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        slot = c % NUM_STAGES
        prev = (c - 1) % NUM_STAGES
        _take_turn(turn, t, WG, PINGPONG)
        mbarrier.wait(k_ready.index(slot), phase=(c // NUM_STAGES) & 1)
        s_tok = warpgroup_mma(q, k_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(prev), phase=((c - 1) // NUM_STAGES) & 1)
        p_op = _p_operand(p, q.dtype, HEAD_DIM, NUM_WARPS, P_EARLY)
        o_tok = warpgroup_mma(p_op, v_prev, acc, is_async=True)
        _pass_turn(turn, WG, PINGPONG, NUM_WG)
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(slot), count=1)
        p, m_i, alpha, l_i = _softmax_step(s, m_i, l_i, start_n, mask_from, o_m, T_k, diag_hi, qk_scale, HAS_RIGHT,
                                           WIDTH, s_layout, EXP2_EMU)
        acc, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        if P_EARLY:
            p = gl.convert_layout(p.to(q.dtype), p_layout)
        return p, acc, m_i, l_i

    @gluon.jit
    def _last_pv(p, acc, v_tile, c, t, turn, v_ready, v_empty, WG: gl.constexpr, PINGPONG: gl.constexpr,
                 NUM_WG: gl.constexpr, NUM_STAGES: gl.constexpr, NUM_WARPS: gl.constexpr, HEAD_DIM: gl.constexpr,
                 P_EARLY: gl.constexpr, RELEASE_LAST: gl.constexpr):
        """:func:`_ws_consumer`'s last P·V, in turn ``t``, over ``v_tile`` (the last block's slot,
        ring count ``c``, or its first half); with ``RELEASE_LAST`` the slot is released after."""
        last = c % NUM_STAGES
        _take_turn(turn, t, WG, PINGPONG)
        mbarrier.wait(v_ready.index(last), phase=(c // NUM_STAGES) & 1)
        p_op = _p_operand(p, v_tile.dtype, HEAD_DIM, NUM_WARPS, P_EARLY)
        o_tok = warpgroup_mma(p_op, v_tile, acc, is_async=True)
        _pass_turn(turn, WG, PINGPONG, NUM_WG)
        acc, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
        if RELEASE_LAST:
            # A persistent program's loader refills the last V slot for its next tile.
            mbarrier.arrive(v_empty.index(last), count=1)
        return acc

    @gluon.jit
    def _ws_consumer(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turn, n_blocks, mask_from,
                     start_m, T_k, diag_hi, qk_scale, HAS_RIGHT: gl.constexpr, BLOCK_M: gl.constexpr,
                     BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                     NUM_WARPS: gl.constexpr, WG: gl.constexpr = 0, PINGPONG: gl.constexpr = False,
                     q_phase=0, c0=0, t0=0, RELEASE_LAST: gl.constexpr = False, EXP2_EMU: gl.constexpr = 0,
                     NUM_WG: gl.constexpr = 2, P_EARLY: gl.constexpr = False, HALF_LAST: gl.constexpr = False):
        """Compute partition: _fwd_gluon_kernel's loop, releasing each K slot once its QKᵀ has
        completed and each V slot once its P·V has, instead of loading and syncing itself.
        fwd_pingpong.py runs two or three of these (warpgroup ``WG`` of ``NUM_WG``) with
        ``PINGPONG``: each step's wgmma issues then sit between a wait for this warpgroup's turn
        and a hand-over to the next.
        A persistent program (fwd_persistent.py) runs it once per tile and says where its
        barriers' phases stand: ``q_phase`` of ``q_bar``, ``c0`` key blocks consumed before (the
        ring's slot and phase), ``t0`` turns taken before (fwd_persistent.py's ``turns_taken``), and with
        ``RELEASE_LAST`` gets the last key block's V slot released too (a one-tile program's
        loader never waits for it). ``EXP2_EMU``: :func:`_exp2`'s. ``P_EARLY``: each block's P
        is cast to the wgmma operand (16-bit) as soon as its softmax is done, so that the loop
        carries half the registers for it and the next block's S is not issued beside P in fp32
        (otherwise the cast sits between the S and P·V issues). ``HALF_LAST``: see the loop."""
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        o_m = start_m + gl.arange(0, BLOCK_M, layout=row_s)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=row_s)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        q = q_smem.reshape([BLOCK_M, HEAD_DIM])
        mbarrier.wait(q_bar, phase=q_phase)
        if n_blocks > 0:
            slot = c0 % NUM_STAGES
            _take_turn(turn, t0, WG, PINGPONG)
            mbarrier.wait(k_ready.index(slot), phase=(c0 // NUM_STAGES) & 1)
            s_tok = warpgroup_mma(q, k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                                  use_acc=False, is_async=True)
            _pass_turn(turn, WG, PINGPONG, NUM_WG)
            s = warpgroup_mma_wait(0, deps=(s_tok, ))
            mbarrier.arrive(k_empty.index(slot), count=1)
            p, m_i, alpha, l_i = _softmax_step(s, m_i, l_i, 0, mask_from, o_m, T_k, diag_hi, qk_scale,
                                               HAS_RIGHT, BLOCK_N, s_layout, EXP2_EMU)
            if P_EARLY:
                p = gl.convert_layout(p.to(dtype), p_layout)
            # HALF_LAST: when this warpgroup's rows see only the first half of the last key block
            # (causal: the upper rows of a tile on the diagonal), that block runs as a step of
            # half width: the keys it skips are masked for every row here, so the result is the
            # same, and the diagonal costs one warpgroup half a step less (which shortens a
            # program little: it ends with the other warpgroup, benchmarks/LOG.md v1.25).
            half = False
            n_full = n_blocks
            if HALF_LAST:
                keys_end = T_k
                if HAS_RIGHT:
                    keys_end = gl.minimum(start_m + BLOCK_M + diag_hi, T_k)
                half = (n_blocks > 1) & (keys_end <= (n_blocks - 1) * BLOCK_N + BLOCK_N // 2)
                n_full = n_blocks - half.to(gl.int32)
            for j in range(1, n_full):
                c = c0 + j
                k_tile = k_smem.index(c % NUM_STAGES).reshape([BLOCK_N, HEAD_DIM])
                v_prev = v_smem.index((c - 1) % NUM_STAGES).reshape([BLOCK_N, HEAD_DIM])
                p, acc, m_i, l_i = _consumer_step(q, k_tile, v_prev, s_zero, p, acc, m_i, l_i, j * BLOCK_N, o_m, c,
                                                  t0 + j, turn, k_ready, v_ready, k_empty, v_empty, mask_from, T_k,
                                                  diag_hi, qk_scale, WG, PINGPONG, NUM_WG, HAS_RIGHT, BLOCK_N,
                                                  HEAD_DIM, NUM_STAGES, NUM_WARPS, EXP2_EMU, P_EARLY)
            c = c0 + n_blocks - 1
            last = c % NUM_STAGES
            if half:
                HALF_N: gl.constexpr = BLOCK_N // 2
                s_half: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                                 instr_shape=[16, HALF_N, 16])
                row_h: gl.constexpr = gl.SliceLayout(1, s_half)
                k_half = k_smem.index(last).reshape([BLOCK_N, HEAD_DIM]).slice(0, HALF_N)
                v_before = v_smem.index((c - 1) % NUM_STAGES).reshape([BLOCK_N, HEAD_DIM])
                o_mh = start_m + gl.arange(0, BLOCK_M, layout=row_h)
                p_h, acc, m_h, l_h = _consumer_step(q, k_half, v_before,
                                                    gl.zeros([BLOCK_M, HALF_N], gl.float32, layout=s_half), p,
                                                    acc, gl.convert_layout(m_i, row_h),
                                                    gl.convert_layout(l_i, row_h), (n_blocks - 1) * BLOCK_N, o_mh,
                                                    c, t0 + n_blocks - 1, turn, k_ready, v_ready, k_empty, v_empty,
                                                    mask_from, T_k, diag_hi, qk_scale, WG, PINGPONG, NUM_WG,
                                                    HAS_RIGHT, HALF_N, HEAD_DIM, NUM_STAGES, NUM_WARPS, EXP2_EMU,
                                                    P_EARLY)
                v_half = v_smem.index(last).reshape([BLOCK_N, HEAD_DIM]).slice(0, HALF_N)
                acc = _last_pv(p_h, acc, v_half, c, t0 + n_blocks, turn, v_ready, v_empty, WG, PINGPONG, NUM_WG,
                               NUM_STAGES, NUM_WARPS, HEAD_DIM, P_EARLY, RELEASE_LAST)
                m_i = gl.convert_layout(m_h, row_s)
                l_i = gl.convert_layout(l_h, row_s)
            else:
                v_last = v_smem.index(last).reshape([BLOCK_N, HEAD_DIM])
                acc = _last_pv(p, acc, v_last, c, t0 + n_blocks, turn, v_ready, v_empty, WG, PINGPONG, NUM_WG,
                               NUM_STAGES, NUM_WARPS, HEAD_DIM, P_EARLY, RELEASE_LAST)
        return acc, m_i, l_i
