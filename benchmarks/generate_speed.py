"""Eager generation speed of examples/generate.py's tiny model, three ways of checking the cache's
indices, in one process on the same model and prompt.

    PYTHONPATH=src python3 benchmarks/generate_speed.py [--tokens 128] [--out $OUT/generate_speed.json]

- host: the cache classes check the lengths on their host copy (the default);
- device: every call checks the device values as flash_attn_with_kvcache does on its own (one
  read-back, so one synchronization, per layer and token);
- none: IOATTN_CHECK_VALUES=0, no value checks at all.

Contiguous and paged (16-token pages) caches, after a warm-up generation that compiles
everything; ms per generated token (all layers) is the median of three timed generations, the
three ways taking turns.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import generate as example  # noqa: E402

from ioattn.decode import cache as cache_mod  # noqa: E402


def timed(model, prompt, n, paged):
    """Seconds of one generation of ``n`` tokens."""
    if prompt.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    example.generate(model, prompt, n, paged=paged)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out")
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = example.Config(layers=args.layers, max_seqlen=16 + args.tokens)
    model = example.TinyLM(cfg).to(device=args.device, dtype=dtype).eval()
    prompt = torch.randint(0, cfg.vocab, (args.batch, 16), device=args.device)
    host_check = cache_mod._check_on_host
    rows = []
    ways = ("host", "device", "none")
    for paged in (False, True):
        # Compile everything first: a whole generation, since the split count (and so the
        # combine kernel's specialization) changes as the sequences grow.
        example.generate(model, prompt, args.tokens, paged=paged)
        times = {way: [] for way in ways}
        # The ways take turns, so that a drift of the host's speed over the run is shared among
        # them (on a CPU the host-checked loop ran 5.17 ms a token timed first after a short
        # warm-up, 4.42-4.46 timed after another way: the order moved it more than the checks).
        for rep in range(3):
            for way in ways[rep % 3:] + ways[:rep % 3]:
                cache_mod._check_on_host = host_check if way == "host" else (lambda *a, **k: -1)
                os.environ["IOATTN_CHECK_VALUES"] = "0" if way == "none" else "1"
                times[way].append(timed(model, prompt, args.tokens, paged))
        for way in ways:
            ms = statistics.median(times[way]) / args.tokens * 1e3
            rows.append(dict(paged=paged, checks=way, ms_per_token=ms, layers=args.layers, batch=args.batch))
            print(f"{'paged' if paged else 'contiguous':<10} checks={way:<6} {ms:7.3f} ms a token", flush=True)
    cache_mod._check_on_host = host_check
    os.environ["IOATTN_CHECK_VALUES"] = "1"
    if args.out:
        from ioattn.bench import machine

        with open(args.out, "w") as f:
            json.dump(dict(header=machine.header(args.device, sys.argv), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
