"""FlexAttention as a peer: ``torch.compile(flex_attention)``, with causal (and a causal window)
given as a block mask built once per case, outside the timed calls.

torch.compile specializes on each shape (``dynamic=False``: the kernels a user would run after
warm-up, not shape-generic ones), so a sweep recompiles at every point; the limit on
recompilations is raised so that no point silently falls back to eager flex_attention, which
materializes the scores.
"""
import functools

import torch


@functools.lru_cache(maxsize=None)
def _compiled():
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    config = torch._dynamo.config
    # renamed from cache_size_limit in torch 2.6; set whichever this torch has
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 512))
    return torch.compile(flex_attention, dynamic=False)


def unavailable(device: str):
    if device != "cuda":
        return "benchmarked on CUDA only (Inductor on a CPU needs a C++ compiler)"
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError as e:
        return f"torch {torch.__version__} has no FlexAttention ({e})"
    return None


def _block_mask(case, device):
    """Causal (and a causal window) as FlexAttention's block mask; None when nothing is masked."""
    from torch.nn.attention.flex_attention import create_block_mask

    if not case.causal:
        return None
    window = case.window

    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx
        if window >= 0:
            keep = keep & (q_idx - kv_idx <= window)
        return keep
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=case.T, KV_LEN=case.T, device=device)


def build_flex(case):
    flex, gqa = _compiled(), case.H != case.Hkv
    # Built by the first call, which is the untimed correctness check, on the inputs' device
    masks = {}

    def attend(q, k, v):
        if q.device not in masks:
            masks[q.device] = _block_mask(case, q.device)
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                   block_mask=masks[q.device], enable_gqa=gqa)
        return out.transpose(1, 2)
    return attend
