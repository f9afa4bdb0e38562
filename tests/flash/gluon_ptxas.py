"""Compile the Gluon kernels (flash/fwd_gluon.py, fwd_pingpong.py, bwd_gluon.py,
bwd_gluon_rows.py) for sm_90 (no GPU needed) under every candidate of benchmarks/sweep_fwd_tma.py's
GLUON_CANDIDATES, sweep_bwd_tma.py's GLUON_DKDV and sweep_bwd_fused.py's Gluon GLUON_CANDIDATES
(the one-pass forms), causal and not, and print one JSON line: per config, ptxas's
spilled bytes and registers, shared memory, the wgmma waits in the PTX (a nonzero one leaves a
matrix multiply in flight) and the register reallocations. Run by tests/flash/test_fwd_gluon.py."""
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from ioattn.flash import bwd_gluon, bwd_gluon_rows, fwd_gluon, fwd_persistent, fwd_pingpong
from ioattn.flash.config import TmaFwdConfig

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from sweep_bwd_fused import gluon_configs as gluon_fused_configs  # noqa: E402
from sweep_bwd_tma import GLUON_DKDV  # noqa: E402
from sweep_fwd_tma import GLUON_CANDIDATES  # noqa: E402


def compile_report(D, cfg: TmaFwdConfig, causal):
    M, N, warps, stages = cfg.BLOCK_M, cfg.BLOCK_N, cfg.num_warps, cfg.num_stages
    values = dict(HEAD_DIM=D, HAS_RIGHT=causal, BLOCK_N=N, NUM_STAGES=stages)
    if cfg.pingpong:
        # Warpgroups of 64 rows; registers set by the kernel's warp_specialize.
        fn = fwd_persistent._fwd_persistent_kernel if cfg.persistent else fwd_pingpong._fwd_pingpong_kernel
        M, extra = 64, {}
        values.update(PINGPONG=cfg.turns, BLOCK_M=M, HALF_LAST=cfg.half_last)
        if not cfg.persistent:
            values.update(EXP2_EMU=cfg.exp2_emu, NUM_WG=cfg.warpgroups, P_EARLY=cfg.p_early)
    elif cfg.warp_specialize:
        fn, extra = fwd_gluon._fwd_gluon_ws_kernel, dict(maxnreg=fwd_gluon.ws_maxnreg(cfg))
        values.update(BLOCK_M=M, num_warps=warps)
    else:
        fn, extra = fwd_gluon._fwd_gluon_kernel, dict(maxnreg=cfg.maxnreg) if cfg.maxnreg else {}
        values.update(BLOCK_M=M, num_warps=warps, V_STAGES=cfg.v_stages or stages)
    x = torch.empty(1, 256, 2, D, dtype=torch.bfloat16)  # only its dtype, shape and strides matter
    descs = dict(desc_q=fwd_gluon._desc(x, M), desc_o=fwd_gluon._desc(x, M), desc_k=fwd_gluon._desc(x, N),
                 desc_v=fwd_gluon._desc(x, N))
    return ptxas(fn, descs, values, dict(num_warps=warps, num_stages=stages, **extra))


