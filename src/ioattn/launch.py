"""Kernel launches that skip Triton's per-call binding once a call's compiled kernel is known.

``kernel[grid](*args, **kwargs)`` goes through ``JITFunction.run``, which binds the arguments,
specializes each one (type, 16-byte alignment, value 1, divisibility by 16), builds a cache key
from them and the options, and only then calls the compiled kernel's launcher. On the H200's
host that cost 13 µs a launch for the Triton kernels and 45-60 µs for the Gluon forward (its
descriptors' layouts are printed into the key), against 17-30 µs for the launcher itself
(benchmarks/host_cost.py, benchmarks/LOG.md v1.12). A short training call makes three
launches, and at T <= 1024 the GPU waits on that host time.

:func:`launch` keys each call by what can change Triton's choice of compiled kernel: the kernel,
the device, the options, every constexpr parameter by value, and every other argument by what
Triton specializes on: an int by its type range, whether it is 1 and whether 16 divides it; a
tensor by dtype and 16-byte alignment; a descriptor by class, dtype, block shape, layout and
padding. Per-call values that specialize nothing (lengths, strides, a dropout seed, a mask's
pointer) are therefore not in the key: a run with ever-new shapes or seeds adds an entry only
where Triton compiles another specialization (a seed that 16 divides, for one).
The first call with a key goes through Triton (compiling if needed); the next ones call the
compiled kernel's launcher with the argument list Triton would build. Calls this cannot key
(another argument type, Triton's launch hooks installed, the interpreter) take Triton's path.
tests/test_launch.py checks against Triton's own binder that equal keys mean equal
specializations, for the argument lists of every kernel launched through here.

Tensor descriptors: Triton's launcher turns each host descriptor into a CUDA tensor map on every
launch (a Python wrapper around the C launcher, and the driver's encoding call), 4-6 of them for
the Hopper kernels. The map depends only on the base address, shape, strides, padding and the
compiled kernel's descriptor metadata, and training steps reuse the same addresses (PyTorch's
caching allocator), so maps are kept by those values (:func:`_tensor_map`) and a cached launch
calls the C launcher itself with the expanded arguments, as Triton's wrapper would. A launcher
of another shape than triton 3.6's (checked once per compiled kernel) takes Triton's path.

Call sites: the launch key and the descriptors themselves still cost a short call's launch tens
of µs on the H200's host. :func:`launch_site` lets a launcher that can name everything its
arguments depend on (addresses, shapes, strides, scalars, config) keep the finished argument
list under that name and skip building it again.
"""
import operator
import types

import torch
from triton import knobs
from triton.runtime.jit import JITFunction

from . import _env

try:
    from triton.backends.nvidia.driver import make_tensordesc_arg
except ImportError:  # another triton layout: descriptors go through Triton's launcher
    make_tensordesc_arg = None

_I32, _I64 = 2**31, 2**63

# key -> (compiled kernel, what _direct says about it). Bounded for safety; keys do not grow with
# shapes (see above).
_PLANS: dict = {}
_MAX_PLANS = 4096
# id(kernel) -> (kernel, parameter names, constexpr flags in that order, names of the constexpr
# ones, defaults by name). By id: a JITFunction's own hash computes its source's cache key. The
# entry keeps the kernel alive, so its id, which the plans' keys hold too, is never reused.
_SIGNATURES: dict = {}


def _signature(kernel):
    """``(names, constexpr flags, constexpr names, defaults)`` of the kernel's parameters."""
    entry = _SIGNATURES.get(id(kernel))
    if entry is None or entry[0] is not kernel:
        params = kernel.params
        entry = (kernel, tuple(p.name for p in params), tuple(p.is_constexpr for p in params),
                 frozenset(p.name for p in params if p.is_constexpr),
                 {p.name: p.default for p in params if p.has_default})
        _SIGNATURES[id(kernel)] = entry
    return entry[1:]


def _descriptor_classes():
    """Triton's host tensor descriptor and Gluon's (when this triton has them)."""
    classes = []
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
        classes.append(TensorDescriptor)
    except ImportError:
        pass
    try:
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
        classes.append(GluonDescriptor)
    except ImportError:
        pass
    return classes


def _tensor_key(a):
    return a.dtype, a.data_ptr() % 16 == 0


