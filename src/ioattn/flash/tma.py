"""What the Hopper TMA kernels (fwd_tma.py, bwd_tma.py) accept, decided once for both.

Host-side tensor descriptors and tl.range's warp_specialize are recent (pyproject allows triton
3.2); without them the portable kernels run, and importing the TMA modules must not fail.
"""
import functools
import inspect

import torch
import triton.language as tl

from .. import _env

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

HAS_API = TensorDescriptor is not None and "warp_specialize" in inspect.signature(tl.range).parameters

# Head dims whose whole row is one TMA box (a power of two, at most 256 elements) and that the
# H200 sweeps cover; other head dims run the portable kernels.
TMA_HEAD_DIMS = (64, 128, 256)


def aligned(x: torch.Tensor) -> bool:
    """TMA's rules for a global tensor: the last dim contiguous, the base and every other stride
    16-byte aligned (and not 0: a broadcast dim is no tensor a descriptor can walk)."""
    # A plain loop: this runs for 3-4 tensors per call, and a generator in all() cost twice as much.
    strides = x.stride()
    if strides[-1] != 1 or x.data_ptr() % 16:
        return False
    nbytes = x.element_size()
    for s in strides[:-1]:
        if s <= 0 or s * nbytes % 16:
            return False
    return True


def head_major_desc(x: torch.Tensor, block: int, *, desc_type=None, layout=None, cols: int = 0):
    """The 4D descriptor of ``x [B, T, H, D]`` over its ``[B, H, T, D]`` view (the same memory,
    strides swapped), with tiles of ``block`` rows of one head, ``[1, 1, block, D]``: unit dims
    first, which lands each tile in shared memory as a plain matrix (fwd_tma.py says why).
    ``desc_type`` (default triton's TensorDescriptor) and ``layout``: Gluon's descriptor class and
    its shared-memory layout, for fwd_gluon.py; ``cols``: tiles of that many columns instead of D.

    ``x`` must be :func:`aligned` (every launcher's dispatch checked it) and ``block`` a power of
    two (configs are). The descriptor is therefore filled in without its constructor's checks of
    the same: a launch builds 4-6 of them, and ``from_tensor`` of a transposed view took 4.9 µs
    each on a CPU, this 1.4 µs (Gluon's checked constructor 10.5 µs); host time is what short
    training calls wait on (benchmarks/LOG.md, v1.8). tests/flash/test_fwd_tma.py and
    test_fwd_gluon.py compare it with the checked ones."""
    B, T, H, D = x.shape
    s_b, s_t, s_h, s_d = x.stride()
    desc = object.__new__(desc_type or TensorDescriptor)
    desc.base, desc.shape, desc.strides = x, [B, H, T, D], [s_b, s_h, s_t, s_d]
    desc.block_shape, desc.padding = [1, 1, block, cols or D], "zero"
    if layout is not None:
        desc.layout = layout
    return desc


@functools.cache
def _is_sm90(device_index: int) -> bool:
    # Cached: this runs on every call's dispatch, and the query costs microseconds.
    return torch.cuda.get_device_capability(device_index)[0] == 9


def hopper_inputs(q, k, v) -> bool:
    """Whether q ``[B, Tq, H, D]``, k, v (already validated) suit the TMA kernels: fp16/bf16 of one
    dtype and device, D in :data:`TMA_HEAD_DIMS`, every tensor :func:`aligned`, on a Hopper GPU or,
    for tests, CPU tensors in Triton's interpreter."""
    # Runs twice per training call (forward and backward dispatch): written without generators
    # and with each attribute read once (5.8 -> 3.8 us on a CPU).
    dtype, device = q.dtype, q.device
    if not HAS_API or q.dim() != 4 or (dtype != torch.float16 and dtype != torch.bfloat16):
        return False
    D = q.shape[-1]
    if D not in TMA_HEAD_DIMS:
        return False
    for x in (k, v):
        if x.dtype != dtype or x.shape[-1] != D or x.device != device:
            return False
    if device.type == "cuda":
        if not _is_sm90(device.index if device.index is not None else torch.cuda.current_device()):
            return False
    elif not (device.type == "cpu" and _env.interpret()):
        return False
    return aligned(q) and aligned(k) and aligned(v)
