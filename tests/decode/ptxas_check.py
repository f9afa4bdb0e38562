"""Compile the split-KV kernel's H200 configs and the combine kernel for sm_90a without a GPU
(Triton ships ptxas) and print ptxas's register-spill bytes per config as JSON. Run by test_kernel.py in a child process
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

from ioattn.decode.combine import _combine_kernel
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
    spills = {}
    # Every feature on, and the plain path the benchmark runs (all flags off); the paged ones
    # with the split config too (page numbers a tile ahead), the contiguous ones with the
    # full-grid tiles.
    for name, rows, paged, on, variant in (
            ("decode", 4, False, True, "base"), ("decode-paged", 4, True, True, "base"),
            ("prefill-chunk", 1200, False, True, "base"), ("plain", 4, False, False, "base"),
            ("plain-paged", 4, True, False, "base"), ("decode-paged-split", 4, True, True, "paged_split"),
            ("plain-paged-split", 4, True, False, "paged_split"), ("decode-full-grid", 4, False, True, "full_grid"),
            ("plain-full-grid", 4, False, False, "full_grid")):
        signature = {p: "*bf16" for p in ("Q", "K", "V", "O")}
        signature.update({p: "*i32" for p in ("SEQLENS", "LEFTPAD", "BATCH_IDX", "BLOCK_TABLE")},
                         LSE="*fp32", ALIBI="*fp32", qk_scale="fp32", softcap2="fp32")
        cfg = get_decode_config(rows, 128, torch.bfloat16, interpret=False, paged_split=variant == "paged_split",
                                full_grid=variant == "full_grid")
        constexprs = dict(D=128, HEAD_DIM=128, PAGE_SIZE=16 if paged else 1, IS_PAGED=paged,
                          HAS_LEFTPAD=on, HAS_BATCH_IDX=on and not paged, HAS_LEFT=on, HAS_RIGHT=on,
                          HAS_SOFTCAP=on, HAS_ALIBI=on, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                          DOT_PRECISION="tf32", PREFETCH_PAGES=cfg.prefetch_pages,
                          LAUNCH_DEPENDENTS=variant != "full_grid")  # split grids launch the combine early
        spills[name] = spill_bytes(_splitkv_kernel, signature, constexprs, num_warps=cfg.num_warps,
                                   num_stages=cfg.num_stages)
    combine = {"O_PARTS": "*fp32", "LSE_PARTS": "*fp32", "O": "*bf16", "LSE": "*fp32"}
    spills["combine"] = spill_bytes(_combine_kernel, combine, dict(D=128, HEAD_DIM=128, SPLITS=128, WAIT_PRIOR=True),
                                    num_warps=4)
    print(json.dumps(spills))


if __name__ == "__main__":
    main()
