"""Compile flash/fwd_gluon.py's kernel for sm_90 (no GPU needed) under every candidate of
benchmarks/sweep_fwd_tma.py's GLUON_CANDIDATES, causal and not, and print one JSON line: per
config, ptxas's spilled bytes and registers and the wgmma waits in the PTX (a "1" is the wait
that leaves P·V in flight while the softmax runs). Run by tests/flash/test_fwd_gluon.py."""
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

from ioattn.flash import fwd_gluon
from ioattn.flash.config import TmaFwdConfig

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from sweep_fwd_tma import GLUON_CANDIDATES  # noqa: E402


def compile_report(D, M, N, warps, stages, causal, ws=False):
    fn = fwd_gluon._fwd_gluon_ws_kernel if ws else fwd_gluon._fwd_gluon_kernel
    x = torch.empty(1, 256, 2, D, dtype=torch.bfloat16)  # only its dtype, shape and strides matter
    descs = dict(desc_q=fwd_gluon._desc(x, M), desc_o=fwd_gluon._desc(x, M), desc_k=fwd_gluon._desc(x, N),
                 desc_v=fwd_gluon._desc(x, N))
    values = dict(HEAD_DIM=D, HAS_RIGHT=causal, BLOCK_M=M, BLOCK_N=N, NUM_STAGES=stages, num_warps=warps)
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in values:
            sig[name], constexprs[(i,)] = "constexpr", values[name]
        elif name in descs:
            sig[name] = native_specialize_impl(BaseBackend, descs[name], False, True, True)[0]
        elif name == "LSE":
            sig[name], attrs[(i,)] = "*fp32", [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
    extra = dict(maxnreg=fwd_gluon.ws_maxnreg(TmaFwdConfig(M, N, warps, stages, ws))) if ws else {}
    kernel = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages, **extra))
    ptx = kernel.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        info = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", path + ".o"], capture_output=True,
                              text=True, check=True).stderr
    return dict(regs=int(re.search(r"Used (\d+) registers", info).group(1)),
                spills=int(re.search(r"(\d+) bytes spill stores", info).group(1)),
                smem=kernel.metadata.shared, waits="".join(re.findall(r"wgmma.wait_group.sync.aligned (\d+)", ptx)))


def main():
    report = {}
    for D, configs in GLUON_CANDIDATES.items():
        for M, N, warps, stages, *ws in configs:
            for causal in (False, True):
                report[f"D{D} {M}x{N} w{warps} s{stages}{' ws' if ws else ''} causal={causal}"] = compile_report(
                    D, M, N, warps, stages, causal, bool(ws and ws[0]))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
