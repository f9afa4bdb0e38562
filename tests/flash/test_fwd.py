"""Accuracy of the Triton forward (src/ioattn/flash/fwd.py) against the dense reference.

Without a GPU these run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET);
with one they run compiled. Every case checks out and lse with the accuracy rule: error vs a
high-precision reference at most 2× that of plain PyTorch in the input dtype, on NaN-poisoned outputs.
The sliding window, softcap and ALiBi cases also check which tiles the kernels visit.
"""
import itertools
import math

import pytest
import torch
import triton
import triton.language as tl

from ioattn._utils import cdiv, next_pow2
from ioattn.flash.bwd import _query_range
from ioattn.flash.config import FwdConfig, get_fwd_config, padded_head_dim
from ioattn.flash.fwd import _key_range, diag_band, flash_fwd_triton
from ioattn.flash.reference import attention_ref, visible_mask
from ioattn.testing import assert_close, make_qkv

from .cases import (DEVICE, DTYPES, FEATURE_CASES, GPU_CASES, GPU_FEATURE_CASES, GPU_FP32_CASES, SMEM_BYTES,
                    case_id, feature_id, reference_dtype)


def assert_lse(lse, ref, base):
    # -inf marks rows that see no key: it must sit exactly where the reference has it, and the
    # accuracy rule applies to the finite entries (-inf - -inf would be NaN).
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)), "lse: -inf rows differ"
    finite = torch.isfinite(ref)
    assert_close("lse", lse[finite], ref[finite], base[finite], factor=2)


def make_slopes(alibi, B, H):
    """ALiBi slopes of shape ``[H]`` (alibi="H") or ``[B, H]`` ("BH"), or None."""
    if alibi is None:
        return None
    shape = (H,) if alibi == "H" else (B, H)
    # Positive, and spread over the range real models use (2^-8 .. 2^-1 for 8 heads).
    return (torch.rand(shape, device=DEVICE) * 0.5 + 2**-8).float()


def check_fwd(B, Tq, Tk, H, Hkv, D, causal, diag_offset, dtype, *, layout="bthd", config=None,
              window=(-1, -1), softcap=0.0, alibi=None, fwd=flash_fwd_triton, qkv=None):
    """Run the launcher ``fwd`` (flash_fwd_triton's signature) on fresh inputs, or on ``qkv``
    when given, and check out and lse against the reference."""
    if qkv is None:
        qkv = make_qkv(B, Tq, Tk, H, Hkv, D, dtype=dtype, device=DEVICE, layout=layout)
    q, k, v = qkv
    scale = 1.0 / math.sqrt(D)
    offset = Tk - Tq if diag_offset is None else diag_offset
    slopes = make_slopes(alibi, B, H)
    features = dict(window=window, softcap=softcap, alibi_slopes=slopes)
    out, lse = fwd(q, k, v, scale, causal, offset, config=config, **features)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (B, H, Tq) and lse.dtype == torch.float32 and lse.is_contiguous()

    kw = dict(softmax_scale=scale, causal=causal, diag_offset=offset, **features)
    rdt = reference_dtype(dtype, DEVICE)
    ref_out, ref_lse = attention_ref(q.to(rdt), k.to(rdt), v.to(rdt), upcast=False, **kw)
    base_out, base_lse = attention_ref(q, k, v, upcast=False, **kw)
    assert_close("out", out, ref_out, base_out, factor=2)
    assert_lse(lse, ref_lse, base_lse)
    return out, lse


# A covering set for the interpreter: T in {1, 17, 63, 128, 257}, D in {8, 16, 40, 64, 72, 96,
# 128, 256}, MHA / GQA 8:2 / MQA, Tq == Tk, Tq < Tk, Tq > Tk (rows with no visible key), both
# causal alignments (diag_offset None = Tk - Tq as flash-attn, 0 as SDPA) and odd offsets.
CASES = [
    (1, 1, 1, 1, 1, 16, False, None),
    (1, 1, 17, 2, 1, 64, True, None),
    (2, 17, 17, 2, 2, 40, True, None),
    (1, 17, 17, 1, 1, 8, True, None),
    (1, 63, 17, 4, 2, 72, True, None),
    (1, 17, 63, 4, 1, 96, True, None),
    (1, 63, 63, 8, 2, 64, False, None),
    (1, 128, 128, 2, 2, 128, True, None),
    (1, 63, 128, 2, 2, 256, True, 0),
    (1, 128, 63, 2, 1, 64, True, 0),
    (1, 17, 40, 2, 2, 40, True, -20),
    (1, 17, 40, 1, 1, 16, True, 100),
    (2, 63, 17, 2, 2, 256, False, None),
    (1, 257, 257, 1, 1, 64, True, None),
]


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fwd(case, dtype):
    check_fwd(*case, DTYPES[dtype])


