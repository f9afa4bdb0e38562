"""Host and wall time per short training call, ioattn against cuDNN's SDPA, on a GPU's host.

    PYTHONPATH=src python3 benchmarks/host_per_call.py [--T 1024]

The paper grid's T = 1024 forward + backward points move by up to 30% between H200 hosts on
unchanged kernels (benchmarks/LOG.md v1.27): the GPU waits on the host there. This times, for
D = 128 causal and full and D = 64 causal at the grid's shape (B = 16384 // T, hidden 2048), the
public forward + autograd.grad back to back: "host" is perf_counter until the last of n calls
returned, "wall" until the GPU finished them (host_cost.py's per_call_us: medians of 5 x 50
calls, the garbage collector off).
Host below wall: the GPU is the limit; host near wall: the host is. cuDNN's numbers on the same
host calibrate the host's speed between runs.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from host_cost import per_call_us  # noqa: E402
from ioattn import flash_attn_func  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=1024)
    args = p.parse_args()
    T = args.T
    for D, causal in ((128, True), (128, False), (64, True)):
        B, H = 16384 // T, 2048 // D
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)

        def ioattn():
            out = flash_attn_func(q, k, v, causal=causal)
            return torch.autograd.grad(out, (q, k, v), dout)

        def cudnn():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                out = torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
                return torch.autograd.grad(out, (q, k, v), dout.transpose(1, 2))

        for name, fn in (("ioattn", ioattn), ("cudnn", cudnn)):
            host, wall = per_call_us(fn, 50)
            print(f"D{D} {'causal' if causal else 'full'} T{T} fwd+bwd {name}: host {host:.1f} us, wall {wall:.1f} us",
                  flush=True)


if __name__ == "__main__":
    main()
