"""fwd_pingpong.py's forward as a persistent kernel: one program per SM walks a list of tiles, and
each tile's start overlaps the end of the tile before.

Why: a ping-pong program pays, beside its key loop, for a start (barrier set-up, Q's load, the
ring's first K and V tiles, warpgroup 1 waiting for warpgroup 0's first turn) and an end (O
through shared memory and a TMA store) during which the tensor cores idle. On the H200 (v1.16
grid, D = 128 full) the kernel ran 521 / 578 / 606 / 618 TFLOP/s at T = 1024 / 2048 / 4096 /
8192: fitted, about 1.3-2 key blocks' time (2-3 us) a program that is not key-loop work, a share
that grows as programs get shorter. Here the loader warp loads the next tile's Q and K/V while
the warpgroups still finish the current tile, so the start of every tile but the first hides
behind other work. The epilogues do not: neither warpgroup can take its first turn on the next
tile before the other has passed one, so both finish their epilogues first. Measured
(benchmarks/LOG.md v1.17, D = 128): +4-5% at T = 1024 / 2048 full, 2-5% slower beyond, 8-12%
slower causal (the fixed tile order leaves programs of unequal work); flash/config.py runs it
where it won.

Tiles: ``2 * BLOCK_M`` query rows of one (batch, head). Full attention: program p takes tiles
p, p + P, p + 2P, ... (P = min(tiles, SMs)) of the row tiles of each head in order, so that
programs running side by side share a head's K and V in L2. Causal tiles are of unequal length
(row tile i of n_m sees i + 1 key blocks when Tq = Tk), so they go in pairs of equal work: each
(batch, head) pair's row tiles ordered longest, shortest, second longest, second shortest, ...,
and program p takes the consecutive pairs p, p + P, ... of that order (P = min(pairs, SMs)):
every pair is n_m + 1 key blocks, and programs differ by at most one pair. Before v1.26 the
causal tiles went longest first within L2-sized groups of heads, round robin: at D = 128 on 132
SMs the busiest program then had 26-28% more key blocks than the mean at T = 1024 to 8192, the
paired order 3% (benchmarks/LOG.md v1.26). Heads go in order here too: the P programs at work
read the K and V of about 2P / n_m heads (~17 MB at D = 128, whatever T).

Barriers beside fwd_pingpong.py's (whose ring and turns run on across tiles, counted by the
partitions): per warpgroup a Q slot with a ready barrier (the loader's TMA) and an empty one (the
warpgroup is done with Q: its last QKᵀ completed), and O's own shared buffer, so that the next Q
can land while O is still being stored. Shared memory at D = 128 with 128 x 128 tiles and 2
stages: Q 32 KB, O 32 KB, K/V ring 128 KB.

Contract: fwd_gluon.py's (fp16/bf16, D 64/128, TMA-aligned, every feature off); launched by
fwd_pingpong.py's ``flash_fwd_pingpong`` for configs with ``persistent`` set. GPU only; tests in
tests/flash/test_fwd_gluon.py.
"""
import torch

from .._utils import sm_count
from .fwd_gluon import HAS_GLUON

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

    from .fwd_gluon import COMPUTE_REGS, LOADER_REGS, _epilogue, _invalidate_ring, _key_blocks, _ring_barriers
    from .fwd_gluon_loop import _ws_consumer, _ws_loader