def _desc_key(a):
    return (type(a), a.base.dtype, *a.block_shape, getattr(a, "padding", None), getattr(a, "layout", None))


def _int_key(a):
    # Typed i32, i64 or u64 by range; value 1 becomes a constant; "divisible by 16" is kept.
    kind = 1 if a == 1 else 16 if a % 16 == 0 else 0
    return kind if -_I32 <= a < _I32 else (kind, a >= _I64)


# Keys of the argument types the launchers pass, by exact type (one dict lookup a call); other
# types, subclasses included, go through the checks in _arg_key.
_KEYS = {int: _int_key, float: lambda a: float, bool: lambda a: (bool, a), str: lambda a: (str, a),
         type(None): lambda a: None, torch.Tensor: _tensor_key, torch.nn.Parameter: _tensor_key}
for _cls in _descriptor_classes():
    _KEYS[_cls] = _desc_key


def _arg_key(a):
    """What Triton's specialization of one runtime (not constexpr) argument can depend on;
    ``...`` when unknown (the call then takes Triton's path). Floats are typed fp32 whatever
    their value; bools i1."""
    key = _KEYS.get(type(a))
    if key is not None:
        return key(a)
    if isinstance(a, torch.Tensor):
        return _tensor_key(a)
    if isinstance(getattr(a, "base", None), torch.Tensor) and hasattr(a, "block_shape"):
        return _desc_key(a)
    return ...


def _key(kernel, device: int, args, kwargs):
    """The call's key (module docstring), or None if an argument cannot be keyed.

    Built with as few Python-level steps per argument as the key allows (it runs on every
    launch): the constexpr positional arguments as one tuple taken by an itemgetter, with their
    types (True == 1, but not as a constexpr); each runtime one by its class's key function; the
    keyword arguments, when all are constexprs or launch options (num_warps, ...), as one tuple
    of items with their types."""
    const_get, rt_get, rt_names = _positions(kernel, len(args))
    consts = const_get(args)
    keys = _KEYS
    rt = [keys.get(type(a), _arg_key)(a) for a in rt_get(args)]
    if ... in rt:
        return None
    if rt_names.isdisjoint(kwargs):
        kw = (tuple(kwargs.items()), tuple(map(type, kwargs.values())))
    else:
        kw = []
        for name, a in kwargs.items():
            k = _arg_key(a) if name in rt_names else (a, type(a))
            if k is ...:
                return None
            kw.append((name, k))
        kw = tuple(kw)
    return id(kernel), device, consts, tuple(map(type, consts)), tuple(rt), kw


# (id(kernel), number of positional arguments) -> (kernel, getter of the constexpr ones, getter of
# the runtime ones, names of the runtime parameters); kept like _SIGNATURES.
_POSITIONS: dict = {}


def _positions(kernel, n: int):
    entry = _POSITIONS.get((id(kernel), n))
    if entry is None or entry[0] is not kernel:
        names, flags, constexprs, _ = _signature(kernel)
        flags = flags[:n]
        entry = (kernel, _getter([i for i, c in enumerate(flags) if c]),
                 _getter([i for i, c in enumerate(flags) if not c]), frozenset(names) - constexprs)
        _POSITIONS[(id(kernel), n)] = entry
    return entry[1:]


def _getter(index):
    """A function returning ``tuple(args[i] for i in index)``, as fast as Python allows."""
    if len(index) > 1:
        return operator.itemgetter(*index)
    if index:
        i = index[0]
        return lambda args: (args[i],)
    return lambda args: ()


def _tail(kernel, n_args: int, kwargs) -> list:
    """The launcher's arguments after the ``n_args`` positional ones: the kernel's other
    parameters in signature order, from ``kwargs`` or their defaults (as Triton's binder)."""
    names, _, _, defaults = _signature(kernel)
    return [kwargs[n] if n in kwargs else defaults[n] for n in names[n_args:]]


def _unhooked() -> bool:
    """No launch hooks of Triton's installed (a profiler's, which must see every launch) and
    IOATTN_FAST_LAUNCH not 0: calls may skip Triton's binding."""
    hooks = knobs.runtime.launch_enter_hook
    return (hooks is None or not getattr(hooks, "calls", True)) and _env.fast_launch()


