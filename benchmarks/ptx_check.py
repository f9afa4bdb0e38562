"""Compile the flash kernels for sm_90 without a GPU and fingerprint the PTX, so that "a feature
switched off compiles to nothing" is checked, not assumed.

    python benchmarks/ptx_check.py [--src DIR] [--json OUT] [--compare OTHER.json]
    python benchmarks/ptx_check.py --tma     # the Hopper TMA forward under each sweep candidate

``--src`` is the ``src`` folder of the checkout to compile (default: this one): run it on two
checkouts (``git worktree add /tmp/old <commit>``) and compare the fingerprints. For each kernel
(forward, dK/dV, dQ) at D = 64/128/256, causal and not, bf16, every optional feature off, it
prints a hash of the PTX (its header and comments dropped) and what ptxas -v reports (registers,
spill bytes). Same hash: the same instructions. Arguments that a checkout's kernel lacks are
simply not passed, so older kernels compile too. ``--tma`` compiles fwd_tma.py's kernel under
every candidate of benchmarks/sweep_fwd_tma.py and prints registers, spills and shared memory.
"""
import argparse
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile


def _ptxas():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _signature(fn, D, causal, block_m, block_n, num_warps):
    """Types and constexprs of one launch, as the launcher would pass them with features off."""
    from ioattn.flash.config import padded_head_dim

    constexpr_names = {fn.arg_names[p.num] for p in fn.params if p.is_constexpr}
    values = dict(D=D, HEAD_DIM=padded_head_dim(D), HAS_LEFT=False, HAS_RIGHT=causal, HAS_SOFTCAP=False,
                  HAS_ALIBI=False, IS_VARLEN=False, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION="tf32",
                  HAS_ATTN_MASK=False, MASK_IS_BOOL=False, HAS_DROPOUT=False)
    none_ptrs = {"ALIBI", "CU_SEQLENS_Q", "CU_SEQLENS_K", "ATTN_MASK"}
    fp32_args = {"qk_scale", "softcap2", "softmax_scale", "dropout_p", "dropout_scale"}
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexpr_names:
            if name not in values:
                raise KeyError(f"no value for constexpr {name}: add it to ptx_check.py")
            sig[name] = "constexpr"
            constexprs[(i,)] = values[name]
        elif name in none_ptrs:
            sig[name] = "constexpr"
            constexprs[(i,)] = None
        elif name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            sig[name] = "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in fp32_args:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs


