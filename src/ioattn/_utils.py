"""Small helpers shared by every kernel family."""
import functools

import torch

from . import _env


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query costs microseconds)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def l2_bytes(device_index: int) -> int:
    """L2 cache bytes of a CUDA device (cached, as sm_count)."""
    return torch.cuda.get_device_properties(device_index).L2_cache_size


def empty(shape, *, dtype, device) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor when IOATTN_POISON=1 (tests), so unwritten tiles fail."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _env.poison() and out.is_floating_point():
        out.fill_(float("nan"))
    return out
