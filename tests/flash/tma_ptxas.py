"""Compile the forward kernels the Hopper table picks (get_tma_fwd_config at D = 64 and 128, bf16;
short and long sequences, causal and not) for sm_90a, no GPU needed: fwd_tma.py's kernel, or
fwd.py's where the config says ``portable``. Prints one JSON line: per config, ptxas's registers
and spilled bytes, the shared memory a program takes, its warps and whether it is the portable
kernel. Run by tests/flash/test_fwd_tma.py (tests/compile_child.py)."""
import json
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ioattn.flash.config import get_tma_fwd_config
from ioattn.flash.fwd import _fwd_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from ptx_check import _compile_tma, _ptxas_info, _signature  # noqa: E402


def _compile_portable(D, causal, cfg):
    """fwd.py's kernel as flash_fwd_tma launches it for a ``portable`` config (features off)."""
    sig, constexprs, attrs = _signature(_fwd_kernel, D, causal, cfg.BLOCK_M, cfg.BLOCK_N, cfg.num_warps)
    constexprs[(_fwd_kernel.arg_names.index("LONGEST_FIRST"),)] = causal
    return triton.compile(ASTSource(fn=_fwd_kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def main():
    out = {}
    for D in (64, 128):
        for causal in (False, True):
            for seqlen in (1024, 0):
                cfg = get_tma_fwd_config(D, torch.bfloat16, causal, interpret=False, seqlen=seqlen)
                compiled = (_compile_portable if cfg.portable else _compile_tma)(D, causal, cfg)
                info = _ptxas_info(compiled.asm["ptx"])
                out[f"D{D} {'causal' if causal else 'full'} {'short' if seqlen else 'long'}"] = dict(
                    regs=info["regs"], spills=info["spill_stores"], shared=compiled.metadata.shared,
                    warps=cfg.num_warps, portable=cfg.portable)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
