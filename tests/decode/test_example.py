"""examples/generate.py runs on CPU, and its cached decoding agrees with recomputing the whole
sequence by one causal prefill at every step."""
import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "examples" / "generate.py"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("generate_example", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_cached_decoding_equals_full_prefill(gen, paged, device):
    cfg = gen.Config(vocab=64, dim=64, layers=2, heads=4, kv_heads=2, max_seqlen=24)
    model = gen.TinyLM(cfg).to(device).eval()
    prompt = torch.randint(0, cfg.vocab, (2, 5), device=device)
    tokens, logits = gen.generate(model, prompt, 6, paged=paged)
    cos, sin = gen.rope_tables(cfg, dtype=torch.float32, device=device)
    seq = prompt
    with torch.no_grad():
        for i in range(6):
            # A fresh cache and one prefill of everything so far: the last position's logits.
            full = model(seq, gen.make_caches(cfg, 2, paged=False, dtype=torch.float32, device=device),
                         cos, sin)[:, -1]
            torch.testing.assert_close(logits[:, i], full, atol=1e-4, rtol=1e-4)
            seq = torch.cat((seq, tokens[:, i:i + 1]), 1)


def test_main_runs(gen, capsys):
    tokens = gen.main(["--device", "cpu", "--batch", "1", "--prompt", "4", "--tokens", "3", "--layers", "1"])
    assert tokens.shape == (1, 3)
    assert "tokens/s" in capsys.readouterr().out
