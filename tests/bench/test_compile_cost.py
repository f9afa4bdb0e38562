"""First-call cost: configurations from a suite, the two child processes, the JSON layout.
On a CPU the children run the CPU backend on a tiny case: the plumbing, not a compile."""
from ioattn.bench.cases import SUITES, Case
from ioattn.bench.compile_cost import TIMES, format_cost, kernel_configs, measure
from ioattn.cli import main


def test_one_configuration_per_kernel_specialization_of_the_paper_grid():
    configs = kernel_configs(SUITES["paper"].cases)
    assert {(c.D, c.causal) for c in configs} == {(64, False), (64, True), (128, False), (128, True)}
    # the smallest shape of each, run forward then forward+backward
    assert all(c.T == 512 and c.mode == "fwdbwd" for c in configs)


def test_two_fresh_processes_share_one_cache_and_report_every_time():
    case = Case(B=1, T=32, H=2, Hkv=2, D=16, causal=True, dtype="fp32", mode="fwd")
    data = measure([case], "cpu", timeout=120)
    cold, warm = data["processes"]["cold"], data["processes"]["warm"]
    assert "error" not in cold and "error" not in warm
    assert cold["pid"] != warm["pid"]
    (row,) = data["configs"]
    assert (row["D"], row["T"], row["causal"]) == (16, 32, True) and "mode" not in row
    for phase in ("cold", "warm"):
        assert set(row[phase]) == set(TIMES) and all(t >= 0 for t in row[phase].values())
    assert set(data["cache"]) == {"files_after_cold", "files_after_warm", "warm_compiled_nothing"}
    text = format_cost(data)
    assert "D=16 causal fp32" in text and "Triton cache" in text


def test_compile_cost_without_a_gpu_skips_with_a_message(capsys):
    assert main(["bench", "--compile-cost", "--device", "cpu", "--suite", "quick"]) == 0
    assert "no GPU here" in capsys.readouterr().out