@pytest.mark.parametrize("case", [(2, 63, 17, 4, 2, 40, True, None), (1, 33, 70, 2, 1, 96, True, 0)],
                         ids=case_id)
def test_fwd_strided(case):
    check_fwd(*case, torch.float16, layout="bhtd")


def test_fwd_empty_rows_are_zero():
    # Tq > Tk, bottom-right: rows 0..Tq-Tk-1 see no key and must be exactly (0, -inf).
    out, lse = check_fwd(1, 40, 9, 2, 1, 32, True, None, torch.float16)
    assert torch.all(out[:, :31] == 0) and torch.all(torch.isneginf(lse[:, :, :31]))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fwd_nondefault_config(causal):
    # Tall-and-narrow tiles (BLOCK_M != BLOCK_N) exercise the split of masked and unmasked blocks.
    check_fwd(1, 50, 77, 2, 1, 40, causal, None, torch.float16, config=FwdConfig(16, 64, 4, 1))
    check_fwd(1, 77, 50, 2, 1, 40, causal, 0, torch.float16, config=FwdConfig(64, 16, 4, 1))


FWD_BRANCHES = [(d, dt, c) for d in (8, 40, 64, 72, 128, 256) for dt in DTYPES for c in (False, True)]


@pytest.mark.parametrize("interpret", [False, True], ids=["compiled", "interpret"])
def test_fwd_config_branches(interpret):
    for D, dtype, causal in FWD_BRANCHES:
        cfg = get_fwd_config(D, DTYPES[dtype], causal, interpret=interpret)
        HEAD_DIM = padded_head_dim(D)
        for block in (cfg.BLOCK_M, cfg.BLOCK_N):
            assert block >= 16 and block & (block - 1) == 0, cfg
        # Q tile once, K and V tiles once per pipeline stage.
        elem = DTYPES[dtype].itemsize
        smem = (cfg.BLOCK_M + 2 * max(cfg.num_stages, 1) * cfg.BLOCK_N) * HEAD_DIM * elem
        assert smem <= SMEM_BYTES, (D, dtype, cfg, smem)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_fwd_gpu_configs_run(D, dtype):
    # The configs the GPU will pick, run here too (in the interpreter without a GPU).
    cfg = get_fwd_config(D, DTYPES[dtype], True, interpret=False)
    check_fwd(1, 130, 150, 1, 1, D, True, None, DTYPES[dtype], config=cfg)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("case", FEATURE_CASES, ids=feature_id)
def test_fwd_features(case, dtype):
    *base, window, softcap, alibi = case
    check_fwd(*base, DTYPES[dtype], window=window, softcap=softcap, alibi=alibi)


def test_fwd_window_empty_rows_are_zero():
    # Row i sees keys [i - 46, i - 36]: rows 0..35 (above the band) and 86..129 (below it, past
    # Tk) see none, in whole tiles and in part of tiles 1 and 2.
    out, lse = check_fwd(1, 130, 40, 2, 1, 32, False, -40, torch.float16, window=(6, 4))
    for rows in (slice(0, 36), slice(86, 130)):
        assert torch.all(out[:, rows] == 0) and torch.all(torch.isneginf(lse[:, :, rows]))
    assert torch.all(torch.isfinite(lse[:, :, 36:86]))


@pytest.mark.parametrize("window", [(7, -1), (-1, 7), (20, 0)], ids=lambda w: f"win{w[0]}_{w[1]}")
def test_fwd_window_nondefault_config(window):
    # Unequal tiles put the band's edges at every position inside a block.
    check_fwd(1, 77, 50, 2, 1, 40, False, None, torch.float16, window=window, config=FwdConfig(16, 64, 4, 1))
    check_fwd(1, 50, 77, 2, 1, 40, False, 0, torch.float16, window=window, config=FwdConfig(64, 16, 4, 1))


