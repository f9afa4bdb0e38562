"""Rotary position embedding (RoPE) as flash_attn_with_kvcache applies it to q and the new k.

The first ``rotary_dim = 2 · cos.shape[1]`` features of each head are rotated by the angle of
the token's position; the rest pass through. Two pairings of the features:

- interleaved (GPT-J): pairs ``(0, 1), (2, 3), …``;
- not interleaved (GPT-NeoX): pairs ``(i, i + rotary_dim/2)``.

A pair ``(x1, x2)`` at position p becomes ``(x1·cos − x2·sin, x1·sin + x2·cos)`` with the
``cos[p]``, ``sin[p]`` of the pair. This is O(T·H·D) elementwise work next to attention's
O(Tq·Tk·H·D); plain torch does it for the CPU backend (and the tests' references), where its
ops cost no launches. The Triton backends run rotary_kernel.py's kernels instead.
"""
import torch


def rotary_positions(cache_seqlens, T: int, *, same_position: bool = False):
    """``[B, T]`` int64 positions of T new tokens written at ``cache_seqlens [B]`` onwards; with
    ``same_position`` every token sits at ``cache_seqlens[b]`` (flash-attn's q when neither causal
    nor local)."""
    base = cache_seqlens.to(torch.int64)[:, None]
    if same_position:
        return base.expand(-1, T)
    return base + torch.arange(T, device=cache_seqlens.device)


def apply_rotary(x, cos, sin, positions, *, interleaved: bool):
    """Rotate ``x [B, T, H, D]`` at ``positions [B, T]`` by the tables ``cos``/``sin``
    ``[T_ro, rotary_dim / 2]``; returns a new tensor in x's dtype.

    The rotation is computed in fp32 at least (fp64 stays fp64) and rounded once, so the rotated
    k written to the cache is as close to exact as its dtype allows.
    """
    half = cos.shape[1]
    rot = 2 * half
    acc = torch.promote_types(x.dtype, torch.float32)
    # [B, T, 1, half]: one angle per token and pair, shared by the heads
    c = cos.to(acc)[positions].unsqueeze(2)
    s = sin.to(acc)[positions].unsqueeze(2)
    xr = x[..., :rot].to(acc)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        y = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        y = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((y.to(x.dtype), x[..., rot:]), dim=-1)