def _fast(kernel) -> bool:
    """Whether calls of ``kernel`` may skip Triton's binding: a JITFunction (not the interpreter's
    function), and :func:`_unhooked`."""
    return isinstance(kernel, JITFunction) and _unhooked()


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, through the compiled kernel's launcher directly when
    this call's key was seen before (see the module docstring). ``grid``: a tuple of 1-3 ints.
    ``IOATTN_FAST_LAUNCH=0`` sends every call through Triton."""
    if not _fast(kernel):
        kernel[grid](*args, **kwargs)
        return
    device = torch.cuda.current_device()
    call = _prepared(kernel, grid, args, kwargs, device)
    if call is not None:
        fn, head, tail, _ = call
        fn(*head, torch._C._cuda_getCurrentRawStream(device), *tail)


def _prepared(kernel, grid, args, kwargs, device: int):
    """The call as ``(launcher, arguments before the stream, arguments after it, whether those
    hold only values: the C launcher's direct call)`` when its key has a plan; else None, after
    launching it through Triton (and keeping a plan when it can be keyed). Without a direct
    call the arguments go to Triton's launcher, descriptors (and their tensors) among them."""
    key = _key(kernel, device, args, kwargs)
    try:
        plan = _PLANS.get(key) if key is not None else None
    except TypeError:  # an unhashable constexpr or option: no key
        key = plan = None
    if plan is None:
        compiled = kernel[grid](*args, **kwargs)
        if key is not None and compiled is not None and not hasattr(compiled, "result"):
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
                _SITES.clear()  # sites hold what plans and tensor maps made: start both afresh
            compiled._init_handles()
            _PLANS[key] = compiled, _direct(compiled)
        return None
    compiled, direct = plan
    g = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
    values = (*args, *_tail(kernel, len(args), kwargs))
    if direct is None:
        return compiled.run, g, (compiled.function, compiled.packed_metadata, None, None, None, *values), False
    final = _direct_args(direct, compiled, g, None, values)
    return direct[0], tuple(final[:3]), tuple(final[4:]), True


# Call sites' plans: a key the caller builds from everything its launch's arguments depend on ->
# (launcher, arguments before the stream, arguments after it), tensors there as their addresses.
# Bounded like _PLANS; a key holds addresses, so a long run with ever-new buffers adds entries.
_SITES: dict = {}
_MAX_SITES = 4096
# Tests set this: every call whose site key was seen builds its launch again and checks that
# it is the one kept (a key that misses an argument fails there).
VERIFY_SITES = False


def address(t):
    """A launch_site key's entry for an optional tensor argument: its address, or None."""
    return None if t is None else t.data_ptr()


def launch_site(key, build) -> None:
    """A launch whose caller names, in ``key``, everything its arguments depend on: every tensor's
    address, shape and strides, every scalar, the config. ``build()`` returns ``(kernel, grid,
    args, kwargs)`` and runs only for a key not seen before (or not keyable: ``key`` None), so the
    descriptors, the launch key and the argument list are made once per key; a call whose key was
    seen calls the compiled kernel's launcher with the kept arguments. A training loop reuses its
    buffers' addresses (PyTorch's caching allocator), so its calls find their keys: on the H200's
    host the three launches of a short one-pass backward took ~130 µs of ~250 through
    :func:`launch` (benchmarks/LOG.md v1.27). Falls back to :func:`launch` wherever that takes
    Triton's path."""
    site = _SITES.get(key) if key is not None else None
    if site is not None and not VERIFY_SITES and _unhooked():
        fn, head, tail = site
        fn(*head, torch._C._cuda_getCurrentRawStream(torch.cuda.current_device()), *tail)
        return
    kernel, grid, args, kwargs = build()
    if key is None or not _fast(kernel):
        launch(kernel, grid, *args, **kwargs)
        return
    device = torch.cuda.current_device()
    call = _prepared(kernel, grid, args, kwargs, device)
    if call is None:
        return
    fn, head, tail, direct = call
    if direct:
        # Addresses, not tensors: the kept arguments must not keep the call's buffers alive
        # (Triton's launcher, without a direct call, would get descriptors holding tensors:
        # nothing is kept then).
        kept = (fn, head, tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in tail))
        if site is not None:
            assert site == kept, f"launch_site: key {key!r} names a launch whose arguments changed"
        if len(_SITES) >= _MAX_SITES:
            _SITES.clear()
        _SITES[key] = kept
    fn(*head, torch._C._cuda_getCurrentRawStream(device), *tail)


