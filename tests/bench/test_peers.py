"""The peer registry: every peer says where it runs, defaults per device, skips with a reason."""
import pytest
import torch

from ioattn.bench import runner
from ioattn.bench.cases import Case, Limit
from ioattn.bench.peers import DEFAULT_PEERS, PEERS, PeerSkip, make_call, make_inputs, split_available
from ioattn.cli import _parse_peers

GPU_ONLY = ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "flex", "fa4")
TINY = Case(B=1, T=32, H=2, Hkv=1, D=16, causal=True, dtype="fp32", mode="fwdbwd")


def test_every_peer_declares_where_it_runs():
    for name, peer in PEERS.items():
        assert peer.name == name and peer.doc
        for device in ("cpu", "cuda"):
            why = peer.unavailable(device)
            assert why is None or (isinstance(why, str) and why)


def test_on_a_cpu_only_the_plain_peers_run_and_the_others_say_why():
    runs, skipped = split_available(list(PEERS), "cpu")
    assert runs == ["ioattn", "sdpa", "naive"]
    assert set(skipped) == set(GPU_ONLY)
    assert all(skipped.values())


def test_defaults_per_device():
    assert DEFAULT_PEERS["cpu"] == ("ioattn", "sdpa", "naive")
    assert DEFAULT_PEERS["cuda"][0] == "ioattn"
    assert {"sdpa-cudnn", "sdpa-flash", "flex", "fa4", "naive"} <= set(DEFAULT_PEERS["cuda"])
    assert set(DEFAULT_PEERS["cuda"]) <= set(PEERS)


def test_peers_option():
    assert _parse_peers(None, "cpu") == (["ioattn", "sdpa", "naive"], None)
    assert _parse_peers("ioattn,fa4", "cuda") == (["ioattn", "fa4"], None)
    for bad in ("sdpa,ioattn", "ioattn,nope"):
        peers, error = _parse_peers(bad, "cpu")
        assert peers is None and "--peers" in error


@pytest.mark.parametrize("peer", ["sdpa", "naive"])
def test_plain_peers_agree_with_ioattn_forward_and_backward(peer):
    inputs = make_inputs(TINY, "cpu")
    ref = make_call("ioattn", TINY, inputs)()
    got = make_call(peer, TINY, inputs)()
    assert len(got) == 4
    for x, r in zip(got, ref):
        torch.testing.assert_close(x, r, atol=2e-5, rtol=2e-5)


def test_a_backend_that_refuses_a_case_is_skipped_with_a_reason():
    # The memory-efficient backend has no CPU kernel: the same path a GPU backend takes when it
    # refuses a shape or GQA
    from ioattn.bench.peers.plain import sdpa_backend

    q, k, v, _ = make_inputs(TINY, "cpu")
    with pytest.raises(PeerSkip, match="EFFICIENT_ATTENTION refuses this case"):
        sdpa_backend("EFFICIENT_ATTENTION")(TINY)(q, k, v)


def test_runner_reports_skips_and_limits_instead_of_crashing(monkeypatch):
    from ioattn.bench import peers as registry

    def refuses(case):
        def attend(q, k, v):
            raise PeerSkip("no kernel for this shape")
        return attend
    monkeypatch.setitem(registry.PEERS, "sdpa", registry.Peer("sdpa", "refuses", refuses))
    case = Case(B=1, T=32, H=2, Hkv=2, D=16, causal=False, dtype="fp32", mode="fwd")
    limits = {"naive": Limit(why="not at this T", max_T=16)}
    got = {r.peer: r for r in runner.run_case(case, ["ioattn", "sdpa", "naive"], "cpu",
                                              limits=limits, quick=True)}
    assert got["ioattn"].status == "ok" and got["ioattn"].ms > 0
    assert got["sdpa"].status == "skipped: no kernel for this shape" and got["sdpa"].ms is None
    assert got["naive"].status == "skipped: not at this T"


def test_a_peer_error_is_reported_on_its_row_without_failing_the_run(monkeypatch, tmp_path, capsys):
    from ioattn.bench import peers as registry
    from ioattn.cli import main

    def broken(case):
        def attend(q, k, v):
            raise ValueError("this version takes no such shape")
        return attend
    monkeypatch.setitem(registry.PEERS, "sdpa", registry.Peer("sdpa", "broken", broken))
    code = main(["bench", "--quick", "--device", "cpu", "--peers", "ioattn,sdpa", "--modes", "fwd",
                 "--no-plot", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "error: ValueError: this version takes no such shape" in out
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("case", [
    Case(B=1, T=128, H=4, Hkv=2, D=32, causal=True, dtype="fp32", mode="fwd"),
    Case(B=2, T=64, H=2, Hkv=2, D=16, causal=False, dtype="fp32", mode="fwd"),
    Case(B=1, T=256, H=2, Hkv=1, D=16, causal=True, dtype="fp32", mode="fwd", window=40),
], ids=["gqa-causal", "full", "window"])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_peer_masks_and_layout_match_naive(monkeypatch, case):
    # Eager flex_attention stands in for the compiled one (a CPU has no Inductor toolchain here):
    # what is checked is the peer's block mask, GQA flag and [B, T, H, D] <-> [B, H, T, D] views
    from torch.nn.attention.flex_attention import flex_attention

    from ioattn.bench.peers import flex, plain

    monkeypatch.setattr(flex, "_compiled", lambda: flex_attention)
    q, k, v, _ = make_inputs(case, "cpu")
    torch.testing.assert_close(flex.build_flex(case)(q, k, v), plain.build_naive(case)(q, k, v),
                               atol=1e-5, rtol=1e-5)
