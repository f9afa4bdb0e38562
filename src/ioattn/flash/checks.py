"""Argument checks shared by the public functions: every bad input is rejected here, before any
launch, with an error that names the argument, what was expected and what was given."""
import math
import numbers

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256


def check_qkv(q, k, v, *, names=("q", "k", "v")):
    """Validate ``q [B, Tq, H, D]``, ``k``/``v`` ``[B, Tk, Hkv, D]``; return them with a
    contiguous last dim (copied only when it is not)."""
    nq, nk, nv = names
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, T, H, D], got shape {tuple(t.shape)}")
        if t.dtype == torch.float64 and t.device.type != "cpu":
            raise TypeError(f"{name}: float64 is supported on CPU only, got it on {t.device}")
        if t.dtype not in _FLOAT_DTYPES and t.dtype != torch.float64:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{nq}, {nk}, {nv} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{nq}, {nk}, {nv} must be on one device, got {q.device}, {k.device}, {v.device}")
    B, _, H, D = q.shape
    if v.dim() == 4 and k.dim() == 4 and v.shape[3] != k.shape[3]:
        # Separate QK and V head dims would need a second padded tile width in every kernel.
        raise ValueError(f"head dim of {nv} ({v.shape[3]}) must equal that of {nq}/{nk} ({k.shape[3]}): "
                         "a value head dim different from the query/key head dim is not supported")
    if k.shape != v.shape:
        raise ValueError(f"{nk} and {nv} must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"batch size of {nk}/{nv} ({k.shape[0]}) must match {nq} ({B})")
    if k.shape[3] != D:
        raise ValueError(f"head dim of {nk}/{nv} ({k.shape[3]}) must match {nq} ({D})")
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {D}")
    Hkv = k.shape[2]
    if H < 1 or Hkv < 1 or H % Hkv != 0:
        raise ValueError(
            f"number of heads of {nq} ({H}) must be a positive multiple of that of {nk}/{nv} ({Hkv})"
        )
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))


def check_scale(softmax_scale, D: int, *, name="softmax_scale") -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"{name} must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"{name} must be finite, got {softmax_scale}")
    return float(softmax_scale)


def check_dropout(dropout_p, *, name="dropout_p") -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(dropout_p).__name__}")
    # Written so that NaN fails too.
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def check_window(window_size, *, name="window_size") -> tuple:
    """``(left, right)`` ints, each >= −1 (−1 = unbounded on that side)."""
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)
    ):
        raise TypeError(f"{name} must be a pair of ints (left, right), got {window_size!r}")
    if any(w < -1 for w in window_size):
        raise ValueError(f"{name} entries must be >= -1 (-1 = unbounded), got {tuple(window_size)}")
    return int(window_size[0]), int(window_size[1])


def check_softcap(softcap, *, name="softcap") -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 (0 = off), got {softcap}")
    return float(softcap)


def check_alibi(alibi_slopes, q, *, name="alibi_slopes"):
    """None, or fp32 slopes ``[H]`` or ``[B, H]`` on q's device; returned contiguous."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    B, _, H, _ = q.shape
    if tuple(alibi_slopes.shape) not in ((H,), (B, H)):
        raise ValueError(f"{name} must have shape [H]=({H},) or [B, H]=({B}, {H}), got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {alibi_slopes.dtype}")
    if alibi_slopes.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {alibi_slopes.device}")
    return alibi_slopes.contiguous()


def check_attn_mask(attn_mask, q, k, *, name="attn_mask"):
    """None, or torch SDPA's mask: bool (True = take part in attention) or an additive float
    mask, broadcastable to ``[B, H, Tq, Tk]`` for q ``[B, Tq, H, D]``, k ``[B, Tk, Hkv, D]``.
    Returned as a 4-D view expanded to that shape (broadcast dims get stride 0, nothing is
    copied): the kernels read it tile by tile through its strides."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"{name} must be bool or floating point, got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"{name} must be on the device of the query {q.device}, got {attn_mask.device}")
    if attn_mask.requires_grad:
        # Its gradient is dS summed over the broadcast dims: a T×T output the kernels do not write.
        raise ValueError(f"{name} requires grad: gradients to an attention mask are not supported; "
                         f"pass {name}.detach()")
    B, Tq, H, _ = q.shape
    shape = (B, H, Tq, k.shape[1])
    if attn_mask.dim() <= 4:
        try:
            return attn_mask.expand(shape)
        except RuntimeError:
            pass
    raise ValueError(f"{name} of shape {tuple(attn_mask.shape)} does not broadcast to "
                     f"[B, H, Tq, Tk] = {list(shape)}")