# (number of the descriptor's metadata, base address, shape, strides, padding) -> the descriptor's
# expanded launcher arguments (its tensor map first): everything make_tensordesc_arg reads.
_TENSOR_MAPS: dict = {}
_MAX_TENSOR_MAPS = 4096


# Each distinct descriptor metadata seen (as a hashable value) -> a small int that stands for it
# in _TENSOR_MAPS' keys (an int hashes faster than the nested tuple). Never cleared: kernels have
# a handful of distinct ones.
_META_IDS: dict = {}


def _meta_id(meta) -> int:
    """The number of a descriptor's compiled metadata (a dict of scalars and lists)."""
    value = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(meta.items()))
    return _META_IDS.setdefault(value, len(_META_IDS))


def _direct(compiled):
    """What a cached launch of ``compiled`` needs to call its C launcher directly, kept in its
    plan: (C launch function, positions of the descriptor arguments, their metadata and its
    number (_META_IDS), cooperative-grid flag, PDL flag); without descriptor arguments, Triton's
    C launch function with no positions. None where the launcher is not shaped as triton 3.6's
    (the C function, or a wrapper of it closing over ``launcher``, ``tensordesc_indices`` and
    ``tensordesc_meta``), a descriptor has no metadata (its arguments hold the tensor itself) or
    scratch buffers are allocated per launch."""
    run = getattr(compiled, "run", None)
    wrapper = getattr(run, "launch", None)
    if (isinstance(wrapper, types.BuiltinFunctionType) and not getattr(run, "global_scratch_size", 1)
            and not getattr(run, "profile_scratch_size", 1)):
        # No descriptor arguments: Triton's launch is the C function itself, called here
        # without its Python wrapper (~10 µs a launch on the H200's host).
        return wrapper, (), (), (), run.launch_cooperative_grid, run.launch_pdl
    closure = getattr(wrapper, "__closure__", None)
    if make_tensordesc_arg is None or not closure:
        return None
    cells = dict(zip(wrapper.__code__.co_freevars, (c.cell_contents for c in closure)))
    c_launch, indices, metas = (cells.get(n) for n in ("launcher", "tensordesc_indices", "tensordesc_meta"))
    if (not callable(c_launch) or not indices or metas is None or len(metas) != len(indices)
            or any(m is None for m in metas) or getattr(run, "global_scratch_size", 1)
            or getattr(run, "profile_scratch_size", 1)):
        return None
    return (c_launch, tuple(sorted(indices)), tuple(metas), tuple(map(_meta_id, metas)),
            run.launch_cooperative_grid, run.launch_pdl)


def _direct_args(direct, compiled, grid, stream, values) -> list:
    """The C launcher's arguments, as Triton's wrapper passes them: grid, stream, function, the
    launch flags, no scratch buffers (_direct checked), the packed metadata, no launch hooks, then
    the kernel's arguments ``values`` (all of them, in signature order) with each descriptor
    expanded."""
    _, positions, metas, meta_ids, coop, pdl = direct
    final = [*grid, stream, compiled.function, coop, pdl, None, None, compiled.packed_metadata, None, None, None]
    prev = 0
    for j, pos in enumerate(positions):
        final += values[prev:pos]
        final += _tensor_map(values[pos], metas[j], meta_ids[j])
        prev = pos + 1
    final += values[prev:]
    return final


def _tensor_map(desc, meta, meta_id: int) -> tuple:
    """Descriptor ``desc``'s launcher arguments (Triton's make_tensordesc_arg with ``meta``), kept
    by what they depend on (see _TENSOR_MAPS)."""
    key = (meta_id, desc.base.data_ptr(), *desc.shape, *desc.strides, desc.padding)
    found = _TENSOR_MAPS.get(key)
    if found is None:
        if len(_TENSOR_MAPS) >= _MAX_TENSOR_MAPS:
            _TENSOR_MAPS.clear()
            _SITES.clear()
        found = _TENSOR_MAPS[key] = tuple(make_tensordesc_arg(desc, meta))
    return found
