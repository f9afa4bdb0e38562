"""Compile the flash kernels for sm_90 without a GPU and fingerprint the PTX, so that "a feature
switched off compiles to nothing" is checked, not assumed.

    python benchmarks/ptx_check.py [--src DIR] [--json OUT] [--compare OTHER.json]

``--src`` is the ``src`` folder of the checkout to compile (default: this one): run it on two
checkouts (``git worktree add /tmp/old <commit>``) and compare the fingerprints. For each kernel
(forward, dK/dV, dQ) at D = 64/128/256, causal and not, bf16, every optional feature off, it
prints a hash of the PTX (its header and comments dropped) and what ptxas -v reports (registers,
spill bytes). Same hash: the same instructions. Arguments that a checkout's kernel lacks are
simply not passed, so older kernels compile too.
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


def compile_one(fn, D, causal, block_m, block_n, num_warps, num_stages):
    ptx, body = _compile(fn, D, causal, block_m, block_n, num_warps, num_stages)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    info = res.stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    return dict(hash=hashlib.sha256(body.encode()).hexdigest()[:16], lines=body.count("\n"),
                regs=int(regs.group(1)) if regs else None, spill_stores=int(spill.group(1)) if spill else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=os.path.join(os.path.dirname(__file__), "..", "src"))
    p.add_argument("--json", help="write the fingerprints here")
    p.add_argument("--compare", help="fingerprints of another checkout (--json output) to compare with")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.src))
    os.environ.pop("TRITON_INTERPRET", None)
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
