"""Results out: a table on the terminal, a JSON file with the machine header, a PNG plot."""
import json
from collections import defaultdict
from pathlib import Path

from .summary import BAR_GEOMEAN, BAR_MIN, bar, memory_growth, summarize


def _by_series(results) -> dict:
    """{series: {T: {peer: Result}}}, in the order the cases ran."""
    table = defaultdict(lambda: defaultdict(dict))
    for r in results:
        table[r.case.series][r.case.T][r.peer] = r
    return table


def _cell(value, fmt) -> str:
    """``value`` formatted, or a dash of the same width when it is unknown."""
    return "-".rjust(int(fmt.split(".")[0])) if value is None else format(value, fmt)


# width of the peer column: the longest peer name, "sdpa-efficient"
_W = 14


def format_table(results) -> str:
    """One section per series; per T one row per peer with ms, TFLOP/s, peak MiB and the ratio
    ioattn/peer of TFLOP/s (= peer ms / ioattn ms; above 1, ioattn is faster)."""
    lines = []
    head = f"{'T':>6} {'B':>4}  {'peer':<{_W}} {'ms':>9} {'TFLOP/s':>8} {'MiB':>9}  {'ioattn/peer':>11}  check"
    for series, by_T in _by_series(results).items():
        lines += ["", f"== {series} ==", head]
        for T, by_peer in by_T.items():
            mine = by_peer.get("ioattn")
            for peer, r in by_peer.items():
                if r.status != "ok":
                    lines.append(f"{T:>6} {r.case.B:>4}  {peer:<{_W}} {r.status}")
                    continue
                speedup = None
                if peer != "ioattn" and mine is not None and mine.ms:
                    speedup = r.ms / mine.ms
                check = "" if r.match is None else ("ok" if r.match else f"MISMATCH {r.rel_diff:.1e}")
                lines.append(f"{T:>6} {r.case.B:>4}  {peer:<{_W}} {_cell(r.ms, '9.3f')} "
                             f"{_cell(r.tflops, '8.2f')} {_cell(r.peak_mib, '9.1f')}  "
                             f"{_cell(speedup, '10.2f') + ('x' if speedup else ''):>11}  {check}")
    return "\n".join(lines)


def format_summary(summary: dict, verdicts: dict, growth: dict, baseline: str) -> str:
    """Per series: geomean and minimum of ioattn/peer for each peer, the bar against
    ``baseline``, and how peak memory grows with T where B is fixed."""
    lines = ["", "== summary: ioattn/peer, geometric mean [minimum at T] =="]
    for series, by_peer in summary.items():
        cells = [f"{peer} {s['geomean']:.2f} [{s['min']:.2f} at {s['min_T']}]"
                 for peer, s in by_peer.items()]
        lines.append(f"{series}: " + ", ".join(cells))
    lines += ["", f"== bar: geomean vs {baseline} >= {BAR_GEOMEAN} and no point < {BAR_MIN} =="]
    for series, v in verdicts.items():
        lines.append(f"{'PASS' if v['pass'] else 'FAIL'}  {series}: geomean {v['geomean']:.2f}, "
                     f"min {v['min']:.2f}")
    if not verdicts:
        lines.append(f"no {baseline} results to hold ioattn against")
    if growth:
        lines += ["", "== peak memory ~ T^k (1 = linear) =="]
        for series, by_peer in growth.items():
            lines.append(f"{series}: " + ", ".join(f"{p} k={k:.2f}" for p, k in by_peer.items()))
    return "\n".join(lines)


def to_dict(header: dict, suite: str, results, notes: dict, *, baseline: str = "sdpa-cudnn",
            peers_unavailable=None) -> dict:
    rows = []
    for r in results:
        rows.append({**r.case.__dict__, "peer": r.peer, "status": r.status, "ms": r.ms,
                     "tflops": r.tflops, "peak_mib": r.peak_mib, "rel_diff": r.rel_diff,
                     "match": r.match})
    summary = summarize(results)
    return {"header": header, "suite": suite, "notes": notes,
            "peers_unavailable": peers_unavailable or {}, "summary": summary,
            "bar": {"baseline": baseline, "geomean_at_least": BAR_GEOMEAN, "min_at_least": BAR_MIN,
                    "series": bar(summary, baseline)},
            "memory_growth": memory_growth(results), "results": rows}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def plot(path: Path, results, title: str) -> None:
    """Speed (TFLOP/s) and peak memory (MiB) against T on log2 axes, one row per series, in the
    manner of the FlashAttention papers' figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = _by_series(results)
    height = 3.2 * len(table)
    fig, axes = plt.subplots(len(table), 2, figsize=(11, height), squeeze=False)
    for row, (series, by_T) in zip(axes, table.items()):
        peers = list(dict.fromkeys(p for by_peer in by_T.values() for p in by_peer))
        for peer in peers:
            ok = [(T, by_peer[peer]) for T, by_peer in by_T.items()
                  if peer in by_peer and by_peer[peer].status == "ok"]
            style = dict(marker="o", label=peer, linewidth=2.5 if peer == "ioattn" else 1.5)
            row[0].plot([T for T, _ in ok], [r.tflops for _, r in ok], **style)
            mem = [(T, r.peak_mib) for T, r in ok if r.peak_mib]
            if mem:
                row[1].plot([T for T, _ in mem], [m for _, m in mem], **style)
        row[0].set_title(f"{series}: speed", fontsize=10)
        row[0].set_ylabel("TFLOP/s")
        row[0].set_ylim(bottom=0)
        row[1].set_title(f"{series}: peak memory beyond inputs", fontsize=10)
        row[1].set_ylabel("MiB")
        row[1].set_yscale("log")
        for ax in row:
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(by_T))
            ax.set_xticklabels([str(T) for T in by_T])
            ax.set_xlabel("sequence length T")
            ax.grid(True, alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    # Leave half an inch on top for the title, whatever the number of rows
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)
