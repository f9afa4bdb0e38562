"""The decode benchmark (src/ioattn/bench/decode.py) and torch.compile through the decode op."""
import json

import torch

from ioattn import flash_attn_with_kvcache
from ioattn.bench import decode
from ioattn.cli import main

from .cases import make_case


def test_bench_decode_writes_results(tmp_path, monkeypatch, capsys):
    # One tiny case through `ioattn bench --suite decode`: every CPU peer runs and agrees.
    monkeypatch.setattr(decode, "grid", lambda device, quick: [decode.DecodeCase(2, 256, 4, 2, 32, "fp32")])
    assert main(["bench", "--suite", "decode", "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*_decode.json")
    data = json.loads(path.read_text())
    assert data["header"]["device"] == "cpu" and data["header"]["torch"] == torch.__version__
    peers = {r["peer"]: r for r in data["results"]}
    assert set(peers) == {"ioattn", "ioattn-paged16", "ioattn-paged256", "sdpa", "sdpa-math"}
    assert all(r["status"] == "ok" and r["tb_s"] > 0 for r in peers.values()), peers
    assert "ioattn-paged16" in capsys.readouterr().out


def test_int_lengths_peer_runs_the_same_attention():
    # The CUDA suite's ioattn-intlens (the lengths as an int) against ioattn (a lengths tensor),
    # here on CPU tensors: the same call but for how the lengths are given.
    B, ctx, H, Hkv, D = 2, 64, 4, 2, 32
    q = torch.randn(B, 1, H, D)
    k, v = torch.randn(B, ctx, Hkv, D), torch.randn(B, ctx, Hkv, D)
    seqlens = torch.full((B,), ctx, dtype=torch.int32)
    want = decode._make_call("ioattn", q, k, v, seqlens)()
    torch.testing.assert_close(decode._make_call("ioattn-intlens", q, k, v, seqlens)(), want, atol=0, rtol=0)
    assert "ioattn-intlens" in decode.peers("cuda")


def test_compiled_call_appends_and_matches_eager():
    # The custom op mutates the caches under torch.compile too, with the eager results.
    kw = make_case(2, 1, 1, 32, 4, 2, 16, [3, 20], dtype=torch.float32, device="cpu", rotary_dim=16)
    kw2 = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    eager = flash_attn_with_kvcache(**kw)
    compiled = torch.compile(flash_attn_with_kvcache, fullgraph=True)(**kw2)
    torch.testing.assert_close(compiled, eager)
    assert torch.equal(kw2["k_cache"], kw["k_cache"]) and torch.equal(kw2["v_cache"], kw["v_cache"])
