"""The Gluon forward for Hopper (src/ioattn/flash/fwd_gluon.py).

Gluon has no interpreter: without a GPU the kernel is compiled for sm_90 and ptxas must report
no spills for the configs the sweep times; on the H200 its results are checked against the dense
reference with the accuracy rule, on odd sizes, GQA / MQA, causal with Tq != Tk (both
alignments, rows that see no key) and strided inputs.
"""
import dataclasses

import pytest
import torch

from ioattn.flash import fwd_gluon, fwd_persistent, fwd_pingpong, gluon_exp2
from ioattn.flash.config import TmaFwdConfig
from ioattn.testing import make_qkv
from tests.compile_child import child_report, programs_per_sm

from . import cases
from .cases import DEVICE, DTYPES, case_id
from .test_fwd import check_fwd

pytestmark = pytest.mark.skipif(not fwd_gluon.HAS_GLUON, reason="this triton has no Gluon")


def _dkdv_candidates():
    return cases.benchmark_module("sweep_bwd_tma").GLUON_DKDV


def _fused_candidates():
    return cases.benchmark_module("sweep_bwd_fused").gluon_configs()


def _sweep_candidates():
    return cases.benchmark_module("sweep_fwd_tma").GLUON_CANDIDATES


def gluon_fwd(q, k, v, scale, causal, offset, *, config=None, window, softcap, alibi_slopes):
    """The Gluon forward that runs ``config`` behind check_fwd's launcher signature (it has none
    of the features)."""
    assert tuple(window) == (-1, -1) and not softcap and alibi_slopes is None
    config = config or CONFIG
    return fwd_pingpong.gluon_launcher(config)(q, k, v, scale, causal, offset, config=config)


CONFIG = TmaFwdConfig(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)


def test_gluon_kernels_compile_for_sm90_without_spills():
    report = child_report("tests.flash.gluon_ptxas", timeout=600)
    # bwd_gluon.py's kernel too, as dK/dV pass and as one-pass backward (one child process
    # compiles every Gluon kernel).
    expected = 2 * sum(len(c) for cands in (_sweep_candidates(), _dkdv_candidates(), _fused_candidates())
                       for c in cands.values())
    assert len(report) == expected, report
    # No spills, except bwd_gluon.py's 64-row query steps at D = 128, kept in the sweeps with
    # their few spilled bytes (sweep_bwd_tma.py's GLUON_DKDV says why; the one-pass form holds
    # dQ's half-width accumulator and its addresses on top), and the persistent forward's, which
    # keeps its tile loop's indices beside the ping-pong kernel's registers: they are spilled
    # around the key loops, not in them (one register's load and store a step, causal at D = 128).
    def spill_cap(name):
        if name.startswith("dkdv D128 64x") and "overlap" not in name:
            return 256
        if name.startswith("fused D128"):
            return 1100 if " tma" not in name else 640
        if " cap" in name:
            return 16  # the register cap that fits four 64-row programs an SM (config.py)
        return 512 if "persistent" in name or name.startswith("rows") else 0

    assert all(r["spills"] <= spill_cap(name) for name, r in report.items()), report
    # Full attention's step loop (one per warpgroup) spills at most 24 local loads/stores a step
    # with the bulk-reduced dQ, in both one-pass kernels (bwd_gluon_rows.py's 128-row steps at
    # D = 64 spill a little).
    hot = {name: r["loop_spills_each"] for name, r in report.items()
           if (name.startswith("fused D128") and " tma" in name or name.startswith("rows")) and "causal=False" in name}
    assert hot and all(len(each) == 2 for each in hot.values()), hot
    assert all(max(each) <= 24 for each in hot.values()), hot
    forwards = {name: r for name, r in report.items() if name.startswith("D")}
    assert forwards and all(r["loop_spills"] <= (2 if "persistent" in name or " cap" in name else 0)
                            for name, r in forwards.items()), forwards
    # Some wgmma wait leaves work in flight: the forwards' P·V during the softmax ("1"); the
    # dK/dV kernel's dPᵀ (and with overlap1 the previous block's dV, dK) during Pᵀ.
    assert all(r["waits"].strip("0") for r in report.values()), report
    # Within Hopper's 227 KB of shared memory per block.
    assert all(r["smem"] <= 232448 for r in report.values()), report
    # The register-capped one-warpgroup forward (the table's D = 64 short causal config) fits
    # four programs an SM, what its cap and V's shallower ring are for (config.py).
    capped = {name: r for name, r in report.items() if name.startswith("D64 64x64") and " v2 cap128" in name}
    assert capped and all(programs_per_sm(r["regs"], r["smem"], 4) == 4 for r in capped.values()), capped
    # The ping-pong kernel's two compute warpgroups get 240 registers each, its loader 24; with
    # three warpgroups the two workers get 160 (the default partition the rest).
    pingpong = [(r, {"160", "24"} if " wg3" in name else {"240", "24"}) for name, r in report.items() if " pp" in name]
    assert pingpong and all(regs <= set(r["setmaxnreg"]) for r, regs in pingpong), pingpong
    assert any(regs == {"160", "24"} for _, regs in pingpong)
    dkdv = [r for name, r in report.items() if name.startswith(("dkdv", "fused"))]
    assert dkdv and all({"240", "24"} <= set(r["setmaxnreg"]) for r in dkdv), dkdv


