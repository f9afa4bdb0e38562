"""Compare one peer's times between two stored benchmark runs (e.g. before and after a kernel change).

    python benchmarks/compare.py OLD.json NEW.json [--peer ioattn]

Prints, per point present in both, old and new TFLOP/s and new/old; then the geometric mean and
range of new/old per mode. Run-to-run noise on the H200 is a few percent: a change smaller than
the spread between two runs of the same code is noise.
"""
import argparse
import json
import math
from collections import defaultdict


def _points(path, peer):
    with open(path) as f:
        data = json.load(f)
    key = ("B", "T", "H", "Hkv", "D", "causal", "dtype", "mode")
    return data["header"], {tuple(r[k] for k in key): r for r in data["results"]
                            if r["peer"] == peer and r["status"] == "ok"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--peer", default="ioattn")
    args = p.parse_args(argv)
    h_old, old = _points(args.old, args.peer)
    h_new, new = _points(args.new, args.peer)
    print(f"{args.peer}: {h_old.get('git_commit')} -> {h_new.get('git_commit')} ({h_new.get('name')})")
    ratios = defaultdict(list)
    print(f"{'D':>4} {'causal':>6} {'mode':>7} {'T':>6} {'old':>8} {'new':>8} {'new/old':>8}")
    for key in sorted(old.keys() & new.keys()):
        B, T, H, Hkv, D, causal, dtype, mode = key
        r = new[key]["tflops"] / old[key]["tflops"]
        ratios[(D, causal, mode)].append(r)
        print(f"{D:>4} {str(causal):>6} {mode:>7} {T:>6} {old[key]['tflops']:>8.1f} "
              f"{new[key]['tflops']:>8.1f} {r:>8.3f}")
    print("\ngeometric mean of new/old (min, max) per mode:")
    for (D, causal, mode), rs in sorted(ratios.items()):
        gm = math.exp(sum(map(math.log, rs)) / len(rs))
        print(f"  D={D} causal={causal} {mode}: {gm:.3f} ({min(rs):.3f}, {max(rs):.3f})")


if __name__ == "__main__":
    main()
