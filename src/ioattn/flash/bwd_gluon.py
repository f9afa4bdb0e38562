"""The dK/dV pass of the Hopper backward written in Gluon: bwd_tma.py's dK/dV kernel with its
matrix multiplies issued asynchronously by two warpgroups that share every Q and dO tile.

Why: triton's ``tl.dot`` waits for each wgmma right after issuing it, so the dK/dV kernel
(four matrix multiplies per query block, and the exponentials between them) leaves the tensor
cores idle while its warps compute P and dS: at D = 128 it ran at 568 TFLOP/s-equivalent where
the dQ pass ran 652 (config.py). Here a program holds 128 keys of one KV head in two
warpgroups of 64 (fwd_pingpong.py's layout turned around: K and V stay, Q and dO stream), and
a loader warp streams the query blocks' Q and dO tiles through a ring of shared-memory slots
(released when both warpgroups are done with them, count 2). Per query block each warpgroup
issues Sᵀ = k·qᵀ and dPᵀ = v·dOᵀ together, forms Pᵀ and dSᵀ in registers while matrix
multiplies run (:func:`_dkdv_consumer` has the two schedules), and issues dV += Pᵀ·dO and
dK += dSᵀ·q; the other warpgroup's exponentials fill the tensor cores' remaining gaps.

The math is bwd_tma.py's: ``Pᵀ = exp2(k·qᵀ · qk_scale − lse · log2 e)``, ``dSᵀ = Pᵀ ∘ (dPᵀ − Δ)``,
dK scaled by the softmax scale on store; rows past Tq read q = dO = 0 and lse = +inf (P = 0),
keys past Tk are dropped by the stores' bounds. For GQA the program visits, head after head,
the query blocks of every query head that reads its KV head, in one sequence of steps that the
loader and both warpgroups walk alike. Δ comes from the dQ pass (launched first, as in
bwd_tma.py).

``ADD_DQ`` makes the same kernel a one-pass backward (bwd_fused.py launches it through
:func:`fused_gluon`): each step's dSᵀ goes through shared memory to both warpgroups, and each
forms half of dQ's columns over all 128 keys and adds it into an fp32 buffer: with element-wise
atomics (measured slower than the two-pass backward at D = 128, benchmarks/LOG.md v1.15: the
adds' 17 GB at T = 16384 went at ~1.3 TB/s and held the compute warps) or, with ``DQ_TMA``,
through a staging buffer in shared memory and the copy engine's bulk reduction, which the
warpgroup does not wait for. config.py's GLUON_FUSED_BWD says where it runs.

GPU only (Gluon has no interpreter): tests/flash/test_fwd_gluon.py's compile test builds it for
sm_90 without a GPU; tests/flash/test_bwd_gluon.py compares it with the reference on the H200.
"""
import torch

from .._utils import cdiv
from ..launch import launch_site
from .fwd import LOG2E, diag_band, device_guard
from .fwd_gluon import HAS_GLUON

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                   warpgroup_mma, warpgroup_mma_wait)

    from .bwd_gluon_program import (_alloc_tiles, _dq_barriers, _invalidate_dq_barriers, _load_kv, _program_keys,
                                    _store_dkdv)
    from .fwd_gluon import COMPUTE_REGS, LOADER_REGS, _desc, _invalidate_ring, _ring_barriers
    from .gluon_reduce import tma_reduce_add


