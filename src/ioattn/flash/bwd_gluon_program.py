"""Program setup and teardown shared by the two Gluon backward kernels (bwd_gluon.py's and
bwd_gluon_rows.py's): which keys a program holds and which query blocks see them, the shared-memory
tiles and barriers, the K and V loads, and the dK and dV stores. A program holds 2 × BLOCK_N keys
of one (batch, KV head), one block per compute warpgroup, and both warpgroups walk the same query
steps.
"""
from .fwd_gluon import HAS_GLUON

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma


if HAS_GLUON:

    @gluon.jit
    def _query_blocks(start_n, T_q, T_k, diag_hi, HAS_RIGHT: gl.constexpr, BLOCK_M: gl.constexpr,
                      BLOCK_N: gl.constexpr):
        """(first row, query blocks per head, rows below which blocks need the causal mask) for
        keys ``[start_n, + BLOCK_N)``: bwd.py's ``_query_range`` without a left edge. Row i sees
        key j iff ``j <= i + diag_hi``."""
        last_n = gl.minimum(start_n + BLOCK_N, T_k) - 1
        if HAS_RIGHT:
            m_first = gl.maximum(start_n - diag_hi, 0)
            m_lo = m_first // BLOCK_M * BLOCK_M
            m_full_lo = (gl.maximum(last_n - diag_hi, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
            # Keys that no row sees (right of the band): no block.
            m_lo = gl.where(m_first < T_q, m_lo, T_q)
        else:
            m_lo = 0
            m_full_lo = 0
        n_m = (gl.maximum(T_q - m_lo, 0) + BLOCK_M - 1) // BLOCK_M
        return m_lo, n_m, m_full_lo

    @gluon.jit
    def _program_keys(T_q, T_k, H_kv, diag_hi, HAS_RIGHT: gl.constexpr, BLOCK_M: gl.constexpr,
                      BLOCK_N: gl.constexpr, HEAD_GROUPS: gl.constexpr = False):
        """This program's (batch, KV head, first key) and :func:`_query_blocks` of its 2 * BLOCK_N
        keys: one query range for both warpgroups, which walk the same steps. The grid is (key
        blocks, batch × KV heads), or with ``HEAD_GROUPS`` (heads of a group, key blocks, groups):
        the GPU starts programs in that order, so each group's programs start by key block, the
        longest causal ones first, and groups one after another."""
        if HEAD_GROUPS:
            i_n = gl.program_id(1)
            i_bh = gl.program_id(2) * gl.num_programs(0) + gl.program_id(0)
        else:
            i_n, i_bh = gl.program_id(0), gl.program_id(1)
        i_b, i_hkv = i_bh // H_kv, i_bh % H_kv
        start_n = i_n * (2 * BLOCK_N)
        m_lo, n_m, m_full_lo = _query_blocks(start_n, T_q, T_k, diag_hi, HAS_RIGHT, BLOCK_M, 2 * BLOCK_N)
        return i_b, i_hkv, start_n, m_lo, n_m, m_full_lo

    @gluon.jit
    def _alloc_tiles(desc_q, desc_k, desc_v, desc_do, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr):
        """(k_smem, v_smem, q_smem, do_smem, kv_bar): a K and a V slot per warpgroup, the ring of
        Q and dO slots, and the barrier the K and V loads arrive on."""
        dtype: gl.constexpr = desc_q.dtype
        k_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, BLOCK_N, HEAD_DIM], desc_k.layout)
        v_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, BLOCK_N, HEAD_DIM], desc_v.layout)
        q_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_M, HEAD_DIM], desc_q.layout)
        do_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_M, HEAD_DIM], desc_do.layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        return k_smem, v_smem, q_smem, do_smem, kv_bar

    @gluon.jit
    def _load_kv(desc_k, desc_v, k_smem, v_smem, kv_bar, i_b, i_hkv, start_n, BLOCK_N: gl.constexpr):
        """Both warpgroups' K and V tiles (keys ``[start_n, + 2 * BLOCK_N)``) into their slots,
        arriving on ``kv_bar``."""
        mbarrier.expect(kv_bar, 4 * desc_k.block_type.nbytes)
        for w in gl.static_range(2):
            tma.async_copy_global_to_shared(desc_k, [i_b, i_hkv, start_n + w * BLOCK_N, 0], kv_bar, k_smem.index(w))
            tma.async_copy_global_to_shared(desc_v, [i_b, i_hkv, start_n + w * BLOCK_N, 0], kv_bar, v_smem.index(w))

    @gluon.jit
    def _dq_barriers():
        """(ds_bar, out_bar) of a one-pass kernel: a barrier per dS buffer (both warpgroups' halves
        written) and one for the end (both warpgroups' last dQ read K); two arrivals each."""
        ds_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(ds_bar.index(i), count=2)
        out_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(out_bar, count=2)
        return ds_bar, out_bar

    @gluon.jit
    def _invalidate_dq_barriers(ds_bar, out_bar):
        for i in gl.static_range(2):
            mbarrier.invalidate(ds_bar.index(i))
        mbarrier.invalidate(out_bar)

    @gluon.jit
    def _store_dkdv(dk, dv, k_smem, v_smem, desc_dk, desc_dv, i_b, i_hkv, start_n, softmax_scale, WG: gl.constexpr,
                    BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
        """A warpgroup's dK (scaled) and dV out through its K and V slots, which no wgmma reads
        any more."""
        dtype: gl.constexpr = k_smem.dtype
        k_out = k_smem.index(WG)
        v_out = v_smem.index(WG)
        k_out.reshape([BLOCK_N, HEAD_DIM]).store((dk * softmax_scale).to(dtype))
        v_out.reshape([BLOCK_N, HEAD_DIM]).store(dv.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(desc_dk, [i_b, i_hkv, start_n + WG * BLOCK_N, 0], k_out)
        tma.async_copy_shared_to_global(desc_dv, [i_b, i_hkv, start_n + WG * BLOCK_N, 0], v_out)
        tma.store_wait(pendings=0)
