"""The one-pass backward's last step (bwd_dq_cast.py) against torch.mul, alone and in the whole call.

    PYTHONPATH=src python3 benchmarks/ab_dq_cast.py --rounds 3 --out ab.json

First the cast alone at the paper grid's dQ size (16384 tokens x 2048 channels, fp32 to bf16):
torch.mul(dq_acc, scale, out=dq) (what bwd_fused.py ran before) against the kernel at each
(BLOCK, warps) of --tiles. Then forward + backward through flash_attn_func (deterministic=False,
the one-pass backward) at the paper grid's points of --D / --causal / --T, with the last step as
the kernel and as torch.mul, and cuDNN's SDPA beside them: alternated rounds on fresh inputs
(ab_fwd.py's alternate()), medians of do_bench (L2 flushed between calls) in ms.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from ab_fwd import alternate, write  # noqa: E402
from ioattn import flash_attn_func  # noqa: E402
from ioattn.flash import bwd_dq_cast, bwd_fused  # noqa: E402
from ioattn.launch import launch  # noqa: E402
from ioattn._utils import cdiv  # noqa: E402


def cast_with(block: int, warps: int):
    def run(dq_acc, dq, scale):
        launch(bwd_dq_cast._dq_cast_kernel, (cdiv(dq.numel(), block),), dq_acc, dq, float(scale), dq.numel(),
               BLOCK=block, num_warps=warps)
    return run


def torch_mul(dq_acc, dq, scale):
    torch.mul(dq_acc.view(dq.shape), scale, out=dq)


def check(got, want) -> str:
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if not torch.equal(g, w)]
    return f"outputs {bad} differ from the first config's" if bad else ""


def close(got, want) -> str:
    # The whole call: dQ's atomics make its last bits vary run to run.
    errs = [(g.float() - w.float()).abs().max().item() / max(w.float().abs().max().item(), 1e-6)
            for g, w in zip(got, want)]
    return f"relative differences {errs}" if max(errs) > 2e-2 else ""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tiles", nargs="*", default=["4096,4", "8192,8", "2048,4", "8192,4"])
    p.add_argument("--D", type=int, nargs="*", default=[128, 64])
    p.add_argument("--causal", nargs="*", default=["yes", "no"])
    p.add_argument("--T", type=int, nargs="*", default=[1024, 2048, 4096])
    p.add_argument("--out")
    args = p.parse_args()
    rows = []
    n = 16384 * 2048
    variants = [("torch.mul", torch_mul)] + [(f"kernel {t}", cast_with(*map(int, t.split(",")))) for t in args.tiles]

    def cast_inputs():
        return torch.randn(n, device="cuda"), torch.empty(n, device="cuda", dtype=torch.bfloat16), 0.088

    def cast_run(fn):
        def go(dq_acc, dq, scale):
            fn(dq_acc, dq, scale)
            return (dq,)
        return go

    rows += alternate("cast 33.5M", [(name, cast_run(fn)) for name, fn in variants], args.rounds, cast_inputs,
                      lambda a, d, s: (torch.mul(a, s).to(torch.bfloat16),), check, dict(what="cast", n=n))

    original = bwd_fused.dq_cast
    for D in args.D:
        for causal in (c == "yes" for c in args.causal):
            for T in args.T:
                B, H = 16384 // T, 2048 // D

                def inputs():
                    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                               for _ in range(3))
                    return q, k, v, torch.randn_like(q)

                def ioattn_with(cast):
                    def go(q, k, v, dout):
                        bwd_fused.dq_cast = cast
                        try:
                            out = flash_attn_func(q, k, v, causal=causal)
                            return (out, *torch.autograd.grad(out, (q, k, v), dout))
                        finally:
                            bwd_fused.dq_cast = original
                    return go

                def cudnn(q, k, v, dout):
                    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                        t = [x.transpose(1, 2) for x in (q, k, v)]
                        out = torch.nn.functional.scaled_dot_product_attention(*t, is_causal=causal)
                        grads = torch.autograd.grad(out, t, dout.transpose(1, 2))
                    return (out.transpose(1, 2), *(g.transpose(1, 2) for g in grads))

                configs = [("kernel", ioattn_with(original)), ("torch.mul", ioattn_with(torch_mul)),
                           ("cudnn", cudnn)]
                label = f"fwd+bwd D{D} {'causal' if causal else 'full'} T{T}"
                rows += alternate(label, configs, args.rounds, inputs, ioattn_with(original), close,
                                  dict(what="fwdbwd", D=D, causal=causal, T=T))
    if args.out:
        write(args.out, rows, [name for name, _ in variants])


if __name__ == "__main__":
    main()
