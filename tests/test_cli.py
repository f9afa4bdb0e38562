"""The `ioattn` command: env, check, bench, and the numbers the benchmarks rest on."""
import json

import math

import pytest
import torch

from ioattn.bench.cases import SUITES, Case
from ioattn.bench.flops import attention_flops
from ioattn.cli import main


def test_env_prints_versions_and_backend(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    assert "triton" in out and "python" in out
    assert "-> backend cpu" in out
    assert "peers      ioattn" in out


def test_check_passes_on_every_local_backend(capsys):
    code = main(["check"])
    out = capsys.readouterr().out
    assert code == 0 and "FAIL" not in out, out
    assert "cpu " in out and "triton-interpreter" in out


def test_check_fails_with_exit_code_1_on_a_wrong_result(monkeypatch, capsys):
    import ioattn

    right = ioattn.flash_attn_func

    def off_by_a_percent(q, k, v, **kw):
        out, lse, probs = right(q, k, v, **kw)
        return out * 1.01, lse, probs
    monkeypatch.setattr(ioattn, "flash_attn_func", off_by_a_percent)
    assert main(["check", "--backend", "cpu"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bench_quick_writes_json_and_png(tmp_path, capsys):
    code = main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path)])
    table = capsys.readouterr().out
    assert code == 0, table
    assert "ioattn" in table and "sdpa" in table and "naive" in table
    (json_path,) = tmp_path.glob("*_quick.json")
    (png_path,) = tmp_path.glob("*_quick.png")
    data = json.loads(json_path.read_text())
    header = data["header"]
    for key in ("date", "name", "python", "torch", "triton", "git_commit", "command"):
        assert key in header
    for key in ("cudnn", "cuda", "flash_attn_4"):
        assert key in header
    assert header["command"].endswith("bench --quick --device cpu --out " + str(tmp_path))
    assert data["bar"]["baseline"] == "sdpa" and data["peers_unavailable"] == {}
    assert set(data["summary"]) == {c.series for c in SUITES["quick"].cases}
    rows = data["results"]
    assert len(rows) == len(SUITES["quick"].cases) * 3
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["tflops"] > 0 for r in rows)
    assert all(r["match"] for r in rows if r["peer"] != "ioattn")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flops_hand_computed():
    # 4·B·H·Tq·Tk·D = 4·2·3·8·8·4
    assert attention_flops(2, 3, 8, 8, 4, causal=False, mode="fwd") == 6144
    assert attention_flops(2, 3, 8, 8, 4, causal=True, mode="fwd") == 3072
    assert attention_flops(2, 3, 8, 8, 4, causal=True, mode="fwdbwd") == 3072 * 3.5
    assert attention_flops(2, 3, 8, 8, 4, causal=False, mode="bwd") == 6144 * 2.5
    # Tq=2, Tk=5 bottom-right causal: rows 11110 and 11111 see 9 keys in all
    assert attention_flops(1, 1, 2, 5, 1, causal=True, mode="fwd") == 4 * 9
    # causal window of 1 key before each query, T=4: rows see 1, 2, 2, 2 keys
    assert attention_flops(1, 1, 4, 4, 1, causal=True, mode="fwd", window=1) == 4 * 7


def test_paper_suite_is_the_flashattention2_grid():
    cases = SUITES["paper"].cases
    assert {c.T for c in cases} == {512, 1024, 2048, 4096, 8192, 16384}
    assert {c.D for c in cases} == {64, 128}
    assert all(c.B * c.T == 16384 and c.H * c.D == 2048 and c.dtype == "bf16" for c in cases)
    assert len(cases) == 6 * 2 * 2 * 2


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/clear_refs").exists(),
                    reason="CPU peak memory needs Linux /proc")
def test_cpu_peak_memory_sees_the_score_matrix():
    from ioattn.bench.memory import CpuMemoryWorker

    case = Case(B=1, T=1024, H=8, Hkv=8, D=64, causal=False, dtype="fp32", mode="fwd")
    scores_mib = case.B * case.H * case.T * case.T * 4 / 2**20
    worker = CpuMemoryWorker()
    try:
        flash, naive = worker.peak_mib(case, "ioattn"), worker.peak_mib(case, "naive")
    finally:
        worker.close()
    if math.isnan(flash) or math.isnan(naive):
        pytest.skip("this kernel does not reset VmHWM through /proc/self/clear_refs")
    assert naive >= 1.5 * scores_mib, (naive, flash, scores_mib)
    # torch's CPU flash kernel keeps a scratch tile per thread (16 threads on the H200 host: a
    # few tens of MiB), so ioattn's peak is compared with naive's, not with a fixed size.
    assert flash < naive / 2, (naive, flash, scores_mib)
