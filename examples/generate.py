"""Greedy generation with a tiny randomly initialized decoder and ioattn's KV cache.

The model is a few Llama-style layers (RMSNorm, rotary position embedding, grouped-query
attention, a gated MLP) with random weights, so nothing is downloaded and the tokens are
meaningless; what it shows is the loop: one prefill call over the prompt, then one call per new
token, each layer appending its keys and values to its own cache (rotary applied inside
flash_attn_with_kvcache). Runs in seconds on a CPU; on a GPU when one is present.

    python examples/generate.py                      # CPU or CUDA, contiguous cache
    python examples/generate.py --paged --tokens 64  # paged cache of 16-token pages
"""
import argparse
import time
from dataclasses import dataclass

import torch
from torch import nn

from ioattn import KVCache, PagedKVCache


@dataclass
class Config:
    vocab: int = 512
    dim: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    max_seqlen: int = 512

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


def rope_tables(cfg: Config, *, base=10000.0, dtype, device):
    """cos/sin ``[max_seqlen, head_dim / 2]`` of the standard RoPE frequencies."""
    inv_freq = base ** -(torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim)
    angles = torch.outer(torch.arange(cfg.max_seqlen, device=device).float(), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.wqkv = nn.Linear(cfg.dim, (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cache, cos, sin):
        B, T, _ = x.shape
        c = self.cfg
        q, k, v = self.wqkv(x).split([c.heads * c.head_dim, c.kv_heads * c.head_dim,
                                      c.kv_heads * c.head_dim], dim=-1)
        q = q.view(B, T, c.heads, c.head_dim)
        k = k.view(B, T, c.kv_heads, c.head_dim)
        v = v.view(B, T, c.kv_heads, c.head_dim)
        # Causal over the prompt at prefill; a single query sees the whole cache afterwards.
        out = cache.attend(q, k, v, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False)
        return self.wo(out.reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.w_gate_up = nn.Linear(cfg.dim, 8 * cfg.dim, bias=False)
        self.w_down = nn.Linear(4 * cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cache, cos, sin):
        x = x + self.attn(self.norm1(x), cache, cos, sin)
        gate, up = self.w_gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.w_down(nn.functional.silu(gate) * up)


class TinyLM(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def forward(self, tokens, caches, cos, sin):
        x = self.embed(tokens)
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache, cos, sin)
        return self.head(self.norm(x)).float()


def make_caches(cfg: Config, batch: int, *, paged: bool, dtype, device):
    """One cache per layer."""
    if paged:
        pages_per_seq = -(-cfg.max_seqlen // 16)
        return [PagedKVCache(batch * pages_per_seq, 16, cfg.kv_heads, cfg.head_dim, max_batch=batch,
                             max_pages_per_seq=pages_per_seq, dtype=dtype, device=device)
                for _ in range(cfg.layers)]
    return [KVCache(batch, cfg.max_seqlen, cfg.kv_heads, cfg.head_dim, dtype=dtype, device=device)
            for _ in range(cfg.layers)]


@torch.no_grad()
def generate(model, prompt, n_new: int, *, paged=False):
    """Greedy continuation of ``prompt [B, T0]`` by ``n_new`` tokens; returns ``(tokens [B, n_new],
    logits [B, n_new, vocab])``."""
    cfg = model.cfg
    dtype, device = model.head.weight.dtype, prompt.device
    caches = make_caches(cfg, prompt.shape[0], paged=paged, dtype=dtype, device=device)
    cos, sin = rope_tables(cfg, dtype=dtype, device=device)
    logits = model(prompt, caches, cos, sin)[:, -1]
    tokens, all_logits = [], []
    for _ in range(n_new):
        all_logits.append(logits)
        tokens.append(logits.argmax(-1))
        logits = model(tokens[-1][:, None], caches, cos, sin)[:, -1]
    return torch.stack(tokens, 1), torch.stack(all_logits, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--paged", action="store_true", help="paged cache of 16-token pages")
    args = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    torch.manual_seed(0)
    cfg = Config(layers=args.layers, max_seqlen=args.prompt + args.tokens)
    model = TinyLM(cfg).to(device=args.device, dtype=dtype).eval()
    prompt = torch.randint(0, cfg.vocab, (args.batch, args.prompt), device=args.device)
    t0 = time.perf_counter()
    tokens, _ = generate(model, prompt, args.tokens, paged=args.paged)
    dt = time.perf_counter() - t0
    print(f"{args.batch} x {args.tokens} tokens in {dt:.2f} s ({args.batch * args.tokens / dt:.0f} tokens/s, "
          f"{args.device}, {dtype}, {'paged' if args.paged else 'contiguous'} cache)")
    print(tokens.tolist())
    return tokens


if __name__ == "__main__":
    main()
