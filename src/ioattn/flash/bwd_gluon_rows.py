"""A one-pass Hopper backward in Gluon that holds the scores by query row: S = q·kᵀ as
[query rows, keys] (FlashAttention-3's layout), with P and dS handed to the tensor cores through
shared memory.

Why: bwd_gluon.py's kernel holds Sᵀ = k·qᵀ ([keys, query rows]) so that Pᵀ and dSᵀ feed dV and
dK straight from registers. Its per-row values (lse, Δ) then run along the accumulator's columns,
where each thread holds a quarter of them: with 128-row query steps they take 64 registers, and
at D = 64 that form spills (280 local loads/stores a step) where 64-row steps do not. With 64-row
steps a step at D = 64 is half of D = 128's matrix work for the same count of barriers, waits,
lse and Δ loads and dQ reductions, and the kernel stayed at 0.83-0.98x the two-pass backward
(benchmarks/LOG.md v1.18). Held by row, lse and Δ take 4 registers a thread at 128 rows, and a
step can be 128 rows: the fixed costs of a step are spread over twice the work.

A program holds 2 × 64 keys of one (batch, KV head), one 64-key block per compute warpgroup,
and a loader warp streams the query blocks' Q and dO tiles (bwd_gluon.py's loader and slot ring).
Per step each warpgroup, for its keys:

    S  = q·kᵀ,  dP = dO·vᵀ                          (issued together)
    P  = exp2(S · qk_scale − lse · log2 e)           → shared memory → dV += Pᵀ·dO
    dS = P ∘ (dP − Δ)                                → shared memory → dK += dSᵀ·q
    dQ[:, its half of D] += dS·k over both warpgroups' keys (after both dS are in)

and adds its dQ half into the fp32 buffer by the copy engine's bulk reduction (bwd_gluon.py's
``_reduce_dq``). Rows past Tq read q = dO = 0 and lse = +inf (P = 0); keys past Tk read k = v = 0,
so they add nothing to dQ, and their dK, dV rows are dropped by the stores' bounds. Causal steps
holding the diagonal apply the mask. (Those steps in a loop of their own, so that the long loop
compiles without the mask, ran slower, 0.83 / 0.88x the two-pass backward at D = 128 against 1.17 /
1.20x in one loop: benchmarks/LOG.md v1.19.)

Two options (FusedBwdConfig), both on in the D = 64 table entries: ``dq_rows`` (128-row steps)
gives each warpgroup half the step's rows of dQ, every column, instead of half the columns (64 x
64 wgmmas instead of 128 x 32: 5% off the D = 64 backward, LOG v1.23); ``s_ahead`` issues each
step's S behind the step before's dQ, so that it runs while that dQ is added (3-5% off at D = 64,
5-9% slower at D = 128 for a reason not found: LOG v1.23).

GPU only (Gluon has no interpreter): tests/flash/gluon_ptxas.py compiles it for sm_90 without a
GPU; tests/flash/test_bwd_gluon.py compares it with the reference on the H200.
"""
import math

import torch

from .._utils import cdiv, l2_bytes
from ..launch import launch_site
from .fwd import LOG2E, diag_band, device_guard
from .fwd_gluon import HAS_GLUON

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                   warpgroup_mma_wait)

    from .bwd_gluon import (_acc_layout, _dkdv_loader, _dq_desc, _dq_layout, _reduce_dq, _release_slot,
                             _row_stats)
    from .bwd_gluon_program import (_alloc_tiles, _dq_barriers, _invalidate_dq_barriers, _load_kv, _program_keys,
                                    _store_dkdv)
    from .fwd_gluon import COMPUTE_REGS, LOADER_REGS, _desc, _invalidate_ring, _ring_barriers


