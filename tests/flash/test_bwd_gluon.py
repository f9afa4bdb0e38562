"""The Gluon dK/dV pass of the Hopper backward (src/ioattn/flash/bwd_gluon.py).

Gluon has no interpreter: without a GPU the kernel is compiled for sm_90 (by
test_fwd_gluon.py's compile test, which builds every Gluon kernel in one child process) and a
config asking for it falls back to the Triton dK/dV kernel; on the H200 the whole backward with
it is checked against the dense reference with the accuracy rule and against the portable
backward, on odd sizes, GQA / MQA, causal with Tq != Tk (both alignments, rows that see no key,
keys that no row sees) and strided inputs, under every candidate the sweep times.

The same kernel's one-pass form (``ADD_DQ``, run by bwd_fused.py where config.py's one-pass
table asks for Gluon) is tested alike, with dK and dV bit-repeatable and dQ within rounding, and
so is bwd_gluon_rows.py's one-pass kernel (the sweep's candidates with ``rows``).
"""
import dataclasses

import pytest
import torch

from ioattn.flash import bwd_gluon, bwd_gluon_rows, bwd_tma
from ioattn.flash.bwd_fused import flash_bwd_fused
from ioattn.flash.config import FusedBwdConfig, get_fused_bwd_config, get_tma_bwd_config
from ioattn.testing import make_qkv

from .cases import DEVICE, benchmark_module, case_id
from .test_bwd import check_bwd
from .test_bwd_fused import check_dkdv_repeat
from .test_bwd_tma import tma_vs_portable, versus_portable

pytestmark = pytest.mark.skipif(not bwd_gluon.HAS_GLUON, reason="this triton has no Gluon")

def _candidates():
    return benchmark_module("sweep_bwd_tma").GLUON_DKDV


def gluon_config(D, causal, M=64, N=128, stages=2, overlap=False):
    return dataclasses.replace(get_tma_bwd_config(D, torch.bfloat16, causal, interpret=False), BLOCK_M1=M,
                               BLOCK_N1=N, stages1=stages, gluon1=True, overlap1=overlap)


def _spy(monkeypatch, name, module=bwd_gluon, calls=None):
    """The launches of ``module.<name>`` made during a test, by config (the kernel still runs),
    appended to ``calls`` (a new list by default)."""
    calls = [] if calls is None else calls
    real = getattr(module, name)

    def spy(*args, **kw):
        calls.append(args[-1])
        return real(*args, **kw)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.fixture
def gluon_calls(monkeypatch):
    return _spy(monkeypatch, "dkdv_gluon")


def test_gluon_config_falls_back_without_gluon(gluon_calls):
    # CPU tensors (the interpreter): the Triton dK/dV kernel runs the same tiles instead.
    if DEVICE == "cuda":
        pytest.skip("the fallback is for CPU tensors")
    cfg = dataclasses.replace(get_tma_bwd_config(64, torch.float16, True, interpret=True), gluon1=True)
    check_bwd(1, 37, 45, 4, 2, 64, True, None, torch.float16, config=cfg, bwd=tma_vs_portable)
    assert not gluon_calls


def test_gluon_dkdv_supported_rules():
    q = torch.empty(1, 8, 2, 128, dtype=torch.bfloat16)
    assert not bwd_gluon.gluon_dkdv_supported(q)  # not on a CUDA device
    if DEVICE == "cuda":
        assert bwd_gluon.gluon_dkdv_supported(q.cuda())
        assert not bwd_gluon.gluon_dkdv_supported(q.cuda().float())
        assert not bwd_gluon.gluon_dkdv_supported(torch.empty(1, 8, 2, 256, dtype=torch.bfloat16, device="cuda"))


