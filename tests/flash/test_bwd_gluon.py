"""The Gluon dK/dV pass of the Hopper backward (src/ioattn/flash/bwd_gluon.py).

Gluon has no interpreter: without a GPU the kernel is compiled for sm_90 (by
test_fwd_gluon.py's compile test, which builds every Gluon kernel in one child process) and a
config asking for it falls back to the Triton dK/dV kernel; on the H200 the whole backward with
it is checked against the dense reference with the accuracy rule and against the portable
backward, on odd sizes, GQA / MQA, causal with Tq != Tk (both alignments, rows that see no key,
keys that no row sees) and strided inputs, under every candidate the sweep times.
"""
import dataclasses

import pytest
import torch

from ioattn.flash import bwd_gluon, bwd_tma
from ioattn.flash.config import get_tma_bwd_config
from ioattn.testing import make_qkv

from .cases import DEVICE, benchmark_module, case_id
from .test_bwd import check_bwd
from .test_bwd_tma import tma_vs_portable

pytestmark = pytest.mark.skipif(not bwd_gluon.HAS_GLUON, reason="this triton has no Gluon")

def _candidates():
    return benchmark_module("sweep_bwd_tma").GLUON_DKDV


def gluon_config(D, causal, M=64, N=128, stages=2, overlap=False):
    return dataclasses.replace(get_tma_bwd_config(D, torch.bfloat16, causal, interpret=False), BLOCK_M1=M,
                               BLOCK_N1=N, stages1=stages, gluon1=True, overlap1=overlap)


@pytest.fixture
def gluon_calls(monkeypatch):
    """The Gluon launches made during a test, counted (the kernel still runs)."""
    calls = []
    real = bwd_gluon.dkdv_gluon

    def spy(*args, **kw):
        calls.append(args[-1])
        return real(*args, **kw)

    monkeypatch.setattr(bwd_gluon, "dkdv_gluon", spy)
    return calls


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
    with pytest.raises(ValueError, match="BLOCK_M = 128"):
        fwd_pingpong.flash_fwd_pingpong(q, k, v, 0.1, True, 0, config=TmaFwdConfig(64, 64, 4, 2, pingpong=True))
