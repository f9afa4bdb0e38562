"""Compile the Triton TMA forward (flash/fwd_tma.py) for sm_90a (no GPU needed) under the configs
get_tma_fwd_config picks at D = 64 and 128 (bf16; short and long sequences, causal and not) and
print one JSON line: per config, ptxas's registers and spilled bytes and the shared memory a
program takes. Run by tests/flash/test_fwd_tma.py (tests/compile_child.py)."""
import json
import os
import sys

import torch

from ioattn.flash.config import get_tma_fwd_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from ptx_check import _compile_tma, _ptxas_info  # noqa: E402


def main():
    out = {}
    for D in (64, 128):
        for causal in (False, True):
            for seqlen in (1024, 0):
                cfg = get_tma_fwd_config(D, torch.bfloat16, causal, interpret=False, seqlen=seqlen)
                compiled = _compile_tma(D, causal, cfg)
                info = _ptxas_info(compiled.asm["ptx"])
                out[f"D{D} {'causal' if causal else 'full'} {'short' if seqlen else 'long'}"] = dict(
                    regs=info["regs"], spills=info["spill_stores"], shared=compiled.metadata.shared,
                    warps=cfg.num_warps)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
