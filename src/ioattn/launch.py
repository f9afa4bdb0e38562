"""Kernel launches that skip Triton's per-call binding once a call's compiled kernel is known.

``kernel[grid](*args, **kwargs)`` goes through ``JITFunction.run``, which binds the arguments,
specializes each one (type, 16-byte alignment, value 1, divisibility by 16), builds a cache key
from them and the options, and only then calls the compiled kernel's launcher. On the H200's
host that cost 13 µs a launch for the Triton kernels and 45-60 µs for the Gluon forward (its
descriptors' layouts are printed into the key), against 22-30 µs for the launcher itself
(benchmarks/host_cost.py, benchmarks/LOG.md v1.12). A short training call makes three
launches, and at T <= 1024 the GPU waits on that host time.

:func:`launch` keys each call by what can change Triton's choice of compiled kernel: the kernel,
the device, every int by its exact value (a superset of what Triton derives from it), every
tensor by dtype and 16-byte alignment, every descriptor by class, dtype, block shape, layout and
padding, and the keyword arguments (constexprs, options) by value. The first call with a key
goes through Triton (compiling if needed); the next ones call the compiled kernel's launcher
with the same argument list Triton would build. Calls this cannot key (another argument type,
Triton's launch hooks installed, the interpreter) take Triton's path every time.
tests/test_launch.py checks against Triton's own binder that equal keys mean equal
specializations, for the argument lists of every kernel launched through here.
"""
import torch
from triton import knobs
from triton.runtime.jit import JITFunction

from . import _env

# key -> (compiled kernel, launcher arguments after the positional ones). Bounded: each distinct
# shape adds an entry (ints are keyed by value), so a long run of ever-new shapes restarts it.
_PLANS: dict = {}
_MAX_PLANS = 4096


def _arg_key(a):
    """What Triton's specialization of one positional argument can depend on; ``...`` when
    unknown (the call then takes Triton's path)."""
    t = type(a)
    if t is int:
        return a
    if t is float:
        return float  # typed fp32 whatever the value
    if t is bool or a is None or t is str:
        return (t, a)
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    base = getattr(a, "base", None)
    if isinstance(base, torch.Tensor) and hasattr(a, "block_shape"):
        return (t, base.dtype, tuple(a.block_shape), getattr(a, "layout", None), getattr(a, "padding", None))
    return ...


def _key(kernel, device: int, args, kwargs):
    parts = [kernel, device]
    for a in args:
        k = _arg_key(a)
        if k is ...:
            return None
        parts.append(k)
    parts.append(tuple(kwargs.items()))
    return tuple(parts)


def _bound_tail(kernel, device: int, args, kwargs) -> tuple:
    """The launcher's arguments after ``args``: the kernel's other parameters, in signature
    order, as Triton's binder fills them in (keywords, then defaults)."""
    binder = kernel.device_caches[device][4]
    bound, _, _ = binder(*args, **kwargs)
    return tuple(bound.values())[len(args):]


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, through the compiled kernel's launcher directly when
    this call's key was seen before (see the module docstring). ``grid``: a tuple of 1-3 ints.
    ``IOATTN_FAST_LAUNCH=0`` sends every call through Triton."""
    hooks = knobs.runtime.launch_enter_hook
    if (not isinstance(kernel, JITFunction) or (hooks is not None and getattr(hooks, "calls", True))
            or not _env.fast_launch()):
        kernel[grid](*args, **kwargs)
        return
    device = torch.cuda.current_device()
    key = _key(kernel, device, args, kwargs)
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        compiled = kernel[grid](*args, **kwargs)
        if key is not None and compiled is not None and not hasattr(compiled, "result"):
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            compiled._init_handles()
            _PLANS[key] = (compiled, _bound_tail(kernel, device, args, kwargs))
        return
    compiled, tail = plan
    g0 = grid[0]
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    stream = torch._C._cuda_getCurrentRawStream(device)
    compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)