def _compile(fn, D, causal, block_m, block_n, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, constexprs, attrs = _signature(fn, D, causal, block_m, block_n, num_warps)
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = k.asm["ptx"]
    return ptx, _fingerprint(ptx)


def _fingerprint(ptx):
    """PTX reduced to its instructions: no comments, line info, debug sections or parameter
    declarations, and parameters renumbered by first use, so that an argument the kernel never
    reads (a feature's stride, with the feature off) changes nothing."""
    ptx = ptx.split(".section\t.debug")[0]
    keep = [line for line in ptx.splitlines()
            if line.strip() and not line.lstrip().startswith(("//", ".loc", ".file", ".param", ".version"))]
    body = "\n".join(keep)
    order = {}
    body = re.sub(r"_param_(\d+)", lambda m: "_param_%d" % order.setdefault(m.group(1), len(order)), body)
    return body


def _compile_tma(D, causal, cfg):
    """fwd_tma's kernel for bf16 as its launcher specializes it; returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ioattn.flash.fwd_tma import _fwd_tma_kernel as fn

    values = dict(HEAD_DIM=D, HAS_RIGHT=causal, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, DOT_PRECISION="tf32",
                  NUM_STAGES=cfg.num_stages, WARP_SPECIALIZE=cfg.warp_specialize)
    blocks = dict(desc_q=cfg.BLOCK_M, desc_o=cfg.BLOCK_M, desc_k=cfg.BLOCK_N, desc_v=cfg.BLOCK_N)
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in values:
            sig[name] = "constexpr"
            constexprs[(i,)] = values[name]
        elif name in blocks:
            sig[name] = f"tensordesc<bf16[1, 1, {blocks[name]}, {D}]>"
        elif name == "LSE":
            sig[name] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def check_tma():
    sys.path.insert(0, os.path.dirname(__file__))
    from sweep_fwd_tma import CANDIDATES, candidates

    for D in CANDIDATES:
        for causal in (False, True):
            for cfg in candidates(D):
                try:
                    k = _compile_tma(D, causal, cfg)
                except Exception as e:  # report and go on, as the sweep does
                    print(f"D={D} causal={causal!s:<5} {cfg}: failed: {type(e).__name__}", flush=True)
                    continue
                r = _ptxas_info(k.asm["ptx"])
                print(f"D={D:<3} causal={causal!s:<5} {cfg.BLOCK_M}x{cfg.BLOCK_N} warps {cfg.num_warps} "
                      f"stages {cfg.num_stages}: regs {r['regs']} spill {r['spill_stores']} "
                      f"smem {k.metadata.shared}", flush=True)


def _ptxas_info(ptx):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    info = res.stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    return dict(regs=int(regs.group(1)) if regs else None, spill_stores=int(spill.group(1)) if spill else None)


def compile_one(fn, D, causal, block_m, block_n, num_warps, num_stages):
    ptx, body = _compile(fn, D, causal, block_m, block_n, num_warps, num_stages)
    return dict(hash=hashlib.sha256(body.encode()).hexdigest()[:16], lines=body.count("\n"), **_ptxas_info(ptx))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=os.path.join(os.path.dirname(__file__), "..", "src"))
    p.add_argument("--json", help="write the fingerprints here")
    p.add_argument("--compare", help="fingerprints of another checkout (--json output) to compare with")
    p.add_argument("--tma", action="store_true", help="the TMA forward under the sweep's candidates instead")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.src))
    os.environ.pop("TRITON_INTERPRET", None)
    if args.tma:
        return check_tma()
    fwd = importlib.import_module("ioattn.flash.fwd")
    bwd = importlib.import_module("ioattn.flash.bwd")
    cfg = importlib.import_module("ioattn.flash.config")
    import torch

    rows = []
    for D in (64, 128, 256):
        for causal in (False, True):
            fc = cfg.get_fwd_config(D, torch.bfloat16, causal, interpret=False)
            bc = cfg.get_bwd_config(D, torch.bfloat16, causal, interpret=False)
            launches = [("fwd", fwd._fwd_kernel, fc.BLOCK_M, fc.BLOCK_N, fc.num_warps, fc.num_stages),
                        ("dkdv", bwd._bwd_dkdv_kernel, bc.BLOCK_M1, bc.BLOCK_N1, bc.num_warps, bc.num_stages),
                        ("dq", bwd._bwd_dq_kernel, bc.BLOCK_M2, bc.BLOCK_N2, bc.num_warps, bc.num_stages)]
            for name, fn, bm, bn, nw, ns in launches:
                r = dict(kernel=name, D=D, causal=causal, **compile_one(fn, D, causal, bm, bn, nw, ns))
                rows.append(r)
                print(f"{name:>5} D={D:<3} causal={causal!s:<5} ptx {r['hash']} ({r['lines']} lines) "
                      f"regs {r['regs']} spill {r['spill_stores']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.compare:
        with open(args.compare) as f:
            other = {(r["kernel"], r["D"], r["causal"]): r for r in json.load(f)}
        same = [r for r in rows if other.get((r["kernel"], r["D"], r["causal"]), {}).get("hash") == r["hash"]]
        print(f"\nidentical PTX to {args.compare}: {len(same)} of {len(rows)} kernels")
        for r in rows:
            if r not in same:
                print(f"  differs: {r['kernel']} D={r['D']} causal={r['causal']}")


if __name__ == "__main__":
    main()