if HAS_GLUON:

    @gluon.jit
    def _tiles_here(n_tiles, HAS_RIGHT: gl.constexpr):
        """Tiles this program takes (module docstring): every P-th one, or, causal, every P-th
        pair of consecutive ones in the paired order, the last pair a single tile when their
        count is odd."""
        pid, P = gl.program_id(0), gl.num_programs(0)
        if HAS_RIGHT:
            n_pairs = (n_tiles + 1) // 2
            mine = (n_pairs - pid + P - 1) // P
            # The odd tile out is the last pair's, held by program (n_pairs - 1) % P.
            single = ((n_tiles % 2) == 1) & ((n_pairs - 1) % P == pid)
            return 2 * mine - single.to(gl.int32)
        return (n_tiles - pid + P - 1) // P

    @gluon.jit
    def _tile(k, n_m, H, GROUP, T_q, T_k, diag_hi, HAS_RIGHT: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr):
        """(i_b, i_h, i_hkv, i_bh, first row, key blocks, first masked block) of this program's
        ``k``-th tile, in the order of the module docstring; every partition computes them alike."""
        pid, P = gl.program_id(0), gl.num_programs(0)
        if HAS_RIGHT:
            # Position in the paired order: pair pid + (k // 2) * P, its first or second tile;
            # within a (batch, head) pair's n_m tiles, even positions count down from the
            # longest row tile and odd ones up from the shortest.
            pos = 2 * (pid + (k // 2) * P) + k % 2
            i_bh = pos // n_m
            r = pos - i_bh * n_m
            odd = r % 2
            i_m = (1 - odd) * (n_m - 1 - r // 2) + odd * (r // 2)
        else:
            tile = pid + k * P
            i_m = tile % n_m
            i_bh = tile // n_m
        i_b, i_h = i_bh // H, i_bh % H
        tile_m = i_m * (2 * BLOCK_M)
        n_blocks, mask_from = _key_blocks(tile_m, 2 * BLOCK_M, T_q, T_k, diag_hi, HAS_RIGHT, BLOCK_N)
        return i_b, i_h, i_h // GROUP, i_bh, tile_m, n_blocks, mask_from

    @gluon.jit
    def turns_taken(n_blocks):
        """Turns a warpgroup takes over a tile of ``n_blocks`` key blocks: one a block's QKᵀ, and
        one for the last block's P·V (none without keys)."""
        return gl.where(n_blocks > 0, n_blocks + 1, 0)

    @gluon.jit
    def _persistent_loader(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready,
                           k_empty, v_empty, n_tiles, n_m, H, GROUP, T_q, T_k, diag_hi, HAS_RIGHT: gl.constexpr,
                           BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):
        """Loader warp: per tile, both Q slots once their warpgroups released them, then the
        tile's key blocks through the ring (fwd_gluon_loop.py's loader, counting on from earlier tiles)."""
        c = 0
        it = 0
        for k in range(_tiles_here(n_tiles, HAS_RIGHT)):
            i_b, i_h, i_hkv, i_bh, tile_m, n_blocks, mask_from = _tile(k, n_m, H, GROUP, T_q, T_k, diag_hi,
                                                                       HAS_RIGHT, BLOCK_M, BLOCK_N)
            for w in gl.static_range(2):
                # Empty barriers start as if a phase had completed: the first tile waits for nothing.
                mbarrier.wait(q_empty.index(w), (it & 1) ^ 1)
                mbarrier.expect(q_ready.index(w), desc_q.block_type.nbytes)
                tma.async_copy_global_to_shared(desc_q, [i_b, i_h, tile_m + w * BLOCK_M, 0], q_ready.index(w),
                                                q_smem.index(w))
            _ws_loader(desc_k, desc_v, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, n_blocks, i_b, i_hkv,
                       BLOCK_N, NUM_STAGES, c)
            c += n_blocks
            it += 1

    @gluon.jit
    def _persistent_consumer(q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty,
                             turn, desc_o, LSE, n_tiles, n_m, H, GROUP, T_q, T_k, diag_hi, qk_scale, WG: gl.constexpr,
                             HAS_RIGHT: gl.constexpr, PINGPONG: gl.constexpr, BLOCK_M: gl.constexpr,
                             BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                             HALF_LAST: gl.constexpr):
        """Warpgroup ``WG``: per tile, rows ``[tile_m + WG * BLOCK_M, + BLOCK_M)`` through
        fwd_gluon_loop.py's loop (its barriers' phases carried from tile to tile), Q's slot released as
        soon as the loop is done, then the epilogue through this warpgroup's O buffer."""
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        q_slot = q_smem.index(WG)
        c = 0
        t = 0
        it = 0
        for k in range(_tiles_here(n_tiles, HAS_RIGHT)):
            i_b, i_h, i_hkv, i_bh, tile_m, n_blocks, mask_from = _tile(k, n_m, H, GROUP, T_q, T_k, diag_hi,
                                                                       HAS_RIGHT, BLOCK_M, BLOCK_N)
            start_m = tile_m + WG * BLOCK_M
            acc, m_i, l_i = _ws_consumer(q_slot, k_smem, v_smem, q_ready.index(WG), k_ready, v_ready, k_empty,
                                         v_empty, turn, n_blocks, mask_from, start_m, T_k, diag_hi, qk_scale,
                                         HAS_RIGHT, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, 4, WG, PINGPONG,
                                         it & 1, c, t, True, HALF_LAST=HALF_LAST)
            # Every wgmma that read Q has completed (the loop ends waiting for all of them).
            mbarrier.arrive(q_empty.index(WG), count=1)
            _epilogue(acc, m_i, l_i, o_smem.index(WG), desc_o, LSE, i_b, i_h, i_bh, start_m, T_q, BLOCK_M, HEAD_DIM,
                      row_o)
            c += n_blocks
            t += turns_taken(n_blocks)
            it += 1

    @gluon.jit
    def _fwd_persistent_kernel(desc_q, desc_k, desc_v, desc_o, LSE, T_q, T_k, H, GROUP, BH, diag_hi,
                               qk_scale, HEAD_DIM: gl.constexpr, HAS_RIGHT: gl.constexpr, PINGPONG: gl.constexpr,
                               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                               HALF_LAST: gl.constexpr = False):
        """One program per SM over tiles of 2 * BLOCK_M query rows (module docstring); two compute
        warpgroups of BLOCK_M rows (launched with num_warps=4: the default partition is
        warpgroup 0) and a loader warp; ``HALF_LAST``: fwd_gluon_loop.py's ``_ws_consumer``'s."""
        dtype: gl.constexpr = desc_q.dtype
        n_m = gl.cdiv(T_q, 2 * BLOCK_M)
        n_tiles = n_m * BH
        q_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, BLOCK_M, HEAD_DIM], desc_q.layout)
        o_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, BLOCK_M, HEAD_DIM], desc_o.layout)
        k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_N, HEAD_DIM], desc_k.layout)
        v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_N, HEAD_DIM], desc_v.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for w in gl.static_range(2):
            mbarrier.init(q_ready.index(w), count=1)
            mbarrier.init(q_empty.index(w), count=1)
            mbarrier.init(turn.index(w), count=1)
        # K/V slots released by both warpgroups.
        k_ready, v_ready, k_empty, v_empty = _ring_barriers(NUM_STAGES, 2)
        fence_async_shared()
        # Warpgroup 0 takes the first turn.
        mbarrier.arrive(turn.index(0), count=1)

        gl.warp_specialize([
            (_persistent_consumer, (q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready, k_empty,
                                    v_empty, turn, desc_o, LSE, n_tiles, n_m, H, GROUP, T_q, T_k, diag_hi,
                                    qk_scale, 0, HAS_RIGHT, PINGPONG, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES,
                                    HALF_LAST)),
            (_persistent_consumer, (q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready, k_empty,
                                    v_empty, turn, desc_o, LSE, n_tiles, n_m, H, GROUP, T_q, T_k, diag_hi,
                                    qk_scale, 1, HAS_RIGHT, PINGPONG, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES,
                                    HALF_LAST)),
            (_persistent_loader, (desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready,
                                  k_empty, v_empty, n_tiles, n_m, H, GROUP, T_q, T_k, diag_hi, HAS_RIGHT, BLOCK_M,
                                  BLOCK_N, NUM_STAGES)),
        ], [4, 1], [COMPUTE_REGS, LOADER_REGS])

        for w in gl.static_range(2):
            mbarrier.invalidate(q_ready.index(w))
            mbarrier.invalidate(q_empty.index(w))
            mbarrier.invalidate(turn.index(w))
        _invalidate_ring(k_ready, v_ready, k_empty, v_empty, NUM_STAGES)


def persistent_programs(q, n_tiles: int, causal: bool) -> int:
    """Programs of a persistent launch: one per SM (a program's shared memory fills one), never
    more than there are tiles (causal: pairs of tiles, module docstring). Off a GPU (tests that
    record launches) 4 SMs."""
    sms = sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()) if q.is_cuda else 4
    return max(1, min((n_tiles + 1) // 2 if causal else n_tiles, sms))