@triton.jit
def _range_probe(PARAMS, KEYS, QUERIES, N, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_PAD: tl.constexpr, TILES: tl.constexpr):
    # For each of the N problems of PARAMS (rows T_q, T_k, diag_lo, diag_hi) and each tile t,
    # the key range of query tile t and the query range of key tile t, computed elementwise in
    # one program: the interpreter pays per program, and the helpers' arithmetic is the same on
    # [N_PAD, TILES] tensors as on the kernels' scalars. Tiles past the last are ignored.
    o_c = tl.arange(0, N_PAD)
    m_c = o_c < N
    T_q = tl.load(PARAMS + o_c * 4, mask=m_c, other=1)[:, None]  # [N_PAD, 1]
    T_k = tl.load(PARAMS + o_c * 4 + 1, mask=m_c, other=1)[:, None]  # [N_PAD, 1]
    diag_lo = tl.load(PARAMS + o_c * 4 + 2, mask=m_c, other=0)[:, None]  # [N_PAD, 1]
    diag_hi = tl.load(PARAMS + o_c * 4 + 3, mask=m_c, other=0)[:, None]  # [N_PAD, 1]
    o_t = tl.arange(0, TILES)[None, :]
    p_keys = KEYS + (o_c[:, None] * TILES + o_t) * 4
    n_lo, n_full_lo, n_full_hi, n_end = _key_range(o_t * BLOCK_M, T_q, T_k, diag_lo, diag_hi,
                                                   HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    tl.store(p_keys, n_lo, mask=m_c[:, None])
    tl.store(p_keys + 1, n_full_lo, mask=m_c[:, None])
    tl.store(p_keys + 2, n_full_hi, mask=m_c[:, None])
    tl.store(p_keys + 3, n_end, mask=m_c[:, None])
    p_queries = QUERIES + (o_c[:, None] * TILES + o_t) * 4
    m_lo, m_full_lo, m_full_hi, m_end = _query_range(o_t * BLOCK_N, T_q, T_k, diag_lo, diag_hi,
                                                     HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    tl.store(p_queries, m_lo, mask=m_c[:, None])
    tl.store(p_queries + 1, m_full_lo, mask=m_c[:, None])
    tl.store(p_queries + 2, m_full_hi, mask=m_c[:, None])
    tl.store(p_queries + 3, m_end, mask=m_c[:, None])


def probe_ranges(problems, BLOCK_M, BLOCK_N):
    """Run `_key_range`/`_query_range` for each ``(Tq, Tk, causal, diag_offset, window)``, one
    launch per combination of flags; returns ``(band, keys, queries)`` per problem, keys and
    queries a list per tile of the four bounds."""
    bands = [diag_band(Tq, Tk, causal, off, window) for Tq, Tk, causal, off, window in problems]
    tiles = next_pow2(max(max(cdiv(Tq, BLOCK_M), cdiv(Tk, BLOCK_N)) for Tq, Tk, *_ in problems))
    results = [None] * len(problems)
    for flags in itertools.product((False, True), repeat=2):
        idx = [i for i, b in enumerate(bands) if (b["HAS_LEFT"], b["HAS_RIGHT"]) == flags]
        if not idx:
            continue
        params = torch.tensor([[problems[i][0], problems[i][1], bands[i]["diag_lo"], bands[i]["diag_hi"]]
                               for i in idx], dtype=torch.int32, device=DEVICE)
        keys = torch.zeros(len(idx), tiles, 4, dtype=torch.int32, device=DEVICE)
        queries = torch.zeros_like(keys)
        _range_probe[(1,)](params, keys, queries, len(idx), *flags, BLOCK_M, BLOCK_N,
                           next_pow2(len(idx)), tiles)
        for j, i in enumerate(idx):
            results[i] = bands[i], keys[j].tolist(), queries[j].tolist()
    return results


def visited_blocks(lo, full_lo, full_hi, end, step, has_lead):
    """Block starts the three loops of a kernel visit, split into (masked, unmasked) sets."""
    lead = list(range(lo, full_lo, step)) if has_lead else []
    full = list(range(full_lo, full_hi, step))
    tail = list(range(full_hi, end, step))
    # The loops run one after the other through one advancing pointer: no gap, no overlap.
    start = lo if has_lead else full_lo
    assert lead + full + tail == list(range(start, max(end, start), step)), (lo, full_lo, full_hi, end)
    return set(lead + tail), set(full)


def block_view(mask, BLOCK_M, BLOCK_N, pad):
    """``[Tq, Tk]`` bool mask -> ``[tiles, BLOCK_M, blocks, BLOCK_N]``, padded with ``pad``."""
    Tq, Tk = mask.shape
    padded = torch.full((cdiv(Tq, BLOCK_M) * BLOCK_M, cdiv(Tk, BLOCK_N) * BLOCK_N), pad)
    padded[:Tq, :Tk] = mask
    return padded.view(cdiv(Tq, BLOCK_M), BLOCK_M, cdiv(Tk, BLOCK_N), BLOCK_N)


def check_ranges(problem, probed, BLOCK_M, BLOCK_N):
    """The tiles `_key_range`/`_query_range` gave each program, against the visible mask: all
    visible pairs covered, no block without one (work grows with the window, not with T), and
    no mask skipped where a pair is hidden. Returns the number of (query tile, key block) visits."""
    Tq, Tk, causal, diag_offset, window = problem
    band, keys, queries = probed
    seen = visible_mask(Tq, Tk, causal=causal, diag_offset=diag_offset, window=window)
    # [tiles, blocks]: whether any pair of the tile is visible; whether all are, where the forward
    # and dQ kernels count keys past Tk as hidden (they mask them) and rows past Tq as visible
    # (never stored), and the dK/dV kernel counts both as visible (masked on load).
    any_seen = block_view(seen, BLOCK_M, BLOCK_N, False).any(3).any(1)
    all_seen_q = block_view(seen, BLOCK_M, BLOCK_N, False)
    all_seen_q[cdiv(Tq, BLOCK_M) - 1, (Tq - 1) % BLOCK_M + 1:] = True
    all_seen_q = all_seen_q.all(3).all(1)
    all_seen_k = block_view(seen, BLOCK_M, BLOCK_N, True).all(3).all(1)
    for i_m in range(cdiv(Tq, BLOCK_M)):
        masked, full = visited_blocks(*keys[i_m], BLOCK_N, band["HAS_LEFT"])
        need = {i_n * BLOCK_N for i_n in range(cdiv(Tk, BLOCK_N)) if any_seen[i_m, i_n]}
        assert masked | full == need, (problem, i_m, keys[i_m])
        assert all(all_seen_q[i_m, n // BLOCK_N] for n in full), (problem, i_m, keys[i_m])
    for i_n in range(cdiv(Tk, BLOCK_N)):
        # The dK/dV kernel has a leading masked loop always and a trailing one only with HAS_LEFT.
        lo, full_lo, full_hi, end = queries[i_n]
        masked, full = visited_blocks(lo, full_lo, full_hi, end if band["HAS_LEFT"] else full_hi,
                                      BLOCK_M, True)
        need = {i_m * BLOCK_M for i_m in range(cdiv(Tq, BLOCK_M)) if any_seen[i_m, i_n]}
        assert masked | full == need, (problem, i_n, queries[i_n])
        assert all(all_seen_k[m // BLOCK_M, i_n] for m in full), (problem, i_n, queries[i_n])
    return int(any_seen.sum())


def random_problem():
    """A random ``(Tq, Tk, causal, diag_offset, window)``: edges of the band at any offset, either
    alignment, windows from 0 to wider than T, offsets that leave whole tiles seeing nothing."""
    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, ()))

    Tq, Tk = draw(1, 160), draw(1, 160)
    diag_offset = [Tk - Tq, 0, draw(-Tq - 10, Tk + 10)][draw(0, 2)]
    window = tuple(draw(0, 180) if draw(0, 3) else -1 for _ in range(2))
    return Tq, Tk, bool(draw(0, 1)), diag_offset, window


@pytest.mark.parametrize("blocks", [(32, 32), (16, 64), (64, 16)], ids=lambda b: f"M{b[0]}-N{b[1]}")
def test_tile_ranges(blocks):
    problems = [random_problem() for _ in range(2000)]
    problems += [(Tq, Tk, causal, off, window) for Tq, Tk in ((1, 1), (37, 37)) for causal in (False, True)
                 for off in (0, -5) for window in ((-1, -1), (0, 0), (3, -1), (-1, 3), (100, 100))]
    for problem, probed in zip(problems, probe_ranges(problems, *blocks)):
        check_ranges(problem, probed, *blocks)


def test_window_skips_tiles():
    # T = 2048, window (64, 0): each 32-row tile visits its own key block and the two before it
    # (the first two tiles fewer), 3 of 64 blocks; the causal triangle takes 32.5 on average.
    T, blocks = 2048, (32, 32)
    problems = [(T, T, True, 0, (64, -1)), (T, T, True, 0, (-1, -1))]
    window, causal = (check_ranges(p, r, *blocks) for p, r in zip(problems, probe_ranges(problems, *blocks)))
    assert window == 3 * (T // 32) - 2 - 1
    assert causal == (T // 32) * (T // 32 + 1) // 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_fwd_gpu(case, dtype):
    check_fwd(*case, DTYPES[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_FP32_CASES, ids=case_id)
def test_fwd_gpu_fp32(case):
    check_fwd(*case, torch.float32)


@pytest.mark.gpu
def test_fwd_gpu_strided():
    check_fwd(2, 1000, 1200, 8, 2, 128, True, None, torch.bfloat16, layout="bhtd")


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_FEATURE_CASES, ids=feature_id)
def test_fwd_gpu_features(case):
    *base, window, softcap, alibi = case
    check_fwd(*base, torch.bfloat16, window=window, softcap=softcap, alibi=alibi)
