"""Host and wall time per short training call, ioattn against cuDNN's SDPA, on a GPU's host.

    PYTHONPATH=src python3 benchmarks/host_per_call.py [--T 1024]

The paper grid's T = 1024 forward + backward points move by up to 30% between H200 hosts on
unchanged kernels (benchmarks/LOG.md v1.27): the GPU waits on the host there. This times, for
D = 128 causal and full and D = 64 causal at the grid's shape (B = 16384 // T, hidden 2048), the
paper suite's forward + autograd.grad calls back to back: "host" is perf_counter until the last of n calls
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

from host_cost import per_call_us  # noqa: E402
from ioattn.bench.cases import Case  # noqa: E402
from ioattn.bench.peers import make_call, make_inputs  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=1024)
    args = p.parse_args()
    T = args.T
    for D, causal in ((128, True), (128, False), (64, True)):
        H = 2048 // D
        # The paper suite's own callables (ioattn bench --suite paper), on one set of inputs.
        case = Case(B=16384 // T, T=T, H=H, Hkv=H, D=D, causal=causal, dtype="bf16", mode="fwdbwd")
        inputs = make_inputs(case, "cuda")
        for name, peer in (("ioattn", "ioattn"), ("cudnn", "sdpa-cudnn")):
            host, wall = per_call_us(make_call(peer, case, inputs), 50)
            print(f"D{D} {'causal' if causal else 'full'} T{T} fwd+bwd {name}: host {host:.1f} us, wall {wall:.1f} us",
                  flush=True)


if __name__ == "__main__":
    main()
