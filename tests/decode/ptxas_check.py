"""Compile the split-KV kernel's H200 configs for sm_90a without a GPU (Triton ships ptxas) and
print ptxas's register-spill bytes per config as JSON. Run by test_kernel.py in a child process
without TRITON_INTERPRET:  PYTHONPATH=src python -m tests.decode.ptxas_check"""
import inspect
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ioattn.decode.config import get_decode_config
from ioattn.decode.kernel import _splitkv_kernel


def spill_bytes(kernel, signature, constexprs, **options) -> int:
    """Compile with the 16-divisibility the launcher's pointers and strides get at D = 128."""
    params = list(inspect.signature(kernel.fn).parameters)
    sig = {p: "constexpr" if p in constexprs else signature.get(p, "i32") for p in params}
    aligned = [i for i, p in enumerate(params) if sig[p].startswith("*") or p.startswith("stride")]
    src = ASTSource(kernel, sig, constexprs={(params.index(k),): v for k, v in constexprs.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        report = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True)
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report.stdout + report.stderr))


def main():
    signature = {p: "*bf16" for p in ("Q", "K", "V", "O")}
    signature.update({p: "*i32" for p in ("SEQLENS", "LEFTPAD", "BATCH_IDX", "BLOCK_TABLE")},
                     LSE="*fp32", ALIBI="*fp32", qk_scale="fp32", softcap2="fp32")
    spills = {}
    for name, rows, paged in (("decode", 4, False), ("decode-paged", 4, True), ("prefill-chunk", 1200, False)):
        cfg = get_decode_config(rows, 128, torch.bfloat16, interpret=False)
        constexprs = dict(D=128, HEAD_DIM=128, PAGE_SIZE=16 if paged else 1, IS_PAGED=paged,
                          HAS_LEFTPAD=True, HAS_BATCH_IDX=not paged, HAS_LEFT=True, HAS_RIGHT=True,
                          HAS_SOFTCAP=True, HAS_ALIBI=True, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                          DOT_PRECISION="tf32")
        spills[name] = spill_bytes(_splitkv_kernel, signature, constexprs, num_warps=cfg.num_warps,
                                   num_stages=cfg.num_stages)
    print(json.dumps(spills))


if __name__ == "__main__":
    main()