if HAS_GLUON:

    @gluon.constexpr_function
    def _s_layout(BLOCK_N):
        """S and dP: [query rows, BLOCK_N keys], warps stacked along the rows."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])

    @gluon.jit
    def _issue_s(k, q_smem, q_ready, t, n_steps, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr):
        """S = q·kᵀ of step ``t``, issued once its Q slot is filled (in flight: the caller waits).
        For ``t == n_steps``, past the last step, it is issued without the wait on whatever that
        slot holds, and its result is dropped: no load writes the slot then (the loader's last
        one, for step n_steps - NUM_STAGES or none, completed before that step ran)."""
        slot = t % NUM_STAGES
        if t < n_steps:
            mbarrier.wait(q_ready.index(slot), (t // NUM_STAGES) & 1)
        q_t = q_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=_s_layout(BLOCK_N))
        return warpgroup_mma(q_t, k.permute((1, 0)), s_zero, use_acc=False, is_async=True)

    @gluon.jit
    def _rows_step(k, v, k_smem, q_smem, do_smem, q_ready, do_ready, q_empty, do_empty, p_smem, ds_smem, ds_bar,
                   dq_smem, DQ, LSE, DELTA, i_b, H, i_hkv, GROUP, T_q, m_lo, n_m, m_full_lo, o_n, o_m0, diag_hi,
                   qk_scale, dk, dv, s_ahead, t, MASKED: gl.constexpr, WG: gl.constexpr, DQ_ROWS: gl.constexpr,
                   S_AHEAD: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                   NUM_STAGES: gl.constexpr):
        """Step ``t`` of one compute warpgroup (the module's docstring), the causal mask applied iff
        ``MASKED`` and the step's block holds the diagonal (from ``m_full_lo`` down): returns the
        updated (dK, dV) and, with ``S_AHEAD``, the next step's S (``s_ahead`` is this step's,
        formed during the step before; without, the third value is dV again, unused)."""
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = _s_layout(BLOCK_N)
        HALF: gl.constexpr = HEAD_DIM // 2
        slot = t % NUM_STAGES
        phase = (t // NUM_STAGES) & 1
        g = t // n_m
        i_h = i_hkv * GROUP + g
        start_m = m_lo + (t - g * n_m) * BLOCK_M
        o_m = start_m + o_m0
        # lse and Δ are loaded before the waits, to overlap them.
        lse2, delta = _row_stats(LSE, DELTA, i_b, H, i_h, T_q, o_m)
        q_t = q_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
        do_t = do_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        if S_AHEAD:
            s_tok = s_ahead
        else:
            mbarrier.wait(q_ready.index(slot), phase)
            s_tok = warpgroup_mma(q_t, k.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(do_ready.index(slot), phase)
        dp_tok = warpgroup_mma(do_t, v.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        # P while dP is still on the tensor cores, then dS while dV += Pᵀ·dO is.
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
        p = gl.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            if start_m < m_full_lo:
                p = gl.where(o_n[None, :] <= o_m[:, None] + diag_hi, p, 0.0)
        p_buf = p_smem.index(WG)
        p_buf.store(p.to(dtype))
        fence_async_shared()
        dv_tok = warpgroup_mma(p_buf.permute((1, 0)), do_t, dv, is_async=True)
        dp = warpgroup_mma_wait(1, deps=(dp_tok, ))
        # dS of two steps alternate, [buffer * 2 + warpgroup]: the other warpgroup may still
        # read this step's while this one writes the next (bwd_gluon.py's _issue_dq says why
        # two suffice).
        buf = t % 2
        ds_buf = ds_smem.index(buf * 2 + WG)
        ds_buf.store((p * (dp - delta[:, None])).to(dtype))
        fence_async_shared()
        mbarrier.arrive(ds_bar.index(buf), count=1)
        dk_tok = warpgroup_mma(ds_buf.permute((1, 0)), q_t, dk, is_async=True)
        dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))
        # The slot goes back to the loader as soon as dV and dK are done with it, before dQ: the
        # later the release, the less time the loader has for the step after next.
        _release_slot(q_empty, do_empty, slot)
        mbarrier.wait(ds_bar.index(buf), (t // 2) & 1)
        if DQ_ROWS:
            # dQ's rows [WG * ROWS, + ROWS), every column, over all 2 * BLOCK_N keys, once both
            # dS are in: 64-column wgmmas where the column halves take 32-column ones, which
            # read their operands from shared memory twice as often per multiply-add.
            ROWS: gl.constexpr = BLOCK_M // 2
            dq = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=_acc_layout(HEAD_DIM))
            for w in gl.static_range(2):
                ds_rows = ds_smem.index(buf * 2 + w).slice(WG * ROWS, ROWS, dim=0)
                k_w = k_smem.index(w).reshape([BLOCK_N, HEAD_DIM])
                dq = warpgroup_mma(ds_rows, k_w, dq, use_acc=w > 0, is_async=True)
        else:
            # dQ's columns [WG * HALF, + HALF) over all 2 * BLOCK_N keys, once both dS are in.
            dq = gl.zeros([BLOCK_M, HALF], gl.float32, layout=_dq_layout(HEAD_DIM))
            for w in gl.static_range(2):
                k_half = k_smem.index(w).reshape([BLOCK_N, HEAD_DIM]).slice(WG * HALF, HALF, dim=1)
                dq = warpgroup_mma(ds_smem.index(buf * 2 + w), k_half, dq, use_acc=w > 0, is_async=True)
        if S_AHEAD:
            # The next step's S queues behind dQ on the tensor cores and runs while this
            # warpgroup adds dQ, so the next step starts with its S done. It is waited for here:
            # an accumulator still in flight across the loop's back edge makes ptxas serialize
            # every wgmma of the kernel. After the last step it is issued all the same (see
            # _issue_s): a branch around it spilled more (ptxas: D = 128 0 -> 19 local loads
            # and stores a step) than the one wasted wgmma a program costs.
            s_acc = _issue_s(k, q_smem, q_ready, t + 1, GROUP * n_m, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES)
            dq = warpgroup_mma_wait(1, deps=(dq, ))
            _reduce_share(dq, dq_smem, DQ, i_b, i_h, start_m, WG, DQ_ROWS, BLOCK_M, HEAD_DIM)
            s_next = warpgroup_mma_wait(0, deps=(s_acc, ))
            return dk, dv, s_next
        else:
            dq = warpgroup_mma_wait(0, deps=(dq, ))
            _reduce_share(dq, dq_smem, DQ, i_b, i_h, start_m, WG, DQ_ROWS, BLOCK_M, HEAD_DIM)
            return dk, dv, dv

    @gluon.jit
    def _reduce_share(dq, dq_smem, DQ, i_b, i_h, start_m, WG: gl.constexpr, DQ_ROWS: gl.constexpr,
                      BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr):
        """This warpgroup's dQ share of the step starting at query row ``start_m`` into DQ: half
        its rows with ``DQ_ROWS`` (rows past Tq, the whole half included, dropped by DQ's
        bounds), else half its columns."""
        if DQ_ROWS:
            _reduce_dq(dq, dq_smem, DQ, i_b, i_h, start_m + WG * (BLOCK_M // 2), 0, WG)
        else:
            _reduce_dq(dq, dq_smem, DQ, i_b, i_h, start_m, WG * (HEAD_DIM // 2), WG)

    @gluon.jit
    def _rows_consumer(k_smem, v_smem, kv_bar, q_smem, do_smem, q_ready, do_ready, q_empty, do_empty, p_smem,
                       ds_smem, ds_bar, out_bar, dq_smem, desc_dk, desc_dv, DQ, LSE, DELTA, i_b, i_hkv, start_n, H,
                       GROUP, T_q, m_lo, n_m, m_full_lo, diag_hi, qk_scale, softmax_scale, WG: gl.constexpr,
                       HAS_RIGHT: gl.constexpr, DQ_ROWS: gl.constexpr, S_AHEAD: gl.constexpr,
                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr):
        """One compute warpgroup: dK, dV of keys ``[start_n + WG * BLOCK_N, + BLOCK_N)`` over every
        step, its half of each step's dQ, then the dK, dV stores (through its K and V slots)."""
        s_layout: gl.constexpr = _s_layout(BLOCK_N)
        o_n = start_n + WG * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        o_m0 = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        k = k_smem.index(WG).reshape([BLOCK_N, HEAD_DIM])
        v = v_smem.index(WG).reshape([BLOCK_N, HEAD_DIM])
        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=_acc_layout(HEAD_DIM))
        dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=_acc_layout(HEAD_DIM))
        mbarrier.wait(kv_bar, phase=0)
        if S_AHEAD:
            # The first step's S, waited for here (_rows_step says why).
            s_tok = _issue_s(k, q_smem, q_ready, 0, GROUP * n_m, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES)
            s_tok = warpgroup_mma_wait(0, deps=(s_tok, ))
            for t in range(GROUP * n_m):
                dk, dv, s_tok = _rows_step(k, v, k_smem, q_smem, do_smem, q_ready, do_ready, q_empty, do_empty, p_smem,
                                           ds_smem, ds_bar, dq_smem, DQ, LSE, DELTA, i_b, H, i_hkv, GROUP, T_q, m_lo,
                                           n_m, m_full_lo, o_n, o_m0, diag_hi, qk_scale, dk, dv, s_tok, t, HAS_RIGHT,
                                           WG, DQ_ROWS, S_AHEAD, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES)
        else:
            for t in range(GROUP * n_m):
                dk, dv, _ = _rows_step(k, v, k_smem, q_smem, do_smem, q_ready, do_ready, q_empty, do_empty, p_smem,
                                       ds_smem, ds_bar, dq_smem, DQ, LSE, DELTA, i_b, H, i_hkv, GROUP, T_q, m_lo, n_m,
                                       m_full_lo, o_n, o_m0, diag_hi, qk_scale, dk, dv, None, t, HAS_RIGHT, WG,
                                       DQ_ROWS, S_AHEAD, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES)
        # The other warpgroup's dQ reads this one's K slot until its last step: wait for it.
        # (The last bulk reduction of dQ may still be in flight: the store_wait below covers it.)
        mbarrier.arrive(out_bar, count=1)
        mbarrier.wait(out_bar, phase=0)
        _store_dkdv(dk, dv, k_smem, v_smem, desc_dk, desc_dv, i_b, i_hkv, start_n, softmax_scale, WG, BLOCK_N,
                    HEAD_DIM)

    @gluon.jit
    def _bwd_rows_gluon_kernel(desc_q, desc_k, desc_v, desc_do, LSE, DELTA, desc_dk, desc_dv, DQ, T_q, T_k, H, H_kv,
                               GROUP, softmax_scale, qk_scale, diag_hi, HAS_RIGHT: gl.constexpr,
                               DQ_ROWS: gl.constexpr, S_AHEAD: gl.constexpr, HEAD_GROUPS: gl.constexpr,
                               HEAD_DIM: gl.constexpr,
                               BLOCK_M: gl.constexpr,
                               BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):
        """One program: 2 * BLOCK_N keys of one (batch, KV head), BLOCK_M query rows a step; DQ a
        descriptor of the fp32 dQ buffer with [1, 1, BLOCK_M, HEAD_DIM / 2] tiles. Launched with
        num_warps=4 (the default partition is warpgroup 0)."""
        dtype: gl.constexpr = desc_q.dtype
        i_b, i_hkv, start_n, m_lo, n_m, m_full_lo = _program_keys(T_q, T_k, H_kv, diag_hi, HAS_RIGHT, BLOCK_M,
                                                                  BLOCK_N, HEAD_GROUPS)

        k_smem, v_smem, q_smem, do_smem, kv_bar = _alloc_tiles(desc_q, desc_k, desc_v, desc_do, BLOCK_M, BLOCK_N,
                                                               HEAD_DIM, NUM_STAGES)
        # P of each warpgroup, dS of two steps ([buffer * 2 + warpgroup]), each [BLOCK_M, BLOCK_N].
        pds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype)
        p_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, BLOCK_N], pds_layout)
        ds_smem = gl.allocate_shared_memory(dtype, [4, BLOCK_M, BLOCK_N], pds_layout)
        # A staging buffer per warpgroup for its share of each step's dQ (half its rows or half
        # its columns: DQ's block).
        if DQ_ROWS:
            dq_smem = gl.allocate_shared_memory(gl.float32, [2, 1, 1, BLOCK_M // 2, HEAD_DIM], DQ.layout)
        else:
            dq_smem = gl.allocate_shared_memory(gl.float32, [2, 1, 1, BLOCK_M, HEAD_DIM // 2], DQ.layout)
        q_ready, do_ready, q_empty, do_empty = _ring_barriers(NUM_STAGES, 2)
        ds_bar, out_bar = _dq_barriers()
        fence_async_shared()
        _load_kv(desc_k, desc_v, k_smem, v_smem, kv_bar, i_b, i_hkv, start_n, BLOCK_N)

        gl.warp_specialize([
            (_rows_consumer, (k_smem, v_smem, kv_bar, q_smem, do_smem, q_ready, do_ready, q_empty, do_empty, p_smem,
                              ds_smem, ds_bar, out_bar, dq_smem, desc_dk, desc_dv, DQ, LSE, DELTA, i_b, i_hkv, start_n,
                              H, GROUP, T_q, m_lo, n_m, m_full_lo, diag_hi, qk_scale, softmax_scale, 0, HAS_RIGHT,
                              DQ_ROWS, S_AHEAD, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES)),
            (_rows_consumer, (k_smem, v_smem, kv_bar, q_smem, do_smem, q_ready, do_ready, q_empty, do_empty, p_smem,
                              ds_smem, ds_bar, out_bar, dq_smem, desc_dk, desc_dv, DQ, LSE, DELTA, i_b, i_hkv, start_n,
                              H, GROUP, T_q, m_lo, n_m, m_full_lo, diag_hi, qk_scale, softmax_scale, 1, HAS_RIGHT,
                              DQ_ROWS, S_AHEAD, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES)),
            (_dkdv_loader, (desc_q, desc_do, q_smem, do_smem, q_ready, do_ready, q_empty, do_empty, i_b, i_hkv, GROUP,
                            m_lo, n_m, BLOCK_M, NUM_STAGES)),
        ], [4, 1], [COMPUTE_REGS, LOADER_REGS])

        mbarrier.invalidate(kv_bar)
        _invalidate_ring(q_ready, do_ready, q_empty, do_empty, NUM_STAGES)
        _invalidate_dq_barriers(ds_bar, out_bar)


def fused_gluon_rows(q, k, v, dout, lse, delta, dk, dv, dq_acc, softmax_scale: float, causal: bool,
                     diag_offset: int, config):
    """Launch the kernel: ``dk``, ``dv`` (contiguous, k's shape) and each step's unscaled dS·k
    added into ``dq_acc`` (fp32, q's shape, contiguous, holding zeros or what to add to), from
    ``delta``; ``config`` a :class:`ioattn.flash.config.FusedBwdConfig` with ``gluon`` and
    ``rows``: 128 keys a program (two warpgroups of 64), ``BLOCK_M`` query rows a step (64 or
    128), ``num_stages`` Q/dO slots, ``dq_rows`` each warpgroup's dQ share half the step's rows
    (BLOCK_M = 128 only) instead of half the columns."""
    if config.BLOCK_N != 128 or config.BLOCK_M not in (64, 128) or config.num_warps != 4:
        raise ValueError(f"config: the row-held Gluon backward takes BLOCK_N = 128, BLOCK_M in (64, 128) and "
                         f"4 warps, got {config.BLOCK_N}, {config.BLOCK_M} and {config.num_warps}")
    if config.dq_rows and config.BLOCK_M != 128:
        # A warpgroup's wgmma is at least 64 rows tall.
        raise ValueError(f"config: dq_rows needs BLOCK_M = 128, got {config.BLOCK_M}")
    if dq_acc.dtype != torch.float32 or dq_acc.shape != q.shape or not dq_acc.is_contiguous():
        raise ValueError("dq_acc: must be a contiguous fp32 tensor of q's shape")
    B, T_q, H, D = q.shape
    T_k, H_kv = k.shape[1], k.shape[2]
    band = diag_band(T_q, T_k, causal, diag_offset, (-1, -1))
    M, N = config.BLOCK_M, 64  # N: keys of each of the two warpgroups

    def build():
        grid = (cdiv(T_k, 2 * N), B * H_kv)
        if config.head_groups:
            g = head_group(q, k)
            grid = (g, grid[0], B * H_kv // g)
        return (_bwd_rows_gluon_kernel, grid,
                (_desc(q, M), _desc(k, N), _desc(v, N), _desc(dout, M), lse, delta, _desc(dk, N), _desc(dv, N),
                 _desc(dq_acc, M // 2) if config.dq_rows else _dq_desc(dq_acc, M), T_q, T_k, H, H_kv, H // H_kv,
                 softmax_scale, softmax_scale * LOG2E, band["diag_hi"]),
                dict(HAS_RIGHT=band["HAS_RIGHT"], DQ_ROWS=config.dq_rows, S_AHEAD=config.s_ahead,
                     HEAD_GROUPS=config.head_groups, HEAD_DIM=D,
                     BLOCK_M=M, BLOCK_N=N, NUM_STAGES=config.num_stages, num_warps=4))

    key = ("bwd_rows", q.data_ptr(), k.data_ptr(), v.data_ptr(), dout.data_ptr(), lse.data_ptr(), delta.data_ptr(),
           dk.data_ptr(), dv.data_ptr(), dq_acc.data_ptr(), q.shape, k.shape, q.stride(), k.stride(), v.stride(),
           dout.stride(), dk.stride(), dv.stride(), q.dtype, softmax_scale, causal, diag_offset, config)
    with device_guard(q):
        launch_site(key, build)


def head_group(q, k) -> int:
    """Heads (batch × KV head) a group of :func:`_program_keys`' HEAD_GROUPS order: the most that
    divides B × H_kv and whose Q, K, V, dO and fp32 dQ take at most half the L2 cache, so that a
    group's programs, started together, find one another's tiles there."""
    B, T_q, H, D = q.shape
    T_k, H_kv = k.shape[1], k.shape[2]
    per_head = (H // H_kv) * T_q * D * (2 * q.element_size() + 4) + 2 * T_k * D * k.element_size()
    # A CUDA tensor's device always has its index.
    most = max(1, l2_bytes(q.device.index or 0) // 2 // per_head)
    heads = B * H_kv
    divisors = {d for i in range(1, math.isqrt(heads) + 1) if heads % i == 0 for d in (i, heads // i)}
    return max(d for d in divisors if d <= most) if most > 1 else 1
