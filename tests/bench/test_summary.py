"""Geometric means, minima, the bar and the memory trend, on results made up by hand."""
import math

import pytest

from ioattn.bench.cases import Case
from ioattn.bench.report import format_summary, to_dict
from ioattn.bench.runner import Result
from ioattn.bench.summary import bar, memory_growth, summarize


def _result(peer, T, ms, *, causal=False, B=1, peak=None, status="ok"):
    case = Case(B=B, T=T, H=2, Hkv=2, D=64, causal=causal, dtype="bf16", mode="fwd")
    return Result(case, peer, status=status, ms=ms, tflops=1.0 / ms if ms else None, peak_mib=peak)


def _sweep():
    # ioattn/peer = peer ms / ioattn ms: cuDNN 2.0 and 0.5 (geomean 1.0), flash 4.0 and 1.0
    results = []
    for T, mine, cudnn, flash in ((1024, 1.0, 2.0, 4.0), (2048, 4.0, 2.0, 4.0)):
        results += [_result("ioattn", T, mine), _result("sdpa-cudnn", T, cudnn),
                    _result("sdpa-flash", T, flash)]
    results.append(_result("naive", 4096, None, status="skipped: too long"))
    return results


def test_geomean_and_minimum_per_series_and_peer():
    (series, by_peer), = summarize(_sweep()).items()
    assert "D=64" in series and "fwd" in series
    assert set(by_peer) == {"sdpa-cudnn", "sdpa-flash"}
    cudnn, flash = by_peer["sdpa-cudnn"], by_peer["sdpa-flash"]
    assert cudnn["geomean"] == pytest.approx(1.0) and cudnn["min"] == 0.5 and cudnn["min_T"] == 2048
    assert flash["geomean"] == pytest.approx(2.0) and flash["min"] == 1.0 and flash["points"] == 2


def test_bar_needs_the_geomean_and_every_point():
    summary = summarize(_sweep())
    (verdict,) = bar(summary, "sdpa-cudnn").values()
    # geomean 1.0 passes its half, the 0.5 point fails the other
    assert verdict == {"geomean": pytest.approx(1.0), "min": 0.5, "pass": False}
    (verdict,) = bar(summary, "sdpa-flash").values()
    assert verdict["pass"]
    assert bar(summary, "fa4") == {}


def test_memory_growth_is_the_exponent_of_T_at_fixed_B():
    results = [_result("ioattn", T, 1.0, peak=T / 64) for T in (1024, 4096)]
    results += [_result("naive", T, 1.0, peak=(T / 64) ** 2) for T in (1024, 4096)]
    growth = memory_growth(results)
    (by_peer,) = growth.values()
    assert by_peer["ioattn"] == pytest.approx(1.0) and by_peer["naive"] == pytest.approx(2.0)
    # a token budget (B shrinking as T grows) gives no trend
    budget = [_result("ioattn", T, 1.0, B=4096 // T, peak=100.0) for T in (1024, 4096)]
    assert memory_growth(budget) == {}


def test_report_json_and_text_carry_summary_and_bar():
    data = to_dict({"name": "test"}, "paper", _sweep(), {}, baseline="sdpa-cudnn",
                   peers_unavailable={"fa4": "not installed"})
    for key in ("header", "suite", "notes", "peers_unavailable", "summary", "bar",
                "memory_growth", "results"):
        assert key in data
    assert data["bar"]["baseline"] == "sdpa-cudnn"
    assert data["bar"]["geomean_at_least"] == 1.0 and data["bar"]["min_at_least"] == 0.9
    (verdict,) = data["bar"]["series"].values()
    assert verdict["pass"] is False
    assert {r["status"] for r in data["results"]} == {"ok", "skipped: too long"}
    text = format_summary(data["summary"], data["bar"]["series"], data["memory_growth"], "sdpa-cudnn")
    assert "FAIL" in text and "sdpa-flash 2.00 [1.00 at 2048]" in text
    assert not math.isnan(verdict["geomean"])