if HAS_GLUON:

    @gluon.jit
    def _dkdv_loader(desc_q, desc_do, q_smem, do_smem, q_ready, do_ready, q_empty, do_empty, i_b, i_hkv, GROUP,
                     m_lo, n_m, BLOCK_M: gl.constexpr, NUM_STAGES: gl.constexpr):
        """Loader partition (one warp): Q and dO tiles of steps ``[0, GROUP * n_m)`` (head
        ``i_hkv * GROUP + t // n_m``, rows ``m_lo + (t % n_m) * BLOCK_M``) into the slot ring."""
        for t in range(GROUP * n_m):
            slot = t % NUM_STAGES
            g = t // n_m
            i_h = i_hkv * GROUP + g
            start_m = m_lo + (t - g * n_m) * BLOCK_M
            # Barriers start as if phase 1 had completed: the first pass waits for nothing.
            phase = ((t // NUM_STAGES) & 1) ^ 1
            mbarrier.wait(q_empty.index(slot), phase)
            mbarrier.expect(q_ready.index(slot), desc_q.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_q, [i_b, i_h, start_m, 0], q_ready.index(slot), q_smem.index(slot))
            mbarrier.wait(do_empty.index(slot), phase)
            mbarrier.expect(do_ready.index(slot), desc_do.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_do, [i_b, i_h, start_m, 0], do_ready.index(slot),
                                            do_smem.index(slot))

    @gluon.jit
    def _row_stats(LSE, DELTA, i_b, H, i_h, T_q, o_m):
        """lse (log2 domain) and Δ of query rows ``o_m`` of head ``i_h`` ([B, H, Tq], contiguous).
        Rows past Tq, and rows that saw no key (lse -inf), get lse +inf: P = 0 for them."""
        row0 = (i_b * H + i_h).to(gl.int64) * T_q
        m_m = o_m < T_q
        lse = gl.load(LSE + row0 + o_m, mask=m_m, other=float("inf"))
        lse2 = gl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        return lse2, gl.load(DELTA + row0 + o_m, mask=m_m, other=0.0)

    @gluon.jit
    def _issue_scores(k, v, q_smem, do_smem, q_ready, do_ready, s_zero, LSE, DELTA, i_b, H, i_hkv, GROUP, T_q, m_lo,
                      n_m, o_m0, t, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr):
        """Step ``t``'s rows and their lse and Δ (loaded before the waits, to overlap), then, once
        its slot is filled, Sᵀ = k·qᵀ and dPᵀ = v·dOᵀ issued: (start_m, o_m, lse2, delta, q tile,
        dO tile, Sᵀ token, dPᵀ token)."""
        slot = t % NUM_STAGES
        phase = (t // NUM_STAGES) & 1
        g = t // n_m
        start_m = m_lo + (t - g * n_m) * BLOCK_M
        o_m = start_m + o_m0
        lse2, delta = _row_stats(LSE, DELTA, i_b, H, i_hkv * GROUP + g, T_q, o_m)
        q_t = q_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
        do_t = do_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
        mbarrier.wait(q_ready.index(slot), phase)
        s_tok = warpgroup_mma(k, q_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(do_ready.index(slot), phase)
        dp_tok = warpgroup_mma(v, do_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        return start_m, o_m, lse2, delta, q_t, do_t, s_tok, dp_tok

    @gluon.jit
    def _p(s_t, lse2, o_n, o_m, start_m, m_full_lo, diag_hi, qk_scale, HAS_RIGHT: gl.constexpr):
        """Pᵀ ([keys, rows], fp32) from Sᵀ = k·qᵀ; blocks below ``m_full_lo`` hide keys right of
        the diagonal."""
        p_t = gl.exp2(s_t * qk_scale - lse2[None, :])
        if HAS_RIGHT:
            if start_m < m_full_lo:
                p_t = gl.where(o_n[:, None] <= o_m[None, :] + diag_hi, p_t, 0.0)
        return p_t

    @gluon.jit
    def _share_ds(ds_t, ds_smem, ds_bar, t, WG: gl.constexpr):
        """Hand this warpgroup's dSᵀ of step ``t`` to both warpgroups' dQ: into its half of the
        step's buffer (two, alternating), then an arrival on that buffer's barrier (count 2)."""
        buf = t % 2
        ds_smem.index(buf * 2 + WG).store(ds_t)
        fence_async_shared()
        mbarrier.arrive(ds_bar.index(buf), count=1)

    @gluon.constexpr_function
    def _dq_layout(HEAD_DIM):
        """dQ's half-width accumulator: [query rows, HEAD_DIM / 2], warps stacked along the rows."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM // 2, 16])

    @gluon.jit
    def _issue_dq(ds_smem, ds_bar, k_smem, t, WG: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  HEAD_DIM: gl.constexpr):
        """Once both halves of step ``t``'s dSᵀ are in, issue this warpgroup's half of the step's
        dQ share: dS·k over all 2 * BLOCK_N keys of the program, columns ``WG * HEAD_DIM / 2``
        on. Each warpgroup thus reads the other's dSᵀ and both K tiles, and holds a [BLOCK_M,
        HEAD_DIM / 2] accumulator where a full one would not fit beside dK and dV.

        A buffer is rewritten two steps later, which is safe without a second barrier: before
        that, its writer waited at step ``t + 1`` for the other warpgroup's arrival, which that
        warpgroup makes only after its step-``t`` dQ wgmmas completed."""
        HALF: gl.constexpr = HEAD_DIM // 2
        buf = t % 2
        mbarrier.wait(ds_bar.index(buf), (t // 2) & 1)
        dq = gl.zeros([BLOCK_M, HALF], gl.float32, layout=_dq_layout(HEAD_DIM))
        for w in gl.static_range(2):
            # dS = (dSᵀ)ᵀ read transposed from shared memory; k's columns of this half.
            ds = ds_smem.index(buf * 2 + w).permute((1, 0))
            k_half = k_smem.index(w).reshape([BLOCK_N, HEAD_DIM]).slice(WG * HALF, HALF, dim=1)
            dq = warpgroup_mma(ds, k_half, dq, use_acc=w > 0, is_async=True)
        return dq

    @gluon.jit
    def _atomic_dq(dq, DQ, i_b, i_h, H, T_q, start_m, WG: gl.constexpr, BLOCK_M: gl.constexpr,
                   HEAD_DIM: gl.constexpr):
        """Add a finished half of a dQ share into the fp32 buffer DQ (q's shape, contiguous)."""
        dq_layout: gl.constexpr = _dq_layout(HEAD_DIM)
        rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_layout))
        cols = WG * (HEAD_DIM // 2) + gl.arange(0, HEAD_DIM // 2, layout=gl.SliceLayout(0, dq_layout))
        offs = ((i_b * T_q + rows).to(gl.int64) * H + i_h) * HEAD_DIM
        gl.atomic_add(DQ + offs[:, None] + cols[None, :], dq, mask=(rows < T_q)[:, None], sem="relaxed")

    @gluon.jit
    def _reduce_dq(dq, dq_smem, desc_dq, i_b, i_h, row0, col0, WG: gl.constexpr):
        """:func:`_atomic_dq` by the copy engine: this warpgroup's share ``dq`` (DQ's block, its
        first element at query row ``row0``, column ``col0``) goes into the warpgroup's staging
        buffer and one bulk reduction (``cp.reduce.async.bulk.tensor .add``) adds it into DQ,
        rows past Tq clipped by the descriptor's bounds. The warpgroup does not wait for the add:
        the wait at its next step (before it rewrites the buffer) finds it done unless the
        reductions fall behind. A thread thus writes 16 shared-memory stores a step where it
        issued 16 global atomics, which at T = 16384 held the step for 4 ms of 13 (LOG v1.15)."""
        buf = dq_smem.index(WG)
        tma.store_wait(pendings=0)
        buf.reshape([dq.shape[0], dq.shape[1]]).store(dq)
        fence_async_shared()
        tma_reduce_add(desc_dq, [i_b, i_h, row0, col0], buf)

    @gluon.jit
    def _release_slot(q_empty, do_empty, slot):
        """Both warpgroups must be done with a Q/dO slot before the loader refills it (count 2)."""
        mbarrier.arrive(q_empty.index(slot), count=1)
        mbarrier.arrive(do_empty.index(slot), count=1)

    @gluon.constexpr_function
    def _acc_layout(HEAD_DIM):
        """dK's and dV's accumulators: [keys, HEAD_DIM], warps stacked along the keys."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])

    @gluon.jit
    def _plain_step(k, v, k_smem, q_smem, do_smem, q_ready, do_ready, q_empty, do_empty, s_zero, LSE, DELTA, i_b, H,
                    i_hkv, GROUP, T_q, m_lo, n_m, o_m0, o_n, m_full_lo, diag_hi, qk_scale, ds_smem, ds_bar, DQ, dq_smem,
                    dk, dv, t, MASKED: gl.constexpr, WG: gl.constexpr, ADD_DQ: gl.constexpr, DQ_EARLY: gl.constexpr,
                    DQ_TMA: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                    NUM_STAGES: gl.constexpr):
        """Step ``t`` of :func:`_dkdv_consumer`'s plain schedule, the causal mask applied iff
        ``MASKED`` and the step's block holds the diagonal: returns the updated (dK, dV)."""
        dtype: gl.constexpr = q_smem.dtype
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=_acc_layout(HEAD_DIM), k_width=2)
        slot = t % NUM_STAGES
        start_m, o_m, lse2, delta, q_t, do_t, s_tok, dp_tok = _issue_scores(
            k, v, q_smem, do_smem, q_ready, do_ready, s_zero, LSE, DELTA, i_b, H, i_hkv, GROUP, T_q, m_lo, n_m, o_m0,
            t, BLOCK_M, HEAD_DIM, NUM_STAGES)
        # Pᵀ while dPᵀ is still on the tensor cores, then dSᵀ while dV += Pᵀ·dO is.
        s_t = warpgroup_mma_wait(1, deps=(s_tok, ))
        p_t = _p(s_t, lse2, o_n, o_m, start_m, m_full_lo, diag_hi, qk_scale, MASKED)
        p_op = gl.convert_layout(p_t.to(dtype), a_layout)
        dv_tok = warpgroup_mma(p_op, do_t, dv, is_async=True)
        dp_t = warpgroup_mma_wait(1, deps=(dp_tok, ))
        ds_t = (p_t * (dp_t - delta[None, :])).to(dtype)
        ds_op = gl.convert_layout(ds_t, a_layout)
        dk_tok = warpgroup_mma(ds_op, q_t, dk, is_async=True)
        if ADD_DQ:
            _share_ds(ds_t, ds_smem, ds_bar, t, WG)
        if ADD_DQ and DQ_EARLY:
            # dQ queued behind dV and dK: one wait for the three.
            dq_tok = _issue_dq(ds_smem, ds_bar, k_smem, t, WG, BLOCK_M, BLOCK_N, HEAD_DIM)
            dv, dk, dq, p_op, ds_op = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, dq_tok, p_op, ds_op))
        else:
            dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, p_op, ds_op))
        _release_slot(q_empty, do_empty, slot)
        if ADD_DQ:
            if not DQ_EARLY:
                dq_tok = _issue_dq(ds_smem, ds_bar, k_smem, t, WG, BLOCK_M, BLOCK_N, HEAD_DIM)
                dq = warpgroup_mma_wait(0, deps=(dq_tok, ))
            if DQ_TMA:
                _reduce_dq(dq, dq_smem, DQ, i_b, i_hkv * GROUP + t // n_m, start_m, WG * (HEAD_DIM // 2), WG)
            else:
                _atomic_dq(dq, DQ, i_b, i_hkv * GROUP + t // n_m, H, T_q, start_m, WG, BLOCK_M, HEAD_DIM)
        return dk, dv

    @gluon.jit
    def _dkdv_consumer(k_smem, v_smem, kv_bar, q_smem, do_smem, q_ready, do_ready, q_empty, do_empty, desc_dk,
                       desc_dv, LSE, DELTA, i_b, i_hkv, start_n, H, GROUP, T_q, m_lo, n_m, m_full_lo, diag_hi,
                       qk_scale, softmax_scale, ds_smem, ds_bar, out_bar, DQ, dq_smem, WG: gl.constexpr,
                       HAS_RIGHT: gl.constexpr, OVERLAP: gl.constexpr, ADD_DQ: gl.constexpr, DQ_EARLY: gl.constexpr,
                       DQ_TMA: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                       NUM_STAGES: gl.constexpr):
        """One compute warpgroup: dK, dV of keys ``[start_n + WG * BLOCK_N, + BLOCK_N)`` over every
        step, then their stores (through this warpgroup's K and V slots, no longer read).

        Per step, without ``OVERLAP``: issue Sᵀ and dPᵀ; Pᵀ once Sᵀ is done (dPᵀ running);
        issue dV += Pᵀ·dO; dSᵀ once dPᵀ is done (dV running); issue dK += dSᵀ·q; wait for all.
        With ``OVERLAP`` the step's dV and dK are issued at the next step, right after its Sᵀ
        and dPᵀ, so they run while that step's Pᵀ and dSᵀ are formed, and the wait at the end
        of a step has little left to wait for (a slot is released one step later; Pᵀ and dSᵀ
        stay in registers one step longer).

        With ``ADD_DQ`` (plain schedule only) each step also shares its dSᵀ (:func:`_share_ds`)
        and adds its half of the step's dQ (:func:`_issue_dq`, then :func:`_atomic_dq` or with
        ``DQ_TMA`` :func:`_reduce_dq`): issued once dV and dK are done, or with ``DQ_EARLY`` right
        behind them, waited for with them."""
        dtype: gl.constexpr = q_smem.dtype
        # Sᵀ, dPᵀ: [keys, query rows]; dK, dV: [keys, HEAD_DIM]; warps stacked along the keys.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_M, 16])
        acc_layout: gl.constexpr = _acc_layout(HEAD_DIM)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        o_n = start_n + WG * BLOCK_N + gl.arange(0, BLOCK_N, layout=row_s)
        o_m0 = gl.arange(0, BLOCK_M, layout=col_s)
        k = k_smem.index(WG).reshape([BLOCK_N, HEAD_DIM])
        v = v_smem.index(WG).reshape([BLOCK_N, HEAD_DIM])
        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)
        dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)
        s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=s_layout)
        mbarrier.wait(kv_bar, phase=0)
        n_steps = GROUP * n_m
        if OVERLAP:
            if n_steps > 0:
                # Step 0: its Pᵀ and dSᵀ only; its dV and dK go out with step 1's matrix multiplies.
                start_m, o_m, lse2, delta, q_t, do_t, s_tok, dp_tok = _issue_scores(
                    k, v, q_smem, do_smem, q_ready, do_ready, s_zero, LSE, DELTA, i_b, H, i_hkv, GROUP, T_q, m_lo, n_m,
                    o_m0, 0, BLOCK_M, HEAD_DIM, NUM_STAGES)
                s_t, dp_t = warpgroup_mma_wait(0, deps=(s_tok, dp_tok))
                p_t = _p(s_t, lse2, o_n, o_m, start_m, m_full_lo, diag_hi, qk_scale, HAS_RIGHT)
                p_op = gl.convert_layout(p_t.to(dtype), a_layout)
                ds_op = gl.convert_layout((p_t * (dp_t - delta[None, :])).to(dtype), a_layout)
                for t in range(1, n_steps):
                    prev = (t - 1) % NUM_STAGES
                    start_m, o_m, lse2, delta, q_t, do_t, s_tok, dp_tok = _issue_scores(
                        k, v, q_smem, do_smem, q_ready, do_ready, s_zero, LSE, DELTA, i_b, H, i_hkv, GROUP, T_q, m_lo,
                        n_m, o_m0, t, BLOCK_M, HEAD_DIM, NUM_STAGES)
                    dv_tok = warpgroup_mma(p_op, do_smem.index(prev).reshape([BLOCK_M, HEAD_DIM]), dv, is_async=True)
                    dk_tok = warpgroup_mma(ds_op, q_smem.index(prev).reshape([BLOCK_M, HEAD_DIM]), dk, is_async=True)
                    # In flight, in issue order: Sᵀ, dPᵀ, dV, dK.
                    s_t = warpgroup_mma_wait(3, deps=(s_tok, ))
                    p_t = _p(s_t, lse2, o_n, o_m, start_m, m_full_lo, diag_hi, qk_scale, HAS_RIGHT)
                    dp_t = warpgroup_mma_wait(2, deps=(dp_tok, ))
                    ds_t = p_t * (dp_t - delta[None, :])
                    dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, p_op, ds_op))
                    mbarrier.arrive(q_empty.index(prev), count=1)
                    mbarrier.arrive(do_empty.index(prev), count=1)
                    p_op = gl.convert_layout(p_t.to(dtype), a_layout)
                    ds_op = gl.convert_layout(ds_t.to(dtype), a_layout)
                last = (n_steps - 1) % NUM_STAGES
                dv_tok = warpgroup_mma(p_op, do_smem.index(last).reshape([BLOCK_M, HEAD_DIM]), dv, is_async=True)
                dk_tok = warpgroup_mma(ds_op, q_smem.index(last).reshape([BLOCK_M, HEAD_DIM]), dk, is_async=True)
                dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, p_op, ds_op))
        else:
            # One loop; causal steps test at run time whether their block holds the diagonal. (Two
            # loops, the diagonal's steps apart, spilled less and ran 1.19-1.29x slower at D = 128:
            # benchmarks/LOG.md v1.19; bwd_gluon_rows.py's kernel too, and the option was removed.)
            for t in range(n_steps):
                dk, dv = _plain_step(
                    k, v, k_smem, q_smem, do_smem, q_ready, do_ready, q_empty, do_empty, s_zero, LSE, DELTA, i_b, H,
                    i_hkv, GROUP, T_q, m_lo, n_m, o_m0, o_n, m_full_lo, diag_hi, qk_scale, ds_smem, ds_bar, DQ, dq_smem,
                    dk, dv, t, HAS_RIGHT, WG, ADD_DQ, DQ_EARLY, DQ_TMA, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES)
        if ADD_DQ:
            # The other warpgroup's dQ reads this one's K slot until its last step: wait for it.
            # (A last bulk reduction of dQ may still be in flight: the store_wait below covers it.)
            mbarrier.arrive(out_bar, count=1)
            mbarrier.wait(out_bar, phase=0)
        # Every wgmma reading K and V has completed: their slots take dK and dV on the way out.
        _store_dkdv(dk, dv, k_smem, v_smem, desc_dk, desc_dv, i_b, i_hkv, start_n, softmax_scale, WG, BLOCK_N,
                    HEAD_DIM)

    @gluon.jit
    def _bwd_dkdv_gluon_kernel(desc_q, desc_k, desc_v, desc_do, LSE, DELTA, desc_dk, desc_dv, DQ, T_q, T_k, H,
                               H_kv, GROUP, softmax_scale, qk_scale, diag_hi, HAS_RIGHT: gl.constexpr,
                               OVERLAP: gl.constexpr, ADD_DQ: gl.constexpr, DQ_EARLY: gl.constexpr,
                               DQ_TMA: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                               BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):
        """One program: 2 * BLOCK_N keys of one (batch, KV head) in two warpgroups of BLOCK_N keys
        (launched with num_warps=4: the default partition is warpgroup 0); with ``ADD_DQ`` it
        also adds every step's dS·k into DQ: a pointer to fp32, or with ``DQ_TMA`` a descriptor of
        it with [1, 1, BLOCK_M, HEAD_DIM / 2] tiles."""
        dtype: gl.constexpr = desc_q.dtype
        i_b, i_hkv, start_n, m_lo, n_m, m_full_lo = _program_keys(T_q, T_k, H_kv, diag_hi, HAS_RIGHT, BLOCK_M,
                                                                  BLOCK_N)

        k_smem, v_smem, q_smem, do_smem, kv_bar = _alloc_tiles(desc_q, desc_k, desc_v, desc_do, BLOCK_M, BLOCK_N,
                                                               HEAD_DIM, NUM_STAGES)
        # Slots released by both warpgroups.
        q_ready, do_ready, q_empty, do_empty = _ring_barriers(NUM_STAGES, 2)
        if ADD_DQ:
            # dSᵀ of two steps, [buffer * 2 + warpgroup]; a barrier per buffer (both halves
            # written) and one for the end (both warpgroups' last dQ read K).
            ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
            ds_smem = gl.allocate_shared_memory(dtype, [4, BLOCK_N, BLOCK_M], ds_layout)
            ds_bar, out_bar = _dq_barriers()
            if DQ_TMA:
                # A staging buffer per warpgroup for its half of each step's dQ.
                dq_smem = gl.allocate_shared_memory(gl.float32, [2, 1, 1, BLOCK_M, HEAD_DIM // 2], DQ.layout)
            else:
                dq_smem = kv_bar  # never touched
        else:
            ds_smem, ds_bar, out_bar, dq_smem = kv_bar, kv_bar, kv_bar, kv_bar  # never touched
        fence_async_shared()
        _load_kv(desc_k, desc_v, k_smem, v_smem, kv_bar, i_b, i_hkv, start_n, BLOCK_N)

        gl.warp_specialize([
            (_dkdv_consumer, (k_smem, v_smem, kv_bar, q_smem, do_smem, q_ready, do_ready, q_empty, do_empty, desc_dk,
                              desc_dv, LSE, DELTA, i_b, i_hkv, start_n, H, GROUP, T_q, m_lo, n_m, m_full_lo, diag_hi,
                              qk_scale, softmax_scale, ds_smem, ds_bar, out_bar, DQ, dq_smem, 0, HAS_RIGHT, OVERLAP,
                              ADD_DQ, DQ_EARLY, DQ_TMA, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES)),
            (_dkdv_consumer, (k_smem, v_smem, kv_bar, q_smem, do_smem, q_ready, do_ready, q_empty, do_empty, desc_dk,
                              desc_dv, LSE, DELTA, i_b, i_hkv, start_n, H, GROUP, T_q, m_lo, n_m, m_full_lo, diag_hi,
                              qk_scale, softmax_scale, ds_smem, ds_bar, out_bar, DQ, dq_smem, 1, HAS_RIGHT, OVERLAP,
                              ADD_DQ, DQ_EARLY, DQ_TMA, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES)),
            (_dkdv_loader, (desc_q, desc_do, q_smem, do_smem, q_ready, do_ready, q_empty, do_empty, i_b, i_hkv, GROUP,
                            m_lo, n_m, BLOCK_M, NUM_STAGES)),
        ], [4, 1], [COMPUTE_REGS, LOADER_REGS])

        mbarrier.invalidate(kv_bar)
        _invalidate_ring(q_ready, do_ready, q_empty, do_empty, NUM_STAGES)
        if ADD_DQ:
            _invalidate_dq_barriers(ds_bar, out_bar)


def dkdv_gluon(q, k, v, dout, lse, delta, dk, dv, softmax_scale: float, causal: bool, diag_offset: int, config):
    """Launch the Gluon dK/dV kernel, writing ``dk``, ``dv`` (contiguous, k's shape) from ``delta``
    (the dQ pass's); ``config`` a :class:`ioattn.flash.config.TmaBwdConfig` with ``gluon1``:
    ``BLOCK_N1`` keys per program in two warpgroups, ``BLOCK_M1`` query rows per step,
    ``stages1`` slots in the Q/dO ring, ``overlap1`` each step's dV and dK issued at the next."""
    if config.BLOCK_N1 != 128 or config.BLOCK_M1 not in (32, 64):
        # Each warpgroup's wgmmas have 64 keys as their M dimension; the query step is their N.
        raise ValueError(f"config: the Gluon dK/dV kernel takes BLOCK_N1 = 128 and BLOCK_M1 in (32, 64), got "
                         f"{config.BLOCK_N1} and {config.BLOCK_M1}")
    _launch(q, k, v, dout, lse, delta, dk, dv, None, softmax_scale, causal, diag_offset, config.BLOCK_M1,
            config.stages1, config.overlap1, False)


def fused_gluon(q, k, v, dout, lse, delta, dk, dv, dq_acc, softmax_scale: float, causal: bool, diag_offset: int,
                config):
    """Launch the Gluon kernel as a one-pass backward: ``dk``, ``dv`` as :func:`dkdv_gluon` and each
    step's unscaled dS·k added into ``dq_acc`` (fp32, q's shape, contiguous, holding zeros or what
    to add to); ``config`` a :class:`ioattn.flash.config.FusedBwdConfig` with ``gluon``: 128 keys
    per program, 64 query rows per step (dQ's wgmmas have the rows as their M dimension),
    ``num_stages`` slots, ``dq_early`` each step's dQ wgmmas queued right behind its dV and dK,
    ``tma_reduce`` dQ added by bulk reductions from shared memory instead of atomics."""
    if config.BLOCK_N != 128 or config.BLOCK_M != 64 or config.num_warps != 4:
        raise ValueError(f"config: the Gluon one-pass backward takes BLOCK_M = 64, BLOCK_N = 128 and 4 warps, got "
                         f"{config.BLOCK_M}, {config.BLOCK_N} and {config.num_warps}")
    if dq_acc.dtype != torch.float32 or dq_acc.shape != q.shape or not dq_acc.is_contiguous():
        raise ValueError("dq_acc: must be a contiguous fp32 tensor of q's shape")
    _launch(q, k, v, dout, lse, delta, dk, dv, dq_acc, softmax_scale, causal, diag_offset, config.BLOCK_M,
            config.num_stages, False, config.dq_early, config.tma_reduce)


def _dq_desc(dq_acc, rows: int):
    """The descriptor :func:`_reduce_dq` adds through: dq_acc's [B, H, T, D] view in [1, 1, rows,
    D / 2] tiles (each warpgroup's half of a step's share), bounded per (batch, head)."""
    return _desc(dq_acc, rows, cols=dq_acc.shape[-1] // 2)


def _launch(q, k, v, dout, lse, delta, dk, dv, dq_acc, softmax_scale, causal, diag_offset, M, stages, overlap,
            dq_early, dq_tma=False):
    """Both launchers' launch, at a call site (launch.py's launch_site): a call whose buffers'
    addresses and shapes were seen before makes no descriptors."""
    B, T_q, H, D = q.shape
    T_k, H_kv = k.shape[1], k.shape[2]
    N = 64  # keys of each of the two warpgroups

    def build():
        band = diag_band(T_q, T_k, causal, diag_offset, (-1, -1))
        # DQ: unused without dq_acc (any pointer will do), else the buffer or its descriptor.
        dq = dk if dq_acc is None else _dq_desc(dq_acc, M) if dq_tma else dq_acc
        return (_bwd_dkdv_gluon_kernel, (cdiv(T_k, 2 * N), B * H_kv),
                (_desc(q, M), _desc(k, N), _desc(v, N), _desc(dout, M), lse, delta, _desc(dk, N), _desc(dv, N), dq,
                 T_q, T_k, H, H_kv, H // H_kv, softmax_scale, softmax_scale * LOG2E, band["diag_hi"]),
                dict(HAS_RIGHT=band["HAS_RIGHT"], OVERLAP=overlap, ADD_DQ=dq_acc is not None, DQ_EARLY=dq_early,
                     DQ_TMA=dq_tma, HEAD_DIM=D, BLOCK_M=M, BLOCK_N=N, NUM_STAGES=stages, num_warps=4))

    # lse and delta are contiguous [B, H, Tq] (the callers' contract), dq_acc contiguous with q's
    # shape: their addresses name them.
    key = ("bwd_dkdv_gluon", q.data_ptr(), k.data_ptr(), v.data_ptr(), dout.data_ptr(), lse.data_ptr(),
           delta.data_ptr(), dk.data_ptr(), dv.data_ptr(), None if dq_acc is None else dq_acc.data_ptr(), q.shape,
           k.shape, q.stride(), k.stride(), v.stride(), dout.stride(), dk.stride(), dv.stride(), q.dtype,
           softmax_scale, causal, diag_offset, M, stages, overlap, dq_early, dq_tma)
    with device_guard(q):
        launch_site(key, build)


def gluon_dkdv_supported(q) -> bool:
    """Whether :func:`dkdv_gluon` can run where bwd_tma.py's kernels do: fp16/bf16 (its wgmmas),
    D = 64 or 128 (two warpgroups' dK, dV in registers), compiled on a CUDA device by a triton
    that has Gluon (bwd_tma.py's checks already asked for a Hopper GPU)."""
    return HAS_GLUON and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in (64, 128)