GPU_CASES = [c for c in cases.GPU_CASES if c[5] in (64, 128)] + [
    (2, 777, 900, 8, 2, 128, False, None),
    (1, 1000, 1100, 4, 2, 128, True, -300),
    (1, 1, 1, 2, 2, 64, True, None),
    (3, 130, 130, 2, 1, 64, True, None),
    # More tiles than the H200's 132 SMs: the persistent kernel's programs take several each,
    # some without a visible key (bottom-right causal, Tq > Tk).
    (4, 2000, 2000, 16, 4, 128, False, None),
    (2, 3000, 700, 16, 2, 128, True, None),
]


# Every kernel: without warp specialization (128-row tiles, 8 warps), with it (one loader warp,
# 64-row tiles), and the ping-pong one (two warpgroups of 64 rows) with and without its turns,
# each also in its persistent form.
KERNELS = {
    "plain": CONFIG,
    "plain-64": TmaFwdConfig(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    # V's ring shallower than K's, registers capped (four programs an SM at D = 64).
    "v2-cap": TmaFwdConfig(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, v_stages=2, maxnreg=128),
    "ws": TmaFwdConfig(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, warp_specialize=True),
    "pingpong": TmaFwdConfig(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, pingpong=True),
    "free": TmaFwdConfig(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3, pingpong=True, turns=False),
    "persistent": TmaFwdConfig(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, pingpong=True, persistent=True),
    "persistent-free": TmaFwdConfig(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3, pingpong=True, turns=False,
                                    persistent=True),
    # One exponential in 4 (8) by fwd_gluon.py's polynomial instead of the SFU.
    "pingpong-emu4": TmaFwdConfig(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, pingpong=True, exp2_emu=4),
    "free-emu8": TmaFwdConfig(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3, pingpong=True, turns=False,
                              exp2_emu=8),
    # P cast to 16 bits right after each softmax.
    "pingpong-early": TmaFwdConfig(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, pingpong=True, p_early=True),
    "free-early-emu4": TmaFwdConfig(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3, pingpong=True, turns=False,
                                    p_early=True, exp2_emu=4),
    # A last key block that a warpgroup's rows see only half of, run at half width: causal
    # diagonals, and full attention when Tk ends in the first half of a block.
    "pingpong-half": TmaFwdConfig(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, pingpong=True,
                                  half_last=True),
    "free-half": TmaFwdConfig(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, pingpong=True, turns=False,
                              half_last=True),
    "persistent-half": TmaFwdConfig(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, pingpong=True,
                                    persistent=True, half_last=True),
    "pingpong-early-half": TmaFwdConfig(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, pingpong=True,
                                        p_early=True, half_last=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_fwd_gluon_gpu(case, dtype, kernel):
    check_fwd(*case, DTYPES[dtype], fwd=gluon_fwd, config=KERNELS[kernel])


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_fwd_gluon_gpu_strided(kernel):
    cfg = KERNELS[kernel]
    check_fwd(2, 1000, 1200, 8, 2, 64, True, None, torch.bfloat16, layout="bhtd", fwd=gluon_fwd, config=cfg)
    check_fwd(2, 1000, 1000, 8, 8, 128, False, None, torch.bfloat16, layout="bhtd", fwd=gluon_fwd, config=cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["persistent", "persistent-free", "persistent-half"])
@pytest.mark.parametrize("B, Tq, Tk, H, Hkv", [
    # n_m = 8 row tiles a head (four pairs each), 1024 pairs: eight on 100 of the H200's 132
    # programs, seven on the others.
    (16, 1024, 1024, 16, 16),
    # n_m = 7 (the middle tile of one head pairs with the next head's longest), 21 tiles: the
    # last pair a single tile, fewer pairs (11) than SMs.
    (1, 800, 800, 3, 3),
    # 3 x 5 x 3 = 45 tiles, odd; GQA; Tq < Tk (bottom-right: every row tile sees keys) and
    # Tq > Tk (the first row tiles see none).
    (3, 333, 1000, 5, 1),
    (2, 1100, 300, 6, 3),
])
def test_fwd_persistent_causal_pairs(kernel, B, Tq, Tk, H, Hkv):
    # Causal tiles in pairs of equal work (fwd_persistent.py): whatever the count of tiles, odd
    # or even, per head or in all, every tile is computed once and only once.
    for D, dtype in ((128, torch.bfloat16), (64, torch.float16)):
        check_fwd(B, Tq, Tk, H, Hkv, D, True, None, dtype, fwd=gluon_fwd, config=KERNELS[kernel])


def test_persistent_programs():
    # Off a GPU the launcher counts 4 SMs; causal launches count pairs of tiles.
    q = torch.empty(1)
    assert [fwd_persistent.persistent_programs(q, n, False) for n in (1, 3, 4, 9)] == [1, 3, 4, 4]
    assert [fwd_persistent.persistent_programs(q, n, True) for n in (1, 2, 3, 7, 8, 9)] == [1, 1, 2, 4, 4, 4]


# D = 256: the ping-pong kernel at 64-key blocks, with and without turns (config.py's GLUON_FWD_256).
KERNELS_256 = {"pingpong-256": TmaFwdConfig(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2, pingpong=True),
               "free-256": TmaFwdConfig(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2, pingpong=True,
                                        turns=False)}


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", list(KERNELS_256))
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("case", [(1, 1, 1, 2, 2, 256, True, None), (2, 333, 333, 4, 4, 256, False, None),
                                  (2, 777, 900, 8, 2, 256, True, None), (1, 1000, 1100, 4, 1, 256, True, -300),
                                  (1, 1100, 300, 4, 2, 256, True, None), (3, 2000, 2000, 8, 8, 256, False, None)],
                         ids=case_id)
def test_fwd_gluon_gpu_256(case, dtype, kernel):
    check_fwd(*case, DTYPES[dtype], fwd=gluon_fwd, config=KERNELS_256[kernel])


def test_pingpong_256_config_checked():
    # D = 256 fits 64-key blocks only, and not the persistent form's O buffers.
    q = torch.empty(1, 128, 2, 256, dtype=torch.bfloat16)
    for bad in (dict(BLOCK_N=128), dict(persistent=True)):
        cfg = dataclasses.replace(KERNELS_256["pingpong-256"], **bad)
        with pytest.raises(ValueError, match="64 and not persistent at D = 256"):
            fwd_pingpong.flash_fwd_pingpong(q, q, q, 0.1, False, 0, config=cfg)


# Three warpgroups of 64 rows sharing each K/V tile (D = 64 only), with and without turns.
KERNELS_WG3 = {
    "pingpong-wg3": TmaFwdConfig(BLOCK_M=192, BLOCK_N=64, num_warps=4, num_stages=3, pingpong=True, warpgroups=3),
    "free-wg3": TmaFwdConfig(BLOCK_M=192, BLOCK_N=64, num_warps=4, num_stages=4, pingpong=True, turns=False,
                             warpgroups=3),
    "pingpong-wg3-early": TmaFwdConfig(BLOCK_M=192, BLOCK_N=128, num_warps=4, num_stages=2, pingpong=True,
                                       warpgroups=3, p_early=True),
    # 192-row tiles against 128-key blocks: a warpgroup may see half of the last block, or none.
    "pingpong-wg3-early-half": TmaFwdConfig(BLOCK_M=192, BLOCK_N=128, num_warps=4, num_stages=2, pingpong=True,
                                            warpgroups=3, p_early=True, half_last=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", list(KERNELS_WG3))
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("case", [c for c in GPU_CASES if c[5] == 64] + [(2, 1000, 1000, 8, 2, 64, False, None),
                                                                        (1, 700, 385, 4, 4, 64, True, -100)],
                         ids=case_id)
def test_fwd_gluon_gpu_three_warpgroups(case, dtype, kernel):
    # 192-row programs: Tq not a multiple of 192, causal tiles whose first warpgroup sees no key
    # in the program's last blocks, rows without any key (bottom-right, Tq > Tk).
    check_fwd(*case, DTYPES[dtype], fwd=gluon_fwd, config=KERNELS_WG3[kernel])
    check_fwd(2, 1000, 1200, 8, 2, 64, True, None, torch.bfloat16, layout="bhtd", fwd=gluon_fwd,
              config=KERNELS_WG3[kernel])


def test_half_last_config_checked():
    # The half-width last step is for 128-key blocks (64 keys), the width the GPU tests run.
    cfg = TmaFwdConfig(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3, pingpong=True, half_last=True)
    q, k, v = make_qkv(1, 64, 64, 2, 2, 64, dtype=torch.bfloat16, device="cpu")
    with pytest.raises(ValueError, match="half_last"):
        fwd_pingpong.flash_fwd_pingpong(q, k, v, 0.1, True, 0, config=cfg)



def test_v_stages_and_cap_config_checked():
    # V's own ring depth and the register cap are the one-warpgroup kernel's, not the
    # loader-warp kernel's (which sizes its registers itself); negative values are refused.
    q, k, v = make_qkv(1, 64, 64, 2, 2, 64, dtype=torch.bfloat16, device="cpu")
    for cfg in (TmaFwdConfig(64, 64, 4, 3, warp_specialize=True, v_stages=2),
                TmaFwdConfig(64, 64, 4, 3, warp_specialize=True, maxnreg=128),
                TmaFwdConfig(64, 64, 4, 3, v_stages=-1)):
        with pytest.raises(ValueError, match="v_stages and maxnreg"):
            fwd_gluon.flash_fwd_gluon(q, k, v, 0.1, True, 0, config=cfg)

@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["pingpong-half", "persistent-half"])
@pytest.mark.parametrize("T_q, T_k", [(256, 256), (300, 200), (200, 300), (1000, 1064), (129, 1)])
def test_fwd_gluon_gpu_half_last_equals_full_step(kernel, T_q, T_k):
    # The half-width step skips only keys that every row of its warpgroup has masked, so it
    # matches the full-width kernel up to summation order: the output within one bf16 rounding,
    # lse within 1e-5, on causal diagonals of both alignments and a Tk ending in the first half
    # of a block (and on full attention, where these lengths make Tk end there too).
    config = KERNELS[kernel]
    q, k, v = make_qkv(2, T_q, T_k, 4, 2, 128, dtype=torch.bfloat16, device=DEVICE)
    for causal in (True, False):
        out, lse = fwd_pingpong.flash_fwd_pingpong(q, k, v, 0.088, causal, 0, config=config)
        ref, ref_lse = fwd_pingpong.flash_fwd_pingpong(q, k, v, 0.088, causal, 0,
                                                      config=dataclasses.replace(config, half_last=False))
        assert (out.float() - ref.float()).abs().max().item() <= 2.0**-7 * ref.float().abs().max().item()
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
        finite = torch.isfinite(ref_lse)
        assert (lse[finite] - ref_lse[finite]).abs().max().item() <= 1e-5


def test_three_warpgroups_config_checked():
    # Three warpgroups hold 192 rows, at D <= 64 only (their registers), never persistent.
    wg3 = TmaFwdConfig(BLOCK_M=192, BLOCK_N=64, num_warps=4, num_stages=3, pingpong=True, warpgroups=3)
    for D, cfg in ((128, wg3), (64, dataclasses.replace(wg3, BLOCK_M=128)),
                   (64, dataclasses.replace(wg3, warpgroups=4)), (64, dataclasses.replace(wg3, persistent=True))):
        q, k, v = make_qkv(1, 64, 64, 2, 2, D, dtype=torch.bfloat16, device="cpu")
        with pytest.raises(ValueError, match="warpgroups"):
            fwd_pingpong.flash_fwd_pingpong(q, k, v, 0.1, False, 0, config=cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("emu", [2, 4, 8])
@pytest.mark.parametrize("D", [64, 128])
def test_fwd_gluon_gpu_exp2_emu_rows_without_keys(D, emu):
    # Tq > Tk, bottom-right: rows 0..999 see no key, so every exponential of theirs is 2^-inf;
    # the polynomial must give exactly 0 there (l = 0: output 0, lse -inf), as the SFU does.
    cfg = TmaFwdConfig(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, pingpong=True, exp2_emu=emu)
    out, lse = check_fwd(1, 1300, 300, 4, 2, D, True, None, torch.bfloat16, fwd=gluon_fwd, config=cfg)
    assert torch.all(out[:, :1000] == 0) and torch.all(lse[:, :, :1000] == float("-inf"))
    # NaN in a score stays NaN in that row's output (not rounded into a number).
    q, k, v = make_qkv(1, 300, 300, 4, 2, D, dtype=torch.bfloat16, device=DEVICE)
    q[0, 7, 1, 3] = float("nan")
    out, _ = gluon_fwd(q, k, v, 0.1, False, 0, config=cfg, window=(-1, -1), softcap=0.0, alibi_slopes=None)
    assert torch.isnan(out[0, 7, 1]).all() and not torch.isnan(out[0, 8]).any()


def test_exp2_polynomial_is_continuous_at_integers():
    # The polynomial of gluon_exp2.py's _exp2, read from its PTX and evaluated as the PTX does
    # (fp32, fused multiply-adds rounded once). A row's largest score shifts to 0, or by its
    # FMA's rounding to just below 0 (j = -1, f ~ 1): both must give 1 to far below the
    # accuracy rule's bounds (free ends of the fit gave 1 - 7.5e-5 and 1 - 8.6e-5 there, and a
    # one-key row's lse failed in GPU tests). No GPU needed.
    import re

    import numpy as np

    asm = gluon_exp2._exp2_asm(2)
    # Horner's three FMAs: fr * c3 + c2, then * fr + c1, then * fr + c0.
    fmas = [line for line in asm.splitlines() if line.startswith("fma.rn.f32 p,")]
    c3, c2, c1, c0 = [np.frombuffer(bytes.fromhex(h), ">f4")[0].astype(np.float32)
                      for line in fmas for h in re.findall(r"0f([0-9A-F]{8})", line)]

    def fma(a, b, c):
        return np.float32(np.float64(a) * np.float64(b) + np.float64(c))

    def emu(x):
        x = np.float32(x)
        j = np.float32(np.floor(x))
        fr = np.float32(x - j)
        p = fma(fma(fma(fr, c3, c2), fr, c1), fr, c0)
        return np.float64(p) * 2.0 ** np.float64(j)

    assert c0 == 1.0
    near = [0.0, -3e-8, -1e-7, -1.0, np.nextafter(np.float32(-1), np.float32(0)), -2.0]
    assert all(abs(emu(x) / 2.0 ** np.float64(np.float32(x)) - 1) < 1e-6 for x in near)
    xs = np.linspace(-30, 0, 30001, dtype=np.float32)
    assert max(abs(emu(x) / 2.0 ** np.float64(x) - 1) for x in xs) < 1.1e-4


def test_exp2_emu_config_checked():
    q, k, v = make_qkv(1, 64, 64, 2, 2, 64, dtype=torch.bfloat16, device="cpu")
    for bad in (dict(exp2_emu=3), dict(exp2_emu=4, persistent=True)):
        cfg = TmaFwdConfig(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, pingpong=True, **bad)
        with pytest.raises(ValueError, match="exp2_emu"):
            fwd_pingpong.flash_fwd_pingpong(q, k, v, 0.1, False, 0, config=cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fwd_gluon_gpu_sweep_configs(D, causal):
    # Every candidate the sweep times passes the accuracy rule at an odd GQA shape first.
    for c in _sweep_candidates()[D]:
        check_fwd(1, 1000, 1100, 4, 2, D, causal, None, torch.bfloat16, fwd=gluon_fwd,
                  config=TmaFwdConfig(*c))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fwd_gluon_gpu_table_configs(D, causal):
    # Every config the table picks on the paper grid's lengths, at an odd GQA shape.
    from ioattn.flash.config import get_gluon_fwd_config
    configs = {get_gluon_fwd_config(D, torch.bfloat16, causal, T) for T in (1024, 2048, 4096, 8192, 16384)}
    for config in configs - {None}:
        check_fwd(1, 1000, 1100, 4, 2, D, causal, None, torch.bfloat16, fwd=gluon_fwd, config=config)


@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gluon_desc_matches_checked_constructor(layout, dtype):
    # _desc fills the descriptor in without the dataclass's checks: it must equal the checked one
    # field by field (a field added to the dataclass would show up here). No GPU needed.
    q, _, _ = make_qkv(2, 37, 45, 4, 2, 64, dtype=DTYPES[dtype], device="cpu", layout=layout)
    layout64 = fwd_gluon._smem_layout(32, 64, q.dtype)
    checked = fwd_gluon.GluonDescriptor.from_tensor(q.transpose(1, 2), [1, 1, 32, 64], layout64)
    fast = fwd_gluon._desc(q, 32)
    assert layout64 == fwd_gluon.gl.NVMMASharedLayout.get_default_for(
        [1, 1, 32, 64], fwd_gluon.gl.bfloat16 if dtype == "bf16" else fwd_gluon.gl.float16)
    cases.assert_same_descriptor(fast, checked, fwd_gluon.GluonDescriptor)
    assert list(fast.shape) == [2, 4, 37, 64]


def test_gluon_config_table():
    from ioattn.flash.config import GLUON_PERSISTENT_CAUSAL_MAX_SEQLEN as causal_short
    from ioattn.flash.config import GLUON_PERSISTENT_MAX_SEQLEN as short, SHORT_SEQLEN, get_gluon_fwd_config

    pp = TmaFwdConfig(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, pingpong=True)
    for dtype in (torch.bfloat16, torch.float16):
        # Full attention in the persistent form up to the threshold.
        for T in (1, 1024, short):
            assert get_gluon_fwd_config(128, dtype, False, T) == dataclasses.replace(pp, persistent=True)
        for T in (0, short + 1, 4097, 131072):
            assert get_gluon_fwd_config(128, dtype, False, T) == pp
        # Causal without turns and with the half-width diagonal step, in the persistent form up
        # to its own threshold.
        causal = dataclasses.replace(pp, turns=False, half_last=True)
        for T in (1, SHORT_SEQLEN, short, 4097, causal_short):
            assert get_gluon_fwd_config(128, dtype, True, T) == dataclasses.replace(causal, persistent=True)
        for T in (0, causal_short + 1, 131072):
            assert get_gluon_fwd_config(128, dtype, True, T) == causal
    # D = 64: three warpgroups with P cast early, full attention from 2048 keys, causal from 8192;
    # the persistent kernel for full attention from 1024 to 2047 keys (without turns) and causal
    # from 2048 to 8191; the Triton kernel for full attention below 1024.
    wg3 = TmaFwdConfig(BLOCK_M=192, BLOCK_N=128, num_warps=4, num_stages=2, pingpong=True, warpgroups=3,
                       p_early=True)
    for T in (0, 2048, 4096, 131072):
        assert get_gluon_fwd_config(64, torch.bfloat16, False, T) == wg3
    for T in (0, 8192, 131072):
        assert get_gluon_fwd_config(64, torch.float16, True, T) == wg3
    for T in (2048, 4096, 8191):
        assert get_gluon_fwd_config(64, torch.bfloat16, True, T) == dataclasses.replace(pp, persistent=True)
    for T in (1024, 2047):
        assert get_gluon_fwd_config(64, torch.bfloat16, False, T) == dataclasses.replace(pp, persistent=True,
                                                                                          turns=False)
    assert get_gluon_fwd_config(64, torch.bfloat16, False, 1023) is None
    # Causal below 2048 keys: one warpgroup, 64 x 64 tiles, V in 2 slots, registers capped.
    short64 = TmaFwdConfig(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, v_stages=2, maxnreg=128)
    for T in (1, 1024, 2047):
        assert get_gluon_fwd_config(64, torch.bfloat16, True, T) == short64
    for T in (0, 1024, 131072):
        for causal in (False, True):
            assert get_gluon_fwd_config(256, torch.bfloat16, causal, T) == TmaFwdConfig(
                BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2, pingpong=True, turns=not causal)
    assert get_gluon_fwd_config(256, torch.float32, True, 1024) is None
    assert get_gluon_fwd_config(128, torch.float32, True, 1024) is None


def test_gluon_fwd_table_d64(monkeypatch):
    # D = 64 runs the ping-pong kernel only where GLUON_FWD_64 has an entry, from its length on.
    from ioattn.flash import config

    pp = TmaFwdConfig(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, pingpong=True, turns=False)
    monkeypatch.setattr(config, "GLUON_FWD_64", {True: ((8192, pp),)})
    assert config.get_gluon_fwd_config(64, torch.bfloat16, True, 8192) == pp
    assert config.get_gluon_fwd_config(64, torch.float16, True, 0) == pp
    assert config.get_gluon_fwd_config(64, torch.bfloat16, True, 4096) is None
    assert config.get_gluon_fwd_config(64, torch.bfloat16, False, 16384) is None
    assert config.get_gluon_fwd_config(64, torch.float32, True, 16384) is None
    # Ranges: each entry from its length up to the next one's.
    wg3 = dataclasses.replace(pp, BLOCK_M=192, warpgroups=3)
    monkeypatch.setattr(config, "GLUON_FWD_64", {True: ((2048, pp), (8192, wg3))})
    assert [config.get_gluon_fwd_config(64, torch.bfloat16, True, T) for T in (1024, 2048, 8191, 8192, 0)] == [
        None, pp, pp, wg3, wg3]


def test_dispatch_picks_gluon_where_the_table_says(monkeypatch):
    # Without a GPU the Gluon launcher is replaced by a spy that runs the Triton TMA kernel (the
    # same contract), with gluon_supported forced on: what is checked is which calls go there.
    import ioattn
    from ioattn.flash import fwd_tma

    calls = []

    def spy(q, k, v, scale, causal, offset, *, config):
        calls.append((q.shape[-1], causal, config))
        return fwd_tma.flash_fwd_tma(q, k, v, scale, causal, offset)

    monkeypatch.setattr(fwd_gluon, "flash_fwd_gluon", spy)
    monkeypatch.setattr(fwd_pingpong, "flash_fwd_pingpong", spy)
    monkeypatch.setattr(fwd_gluon, "gluon_supported", lambda q: True)
    monkeypatch.setenv("IOATTN_BACKEND", "triton")
    q, k, v = make_qkv(1, 33, 40, 2, 1, 128, device=DEVICE)
    out = ioattn.flash_attn_func(q, k, v, causal=True)
    assert len(calls) == 1 and calls[0][:2] == (128, True) and calls[0][2].pingpong
    want, _ = fwd_tma.flash_fwd_tma(q, k, v, 128**-0.5, True, 7)
    assert torch.equal(out, want)
    monkeypatch.setenv("IOATTN_GLUON", "0")
    ioattn.flash_attn_func(q, k, v, causal=True)
    monkeypatch.delenv("IOATTN_GLUON")
    # Not for full attention at D = 64 this short, not with a feature on; at D = 64 causal the
    # one-warpgroup kernel with V's shallower ring; at D = 256 the ping-pong kernel.
    q64, k64, v64 = make_qkv(1, 33, 40, 2, 1, 64, device=DEVICE)
    ioattn.flash_attn_func(q64, k64, v64)
    ioattn.flash_attn_func(q, k, v, causal=True, softcap=5.0)
    assert len(calls) == 1
    ioattn.flash_attn_func(q64, k64, v64, causal=True)
    assert len(calls) == 2 and calls[1][:2] == (64, True) and calls[1][2].v_stages == 2
    ioattn.flash_attn_func(*make_qkv(1, 33, 40, 2, 1, 256, device=DEVICE))
    assert len(calls) == 3 and calls[2][:2] == (256, False) and calls[2][2].BLOCK_N == 64


@pytest.mark.gpu
def test_dispatch_runs_gluon_on_the_gpu(monkeypatch):
    # On the H200 a D = 128 causal call runs the ping-pong Gluon kernel, and its
    # result passes the accuracy rule through the public function.
    import ioattn

    calls = []
    real = fwd_pingpong.flash_fwd_pingpong

    def spy(*args, **kw):
        calls.append(kw["config"])
        return real(*args, **kw)

    monkeypatch.setattr(fwd_pingpong, "flash_fwd_pingpong", spy)
    check_fwd(2, 1000, 1100, 8, 2, 128, True, None, torch.bfloat16,
              fwd=lambda q, k, v, scale, causal, offset, *, config=None, **features:
              ioattn.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, return_attn_probs=True)[:2])
    assert len(calls) == 1