def compile_dkdv_report(D, M, N, stages, overlap, causal, add_dq=False, dq_early=False, dq_tma=False):
    """bwd_gluon.py's kernel: ``N`` keys a program in two warpgroups, ``M`` query rows a step;
    with ``add_dq`` the one-pass backward's form of it (``dq_tma``: dQ by bulk reductions)."""
    x = torch.empty(1, 256, 2, D, dtype=torch.bfloat16)
    descs = {f"desc_{n}": fwd_gluon._desc(x, M if n in ("q", "do") else N // 2)
             for n in ("q", "k", "v", "do", "dk", "dv")}
    if dq_tma:
        descs["DQ"] = bwd_gluon._dq_desc(x.float(), M)
    values = dict(HEAD_DIM=D, HAS_RIGHT=causal, OVERLAP=overlap, ADD_DQ=add_dq, DQ_EARLY=dq_early, DQ_TMA=dq_tma,
                  BLOCK_M=M, BLOCK_N=N // 2, NUM_STAGES=stages)
    return ptxas(bwd_gluon._bwd_dkdv_gluon_kernel, descs, values, dict(num_warps=4, num_stages=stages))


def compile_rows_report(D, M, stages, causal, dq_rows=False, s_ahead=False, head_groups=False):
    """bwd_gluon_rows.py's kernel: 2 x 64 keys a program, ``M`` query rows a step."""
    x = torch.empty(1, 256, 2, D, dtype=torch.bfloat16)
    descs = {f"desc_{n}": fwd_gluon._desc(x, M if n in ("q", "do") else 64) for n in ("q", "k", "v", "do", "dk", "dv")}
    descs["DQ"] = fwd_gluon._desc(x.float(), M // 2) if dq_rows else bwd_gluon._dq_desc(x.float(), M)
    values = dict(HEAD_DIM=D, HAS_RIGHT=causal, DQ_ROWS=dq_rows, S_AHEAD=s_ahead, HEAD_GROUPS=head_groups,
                  BLOCK_M=M, BLOCK_N=64,
                  NUM_STAGES=stages)
    return ptxas(bwd_gluon_rows._bwd_rows_gluon_kernel, descs, values, dict(num_warps=4, num_stages=stages))


def ptxas(fn, descs, values, options):
    """Compile ``fn`` with these descriptors and constexprs (pointers fp32, other scalars i32 but
    the scales) and report ptxas's registers and spills, shared memory, wgmma waits and
    register reallocations."""
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in values:
            sig[name], constexprs[(i,)] = "constexpr", values[name]
        elif name in descs:
            sig[name] = native_specialize_impl(BaseBackend, descs[name], False, True, True)[0]
        elif name in ("LSE", "DELTA", "DQ"):
            sig[name], attrs[(i,)] = "*fp32", [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in ("qk_scale", "softmax_scale") else "i32"
    kernel = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    ptx = kernel.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        info = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", path + ".o"], capture_output=True,
                              text=True, check=True).stderr
        sass = subprocess.run([os.path.join(os.path.dirname(ptxas), "cuobjdump"), "-sass", path + ".o"],
                              capture_output=True, text=True, check=True).stdout
    return dict(regs=int(re.search(r"Used (\d+) registers", info).group(1)),
                spills=int(re.search(r"(\d+) bytes spill stores", info).group(1)),
                loop_spills=sum(wgmma_loop_spills(sass)), loop_spills_each=wgmma_loop_spills(sass),
                smem=kernel.metadata.shared, waits="".join(re.findall(r"wgmma.wait_group.sync.aligned (\d+)", ptx)),
                setmaxnreg=re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx))


def wgmma_loop_spills(sass: str) -> list:
    """Local-memory loads and stores (spill traffic) inside each innermost loop of the SASS that
    issues wgmmas (HGMMA), in code order: the key loops, where a spill costs every step. A loop is a backward
    branch and the instructions from its target to it; the branches back from the out-of-line
    barrier-wait retries placed after the last EXIT are not loops."""
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    end = max(a for a, ins in code if re.search(r"\bEXIT\b", ins))
    loops = []
    for addr, ins in code:
        target = re.search(r"BRA\s+0x([0-9a-f]+)", ins)
        if target and int(target.group(1), 16) < addr <= end:
            loops.append((int(target.group(1), 16), addr))

    def inside(lo, hi, pattern):
        return [a for a, ins in code if lo <= a <= hi and re.search(pattern, ins)]

    hot = [(lo, hi) for lo, hi in loops if inside(lo, hi, r"\bHGMMA\b")
           and not any(lo <= a <= b <= hi and (a, b) != (lo, hi) and inside(a, b, r"\bHGMMA\b") for a, b in loops)]
    return [len(inside(lo, hi, r"\b(LDL|STL)\b")) for lo, hi in hot]


def main():
    report = {}
    for D, configs in GLUON_CANDIDATES.items():
        for c in configs:
            cfg = TmaFwdConfig(*c)
            kind = " pp" if cfg.pingpong else " ws" if cfg.warp_specialize else ""
            kind += ("" if cfg.turns else " free") + (" persistent" if cfg.persistent else "")
            kind += f" emu{cfg.exp2_emu}" if cfg.exp2_emu else ""
            kind += " wg3" if cfg.warpgroups == 3 else ""
            kind += " early" if cfg.p_early else ""
            kind += " half" if cfg.half_last else ""
            kind += f" v{cfg.v_stages}" if cfg.v_stages else ""
            kind += f" cap{cfg.maxnreg}" if cfg.maxnreg else ""
            for causal in (False, True):
                name = f"D{D} {cfg.BLOCK_M}x{cfg.BLOCK_N} w{cfg.num_warps} s{cfg.num_stages}{kind} causal={causal}"
                report[name] = compile_report(D, cfg, causal)
    for D, configs in GLUON_DKDV.items():
        for M, N, stages, *overlap in configs:
            overlap = bool(overlap and overlap[0])
            for causal in (False, True):
                name = f"dkdv D{D} {M}x{N} s{stages}{' overlap' if overlap else ''} causal={causal}"
                report[name] = compile_dkdv_report(D, M, N, stages, overlap, causal)
    for D, configs in gluon_fused_configs().items():
        for cfg in configs:
            for causal in (False, True):
                if cfg.rows:
                    name = (f"rows D{D} {cfg.BLOCK_M}x{cfg.BLOCK_N} s{cfg.num_stages}"
                            f"{' dq_rows' if cfg.dq_rows else ''}{' s_ahead' if cfg.s_ahead else ''} causal={causal}")
                    report[name] = compile_rows_report(D, cfg.BLOCK_M, cfg.num_stages, causal, cfg.dq_rows,
                                                       cfg.s_ahead)
                    continue
                name = (f"fused D{D} {cfg.BLOCK_M}x{cfg.BLOCK_N} s{cfg.num_stages}{' early' if cfg.dq_early else ''}"
                        f"{' tma' if cfg.tma_reduce else ''} causal={causal}")
                report[name] = compile_dkdv_report(D, cfg.BLOCK_M, cfg.BLOCK_N, cfg.num_stages, False, causal,
                                                   add_dq=True, dq_early=cfg.dq_early, dq_tma=cfg.tma_reduce)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