# (B, Tq, Tk, H, Hkv, D, causal, diag_offset): odd lengths, Tq > Tk with rows that see no key,
# Tq < Tk with keys that no row sees (top-left causal), GQA 8:2, MQA, MHA, one key block.
GPU_CASES = [
    (2, 1000, 1000, 8, 2, 128, True, None),
    (2, 777, 1200, 8, 1, 128, False, 0),
    (1, 1500, 700, 4, 4, 128, True, None),
    (1, 700, 1500, 4, 2, 128, True, 0),
    (2, 1000, 1000, 8, 8, 64, False, None),
    (1, 2048, 1500, 8, 2, 64, True, None),
    (3, 130, 50, 2, 1, 64, True, None),
    (1, 1, 1, 2, 2, 128, True, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_bwd_gluon_gpu(case, overlap, gluon_calls):
    cfg = gluon_config(case[5], case[6], M=32 if overlap else 64, overlap=overlap)
    check_bwd(*case, torch.bfloat16, config=cfg, bwd=tma_vs_portable)
    assert gluon_calls


@pytest.mark.gpu
def test_bwd_gluon_gpu_fp16_strided(gluon_calls):
    check_bwd(2, 1000, 1200, 8, 2, 128, True, None, torch.float16, layout="bhtd", dout_strided=True,
              config=gluon_config(128, True), bwd=tma_vs_portable)
    assert gluon_calls


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bwd_gluon_gpu_sweep_configs(D, causal, gluon_calls):
    # Every candidate the sweep times passes at an odd GQA shape first.
    for M, N, stages, *overlap in _candidates()[D]:
        check_bwd(1, 1000, 1100, 4, 2, D, causal, None, torch.bfloat16,
                  config=gluon_config(D, causal, M, N, stages, bool(overlap and overlap[0])), bwd=tma_vs_portable)
    assert len(gluon_calls) == len(_candidates()[D])


@pytest.mark.gpu
def test_bwd_gluon_gpu_deterministic():
    # No atomics: dK and dV are bit-equal over runs.
    q, k, v = make_qkv(2, 1000, 1000, 8, 2, 128, dtype=torch.bfloat16, device=DEVICE)
    dout = torch.randn_like(q)
    from ioattn.flash.fwd import flash_fwd_triton

    out, lse = flash_fwd_triton(q, k, v, 128**-0.5, True, 0)
    cfg = gluon_config(128, True, M=32, overlap=True)
    first = bwd_tma.flash_bwd_tma(dout, q, k, v, out, lse, 128**-0.5, True, 0, config=cfg)
    for _ in range(5):
        for a, b in zip(first, bwd_tma.flash_bwd_tma(dout, q, k, v, out, lse, 128**-0.5, True, 0, config=cfg)):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_bwd_gluon_gpu_env_switch(monkeypatch, gluon_calls):
    # IOATTN_GLUON=0 keeps the Triton dK/dV kernel even when the config asks for Gluon.
    monkeypatch.setenv("IOATTN_GLUON", "0")
    check_bwd(1, 500, 500, 4, 2, 128, True, None, torch.bfloat16, config=gluon_config(128, True),
              bwd=tma_vs_portable)
    assert not gluon_calls


def test_sweep_tiles_map_to_configs():
    # sweep_bwd_tma.py --gluon times the Triton dK/dV tiles beside the Gluon ones: each must
    # reach the kernel it names (an earlier version read the Triton 4-tuple as a Gluon entry).
    sweep = benchmark_module("sweep_bwd_tma")
    base = get_tma_bwd_config(128, torch.bfloat16, False, interpret=False)
    triton_tiles = sweep.with_pass(base, "dkdv", sweep.TRITON_DKDV[128])
    assert not triton_tiles.gluon1 and not triton_tiles.overlap1
    assert (triton_tiles.BLOCK_M1, triton_tiles.BLOCK_N1, triton_tiles.warps1,
            triton_tiles.stages1) == sweep.TRITON_DKDV[128]
    for entry in sweep.GLUON_DKDV[128]:
        cfg = sweep.with_pass(base, "dkdv", entry)
        assert cfg.gluon1 and (cfg.BLOCK_M1, cfg.BLOCK_N1, cfg.stages1, cfg.overlap1) == tuple(entry)
        assert (cfg.BLOCK_M2, cfg.BLOCK_N2, cfg.warps2, cfg.stages2) == (base.BLOCK_M2, base.BLOCK_N2, base.warps2,
                                                                          base.stages2)


def test_config_table_uses_gluon_where_it_won():
    # D = 128 in fp16 / bf16 beyond the short lengths; never in the interpreter, at D = 64 or in fp32.
    for causal in (False, True):
        for dtype in (torch.float16, torch.bfloat16):
            assert get_tma_bwd_config(128, dtype, causal, interpret=False, seqlen=4096).gluon1
            assert get_tma_bwd_config(128, dtype, causal, interpret=False, seqlen=0).gluon1
            assert not get_tma_bwd_config(128, dtype, causal, interpret=False, seqlen=1024).gluon1
            assert not get_tma_bwd_config(128, dtype, causal, interpret=True, seqlen=4096).gluon1
        assert not get_tma_bwd_config(64, torch.bfloat16, causal, interpret=False, seqlen=4096).gluon1
        assert not get_tma_bwd_config(128, torch.float32, causal, interpret=False, seqlen=4096).gluon1


def test_gluon_launchers_reject_tiles_they_cannot_run():
    # Raised before any compile or launch, so this runs without a GPU.
    from ioattn.flash import fwd_pingpong
    from ioattn.flash.config import TmaFwdConfig

    q, k, v = make_qkv(1, 64, 64, 2, 1, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="BLOCK_N1 = 128"):
        bwd_gluon.dkdv_gluon(q, k, v, q, torch.empty(1, 2, 64), torch.empty(1, 2, 64), k, v, 0.1, True, 0,
                             gluon_config(128, True, N=64))
    with pytest.raises(ValueError, match=r"BLOCK_M = 64 \* warpgroups"):
        fwd_pingpong.flash_fwd_pingpong(q, k, v, 0.1, True, 0, config=TmaFwdConfig(64, 64, 4, 2, pingpong=True))


# The one-pass form (ADD_DQ, launched by bwd_fused.py): the same kernel also adds each step's dS·k
# into an fp32 buffer, half of dQ's columns per warpgroup.

def _fused_candidates():
    return benchmark_module("sweep_bwd_fused").gluon_configs()


def fused_config(D=128, causal=True):
    return get_fused_bwd_config(D, torch.bfloat16, causal, interpret=False, seqlen=0, gluon=True) or \
        _fused_candidates()[D][0]


@pytest.fixture
def fused_calls(monkeypatch):
    # Either Gluon one-pass kernel: bwd_gluon.py's, or bwd_gluon_rows.py's for configs with rows.
    return _spy(monkeypatch, "fused_gluon_rows", bwd_gluon_rows, _spy(monkeypatch, "fused_gluon"))


fused_vs_portable = versus_portable(flash_bwd_fused)


def test_fused_gluon_config_falls_back_without_gluon(fused_calls):
    # CPU tensors (the interpreter): the Triton one-pass kernel runs the same tiles instead.
    if DEVICE == "cuda":
        pytest.skip("the fallback is for CPU tensors")
    cfg = FusedBwdConfig(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2, gluon=True)
    check_bwd(1, 37, 45, 4, 2, 64, True, None, torch.float16, config=cfg, bwd=fused_vs_portable)
    assert not fused_calls


def test_fused_config_table_gluon_entries(monkeypatch):
    # The Gluon one-pass kernel runs where the table has an entry for (D, causal) and the sequence
    # is long enough, never without Gluon, in the interpreter or in fp32. Elsewhere D = 128 runs
    # the two-pass backward (None) and D = 64 its Triton one-pass kernel from 16384 keys on.
    from ioattn.flash import config

    made_up = {(128, False): (4096, FusedBwdConfig(64, 128, 4, 3, tma_reduce=True, gluon=True)),
               (128, True): (2048, FusedBwdConfig(64, 128, 4, 2, gluon=True, dq_early=True)),
               (64, False): (8192, FusedBwdConfig(128, 128, 4, 2, tma_reduce=True, gluon=True, rows=True))}
    for table in (config.GLUON_FUSED_BWD, made_up):
        monkeypatch.setattr(config, "GLUON_FUSED_BWD", table)
        for D in (64, 128):
            for causal in (False, True):
                entry = table.get((D, causal))
                for dtype in (torch.float16, torch.bfloat16):
                    cfg = get_fused_bwd_config(D, dtype, causal, interpret=False, seqlen=16384, gluon=True)
                    no_gluon = get_fused_bwd_config(D, dtype, causal, interpret=False, seqlen=16384)
                    if D == 128:
                        assert no_gluon is None
                    else:
                        assert not no_gluon.gluon
                    if entry is None:
                        assert cfg == no_gluon
                    else:
                        assert cfg == entry[1] and cfg.gluon
                        short = get_fused_bwd_config(D, dtype, causal, interpret=False, seqlen=entry[0] - 1,
                                                     gluon=True)
                        assert short is None or not short.gluon
                    assert not get_fused_bwd_config(D, dtype, causal, interpret=True, seqlen=16384, gluon=True).gluon
                assert get_fused_bwd_config(D, torch.float32, causal, interpret=False, seqlen=16384,
                                            gluon=True) is None
                # GQA: the same entries, over K and V repeated to the query heads where causal
                # from GQA_EXPAND_CAUSAL_MIN_SEQLEN, with the kernel's own GQA below that and
                # for full attention.
                gqa = get_fused_bwd_config(D, torch.bfloat16, causal, interpret=False, seqlen=16384, gluon=True,
                                           group=8)
                if entry is None:
                    assert gqa is None if D == 128 else not gqa.gluon
                else:
                    assert gqa == dataclasses.replace(entry[1], expand_kv=causal)
                    first = max(entry[0], config.GQA_MIN_SEQLEN)
                    if first < config.GQA_EXPAND_CAUSAL_MIN_SEQLEN:
                        own = get_fused_bwd_config(D, torch.bfloat16, causal, interpret=False, gluon=True, group=8,
                                                   seqlen=first)
                        grouped = causal and entry[1].rows and first <= config.HEAD_GROUPS_MAX_SEQLEN
                        assert own == dataclasses.replace(entry[1], expand_kv=False, head_groups=grouped)
                    # Not below GQA_MIN_SEQLEN.
                    short = get_fused_bwd_config(D, torch.bfloat16, causal, interpret=False, gluon=True, group=8,
                                                 seqlen=max(entry[0], config.GQA_MIN_SEQLEN) - 1)
                    assert short is None or not short.gluon


def test_fused_gluon_rejects_what_it_cannot_run():
    q, k, v = make_qkv(1, 64, 64, 2, 1, 128, dtype=torch.bfloat16)
    lse = torch.empty(1, 2, 64)
    dq_acc = torch.zeros(q.shape)
    with pytest.raises(ValueError, match="BLOCK_M = 64"):
        bwd_gluon.fused_gluon(q, k, v, q, lse, lse, k, v, dq_acc, 0.1, True, 0,
                              FusedBwdConfig(32, 128, 4, 2, gluon=True))
    with pytest.raises(ValueError, match="dq_acc"):
        bwd_gluon.fused_gluon(q, k, v, q, lse, lse, k, v, dq_acc.half(), 0.1, True, 0, fused_config())
    rows = FusedBwdConfig(128, 128, 4, 2, tma_reduce=True, gluon=True, rows=True)
    with pytest.raises(ValueError, match="BLOCK_M in"):
        bwd_gluon_rows.fused_gluon_rows(q, k, v, q, lse, lse, k, v, dq_acc, 0.1, True, 0,
                                        dataclasses.replace(rows, BLOCK_M=32))
    with pytest.raises(ValueError, match="dq_acc"):
        bwd_gluon_rows.fused_gluon_rows(q, k, v, q, lse, lse, k, v, dq_acc.half(), 0.1, True, 0, rows)
    with pytest.raises(ValueError, match="dq_rows needs BLOCK_M = 128"):
        bwd_gluon_rows.fused_gluon_rows(q, k, v, q, lse, lse, k, v, dq_acc, 0.1, True, 0,
                                        dataclasses.replace(rows, BLOCK_M=64, dq_rows=True))


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_bwd_fused_gluon_gpu(case, fused_calls):
    for cfg in _fused_candidates()[case[5]]:
        check_bwd(*case, torch.bfloat16, config=cfg, bwd=fused_vs_portable)
    assert len(fused_calls) == len(_fused_candidates()[case[5]])


@pytest.mark.gpu
def test_bwd_fused_gluon_gpu_fp16_strided(fused_calls):
    check_bwd(2, 1000, 1200, 8, 2, 128, True, None, torch.float16, layout="bhtd", dout_strided=True,
              config=fused_config(), bwd=fused_vs_portable)
    assert fused_calls


# bwd_gluon_rows.py's kernel at D = 128 (64-row steps; the only size whose shared memory fits).
ROWS_128 = FusedBwdConfig(64, 128, 4, 2, tma_reduce=True, gluon=True, rows=True)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [False, True], ids=["cols", "rows"])
def test_bwd_fused_gluon_gpu_empty_rows(rows, fused_calls):
    # Tq > Tk, bottom-right: rows 0..999 see no key, so nothing is added to their dq.
    dq, _, _ = check_bwd(1, 1300, 300, 4, 2, 128, True, None, torch.bfloat16,
                         config=ROWS_128 if rows else fused_config(), bwd=fused_vs_portable)
    assert torch.all(dq[:, :1000] == 0)
    assert fused_calls


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [False, True], ids=["cols", "rows"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bwd_fused_gluon_gpu_dkdv_deterministic(causal, rows, fused_calls):
    check_dkdv_repeat(ROWS_128 if rows else fused_config(128, causal), causal)
    assert fused_calls


@pytest.mark.gpu
def test_flash_attn_func_takes_the_gluon_one_pass_where_the_table_says(monkeypatch, fused_calls):
    # flash_attn_func's default backward (deterministic=False) at a length a table entry covers,
    # GQA's too (T = 4096, causal: the kernel's own GQA; from 8192 over K and V repeated to the
    # query heads); deterministic=True keeps the two-pass one. All pass the accuracy rule.
    from ioattn import flash_attn_func
    from ioattn.flash import config
    from ioattn.flash.reference import attention_ref
    from ioattn.testing import assert_close

    monkeypatch.setattr(config, "GLUON_FUSED_BWD",
                        {(128, True): (2048, FusedBwdConfig(64, 128, 4, 2, tma_reduce=True, gluon=True))})
    for h_kv, calls in ((4, [1, 1]), (2, [2, 2])):
        q, k, v = make_qkv(1, 4096, 4096, 4, h_kv, 128, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
        dout = torch.randn_like(q)
        ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
        base_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        ref_grads = torch.autograd.grad(attention_ref(*ref_in, causal=True, upcast=True)[0], ref_in, dout.double())
        base_grads = torch.autograd.grad(attention_ref(*base_in, causal=True, upcast=False)[0], base_in, dout)
        for deterministic, n in zip((False, True), calls):
            grads = torch.autograd.grad(flash_attn_func(q, k, v, causal=True, deterministic=deterministic),
                                        (q, k, v), dout)
            # The first call of each (MHA, then GQA) takes it; the deterministic calls add none.
            assert len(fused_calls) == n
            for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
                assert_close(name, g, r, b, factor=3)


# Programs started key block by key block over groups of heads (FusedBwdConfig.head_groups), in
# the row-held kernel's D = 64 and D = 128 forms: groups of one head and of several, GQA, causal
# with Tq != Tk both ways, full attention.
HEAD_GROUP_CASES = [
    (4, 1000, 1000, 8, 2, 64, True, None),
    (2, 1100, 1000, 4, 4, 64, True, None),
    (2, 700, 1500, 8, 8, 64, True, 0),
    (3, 130, 50, 2, 1, 64, True, None),
    (2, 1000, 1000, 8, 8, 64, False, None),
    (2, 1000, 1000, 8, 2, 128, True, None),
    (1, 1500, 700, 4, 4, 128, True, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 2, 0], ids=["one", "two", "l2"])
@pytest.mark.parametrize("case", HEAD_GROUP_CASES, ids=case_id)
def test_bwd_rows_gluon_gpu_head_groups(case, group, fused_calls, monkeypatch):
    # The group size is a function of the shapes and the device (so launch_site's keys need not
    # name it); forced here, each test starts without call sites another group size made.
    from ioattn import launch as launch_mod

    monkeypatch.setattr(launch_mod, "_SITES", {})
    if group:
        monkeypatch.setattr(bwd_gluon_rows, "head_group", lambda q, k: group if (q.shape[0] * k.shape[2]) % group == 0
                            else 1)
    base = FusedBwdConfig(128, 128, 4, 2, tma_reduce=True, gluon=True, rows=True, dq_rows=True, s_ahead=True) \
        if case[5] == 64 else ROWS_128
    cfg = dataclasses.replace(base, head_groups=True)
    check_bwd(*case, torch.bfloat16, config=cfg, bwd=fused_vs_portable)
    assert fused_calls and all(c == cfg for c in fused_calls)


def test_head_groups_on_causal_row_held_entries():
    # On the causal entries of the row-held kernel up to HEAD_GROUPS_MAX_SEQLEN keys; not beyond,
    # not for full attention.
    from ioattn.flash import config

    for D in (64, 128):
        for T in (2048, 4096, config.HEAD_GROUPS_MAX_SEQLEN, 16384):
            causal_cfg = get_fused_bwd_config(D, torch.bfloat16, True, interpret=False, seqlen=T, gluon=True)
            assert causal_cfg.rows and causal_cfg.head_groups == (T <= config.HEAD_GROUPS_MAX_SEQLEN)
            full = get_fused_bwd_config(D, torch.bfloat16, False, interpret=False, seqlen=T, gluon=True)
            assert not full.head_groups
        assert not get_fused_bwd_config(D, torch.bfloat16, True, interpret=False, seqlen=0, gluon=True).head_groups


def test_head_group_fits_half_the_l2(monkeypatch):
    # The most heads that divide B x H_kv and whose inputs and fp32 dQ fit half the L2 cache.
    monkeypatch.setattr(bwd_gluon_rows, "l2_bytes", lambda device: 60 * 2**20)
    for T, B, want in ((1024, 16, 32), (2048, 8, 16), (4096, 4, 8), (8192, 2, 4), (16384, 1, 2)):
        q, k, _ = make_qkv(B, T, T, 32, 32, 64, dtype=torch.bfloat16, device="meta")
        assert bwd_gluon_rows.head_group(q, k) == want, T
    # GQA: a KV head carries its query heads' Q, dO and dQ. 12 heads of 6 MB: 5 fit, 4 divides.
    q, k, _ = make_qkv(3, 8192, 8192, 16, 4, 64, dtype=torch.bfloat16, device="meta")
    per_head = 4 * 8192 * 64 * 8 + 2 * 8192 * 64 * 2
    assert bwd_gluon_rows.head_group(q, k) == max(g for g in range(1, 13) if 12 % g == 0 and g * per_head <= 30 * 2**20)
