"""Where the Gluon one-pass backward's time goes (an experiment; nothing here is dispatched).

    python3 benchmarks/exp_fused_atomics.py   # from the repository root, on a GPU; $OUT/exp_fused.json

Variants of bwd_gluon.py's ADD_DQ kernel are made by editing its source text (written to /tmp and
imported), and each kernel is timed alone (no zeroing, Δ or cast), bf16, paper-grid shapes
(B = 16384 // T, H = 16, D = 128), beside the dK/dV-only kernel of the two-pass backward:

- base: the kernel as it is;
- rotated / rotated_v4: each key block's program starts its walk over the query blocks at a
  different one (so concurrent programs add into different rows), with v2 atomics or with
  dQ moved to a layout of 4 consecutive columns per thread (v4 atomics);
- no_atomics: dQ formed but never added (an always-false guard keeps the compiler from dropping
  the matrix multiply), so base - no_atomics is what the adds cost;
- v4_atomics: v4 atomics without the rotation; no_mma_no_atomics: only the dSᵀ hand-over
  between the warpgroups; no_sync: dQ without waiting for the other warpgroup's dSᵀ (timing
  only, its dQ is wrong).

    --variants base,rotated,...  --stages 2,3   (default: all variants, 2 slots)

Rows whose dQ is added are compared with base's dQ (relative max difference)."""
import importlib.util
import json
import os
import re
import sys

import torch
import triton

SRC = open("src/ioattn/flash/bwd_gluon.py").read()
SRC = SRC.replace("from .._utils", "from ioattn._utils").replace("from ..launch", "from ioattn.launch")
SRC = re.sub(r"from \.(fwd\w*) import", r"from ioattn.flash.\1 import", SRC)
ATOM = 'gl.atomic_add(DQ + offs[:, None] + cols[None, :], dq, mask=(rows < T_q)[:, None], sem="relaxed")'
MMA = "dq = warpgroup_mma(ds, k_half, dq, use_acc=w > 0, is_async=True)"
V4 = '''blk: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0])
        dq4 = gl.convert_layout(dq, blk)
        rows4 = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, blk))
        cols4 = WG * (HEAD_DIM // 2) + gl.arange(0, HEAD_DIM // 2, layout=gl.SliceLayout(0, blk))
        offs4 = ((i_b * T_q + rows4).to(gl.int64) * H + i_h) * HEAD_DIM
        gl.atomic_add(DQ + offs4[:, None] + cols4[None, :], dq4, mask=(rows4 < T_q)[:, None], sem="relaxed")'''
ROT_A = "start_m = m_lo + (t - g * n_m) * BLOCK_M"
ROT_B = "start_m = m_lo + ((t - g * n_m + gl.program_id(0)) % n_m) * BLOCK_M"
VARIANTS = {
    "base": {},
    # each key block's program starts its walk over the query blocks at a different one
    "rotated": {ROT_A: ROT_B},
    "rotated_v4": {ROT_A: ROT_B, ATOM: V4},
    "no_atomics": {ATOM: "if T_q < 0:\n            " + ATOM},
    "v4_atomics": {ATOM: V4},
    # the dSᵀ hand-over alone: no dQ matrix multiply, no adds
    "no_mma_no_atomics": {ATOM: "if T_q < 0:\n            " + ATOM, MMA: "dq = dq + 1.0"},
    # timing only: dQ reads the other warpgroup's dSᵀ without waiting for it (wrong dQ)
    "no_sync": {"mbarrier.wait(ds_bar.index(buf), (t // 2) & 1)": "pass"},
}


def load(name, edits):
    src = SRC
    for a, b in edits.items():
        assert a in src, a
        src = src.replace(a, b)  # every occurrence (the loader and the consumers walk alike)
    path = f"/tmp/exp_{name}.py"
    open(path, "w").write(src)
    spec = importlib.util.spec_from_file_location(f"exp_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_MODS = {}


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--stages", default="2")
    args = p.parse_args(argv)
    variants = {n: VARIANTS[n] for n in args.variants.split(",")}
    stage_list = [int(x) for x in args.stages.split(",")]
    from ioattn.flash.config import FusedBwdConfig, get_tma_bwd_config
    from ioattn.flash.fwd import flash_fwd_triton
    from ioattn.flash import bwd_gluon
    rows = []
    for T in (4096, 16384):
        for causal in (False, True):
            B, H, D = 16384 // T, 16, 128
            q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            dout = torch.randn_like(q)
            out, lse = flash_fwd_triton(q, k, v, D**-0.5, causal, 0)
            delta = (out.float() * dout.float()).sum(-1).transpose(1, 2).contiguous()
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            dq_acc = torch.zeros(q.shape, device="cuda", dtype=torch.float32)
            flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
            tcfg = get_tma_bwd_config(D, q.dtype, causal, interpret=False, seqlen=T)
            ms = triton.testing.do_bench(lambda: bwd_gluon.dkdv_gluon(q, k, v, dout, lse, delta, dk, dv, D**-0.5,
                                                                      causal, 0, tcfg), warmup=20, rep=200)
            rows.append(dict(T=T, causal=causal, kind="dkdv-only", ms=ms, tflops_2x=2 * flops / ms * 1e-9))
            print(rows[-1], flush=True)
            ref = None
            for name, edits in variants.items():
                for stages in stage_list:
                    try:
                        mod = _MODS.get(name) or _MODS.setdefault(name, load(name, edits))
                        cfg = FusedBwdConfig(64, 128, 4, stages, gluon=True)
                        run = lambda: mod.fused_gluon(q, k, v, dout, lse, delta, dk, dv, dq_acc, D**-0.5, causal, 0, cfg)
                        dq_acc.zero_(); run(); torch.cuda.synchronize()
                        err = None
                        if name == "base" and stages == 2:
                            ref = dq_acc.clone()
                        elif ref is not None and name in ("rotated", "rotated_v4", "v4_atomics"):
                            err = float((dq_acc - ref).abs().max() / ref.abs().max())
                        ms = triton.testing.do_bench(run, warmup=20, rep=200)
                        rows.append(dict(T=T, causal=causal, kind=name, stages=stages, ms=ms,
                                         tflops_2_5x=2.5 * flops / ms * 1e-9, rel_err_vs_base=err))
                    except Exception as e:
                        rows.append(dict(T=T, causal=causal, kind=name, stages=stages, error=str(e)[:300]))
                    print(rows[-1], flush=True)
            del q, k, v, dout, out, lse, delta, dk, dv, dq_acc
            torch.cuda.empty_cache()
    from ioattn.bench import machine

    out = dict(header=machine.header("cuda", sys.argv), rows=rows)
    json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "exp_fused.json"), "w"), indent=1)


if __name__ == "__main__":
    sys.path.insert(0, "src")
    main()
