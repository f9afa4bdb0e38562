"""What a sweep comes to: per series (mode, head dim, causal or not, ...) and peer, the geometric
mean and the minimum of the ratio ioattn/peer (TFLOP/s over TFLOP/s, = peer time / ioattn time),
the bar of the speed issue against one baseline peer, and how peak memory grows with T.
"""
import math
from collections import defaultdict

# The speed issue's bar: against the baseline, the geometric mean of the ratio at least 1.0 and
# no point below 0.9.
BAR_GEOMEAN = 1.0
BAR_MIN = 0.9


def ratios(results) -> dict:
    """{series: {peer: {T: ioattn/peer}}} over the points where both ran."""
    ms = defaultdict(dict)
    for r in results:
        if r.status == "ok" and r.ms:
            ms[(r.case.series, r.case.T)][r.peer] = r.ms
    out = defaultdict(lambda: defaultdict(dict))
    for (series, T), by_peer in ms.items():
        mine = by_peer.get("ioattn")
        for peer, t in by_peer.items():
            if peer != "ioattn" and mine:
                out[series][peer][T] = t / mine
    return out


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarize(results) -> dict:
    """{series: {peer: {"geomean", "min", "min_T", "points"}}}."""
    summary = {}
    for series, by_peer in ratios(results).items():
        summary[series] = {}
        for peer, by_T in by_peer.items():
            min_T = min(by_T, key=by_T.get)
            summary[series][peer] = {"geomean": geomean(by_T.values()), "min": by_T[min_T],
                                     "min_T": min_T, "points": len(by_T)}
    return summary


def bar(summary: dict, baseline: str) -> dict:
    """{series: {"geomean", "min", "pass"}} against ``baseline``; series without it are left out."""
    verdicts = {}
    for series, by_peer in summary.items():
        s = by_peer.get(baseline)
        if s is not None:
            verdicts[series] = {"geomean": s["geomean"], "min": s["min"],
                                "pass": s["geomean"] >= BAR_GEOMEAN and s["min"] >= BAR_MIN}
    return verdicts


def memory_growth(results) -> dict:
    """{series: {peer: exponent}}: peak MiB ~ T^exponent between the smallest and the largest T
    with a measured peak (1.0 = linear, 2.0 = the scores are materialized). Only series with one
    batch size: where B shrinks as T grows (a token budget) the exponent would mean nothing."""
    peaks = defaultdict(lambda: defaultdict(dict))
    batches = defaultdict(set)
    for r in results:
        batches[r.case.series].add(r.case.B)
        # under 1 MiB a peak is allocator noise, not a trend
        if r.status == "ok" and r.peak_mib is not None and r.peak_mib >= 1.0:
            peaks[r.case.series][r.peer][r.case.T] = r.peak_mib
    growth = defaultdict(dict)
    for series, by_peer in peaks.items():
        if len(batches[series]) > 1:
            continue
        for peer, by_T in by_peer.items():
            lo, hi = min(by_T), max(by_T)
            if hi > lo:
                growth[series][peer] = math.log(by_T[hi] / by_T[lo]) / math.log(hi / lo)
    return dict(growth)
