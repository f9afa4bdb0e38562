"""The suites beyond the paper grid, and where each peer sits out."""
from ioattn.bench.cases import SUITES


def test_beyond_suite_D256_and_GQA_at_8192():
    cases = SUITES["beyond"].cases
    assert {c.T for c in cases} == {8192}
    assert all(c.B * c.T == 16384 and c.dtype == "bf16" for c in cases)
    d256 = [c for c in cases if c.D == 256]
    assert {(c.H, c.Hkv) for c in d256} == {(8, 8)}
    assert {(c.causal, c.mode) for c in d256} == {(a, m) for a in (False, True) for m in ("fwd", "fwdbwd")}
    gqa = [c for c in cases if c.H != c.Hkv]
    assert {(c.H, c.Hkv, c.D) for c in gqa} == {(32, 4, 128)}
    assert {c.mode for c in gqa} == {"fwd", "fwdbwd"} and all(c.causal for c in gqa)


def test_long_suite_is_causal_fwdbwd_up_to_128k_without_naive():
    suite = SUITES["long"]
    assert [c.T for c in suite.cases] == [32768, 65536, 131072]
    assert all((c.B, c.H, c.D, c.causal, c.mode) == (1, 16, 128, True, "fwdbwd") for c in suite.cases)
    assert all(suite.limits["naive"].excludes(c) for c in suite.cases)


def test_flex_runs_at_the_anchors_points_of_the_paper_grid():
    suite = SUITES["paper"]
    flex = [c for c in suite.cases if not suite.limits["flex"].excludes(c)]
    assert {(c.D, c.T) for c in flex} == {(128, T) for T in (1024, 4096, 16384)}
    assert not suite.limits["naive"].excludes(suite.cases[0])
