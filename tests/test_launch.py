"""launch.py's cache key against Triton's own specialization.

A launch through the cache reuses the compiled kernel of an earlier call with the same key, so
the key must tell apart every pair of calls that Triton would compile differently. Without a
GPU this runs Triton's binder (the function ``JITFunction.run`` uses to specialize a call) for
sm_90 on the argument lists that every launcher passes to ``launch``, and on variants of them
that keep the key (tensors and descriptor bases moved to other alignments, shapes and strides):
equal keys must give equal specializations and options. A key that ignored alignment is shown
to fail the same check. On the GPU the launches themselves are compared with Triton's path.
"""
import dataclasses
import pytest
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from ioattn import flash_attn_func, flash_attn_with_kvcache, launch as launch_mod
from ioattn.decode import append as decode_append
from ioattn.decode import combine as decode_combine
from ioattn.decode import index_check as decode_index_check
from ioattn.decode import kernel as decode_kernel
from ioattn.decode import rotary_kernel as decode_rotary
from ioattn.flash import (bwd, bwd_dq_cast, bwd_fused, bwd_gluon, bwd_gluon_rows, bwd_preprocess, bwd_tma, dropout,
                          fwd, fwd_gluon, fwd_pingpong, fwd_tma, ops, varlen_launch)
from ioattn.flash.config import (FusedBwdConfig, TmaFwdConfig, get_fused_bwd_config, get_gluon_fwd_config,
                                 get_tma_bwd_config, get_tma_fwd_config)
from ioattn.testing import make_qkv

LAUNCHERS = (fwd, bwd, bwd_preprocess, bwd_dq_cast, dropout, varlen_launch, fwd_tma, bwd_tma, fwd_gluon, fwd_pingpong,
             bwd_gluon, bwd_gluon_rows, decode_kernel, decode_combine, decode_append, decode_rotary,
             decode_index_check)
_BACKEND = make_backend(GPUTarget("cuda", 90, 32))
_JITS, _BINDERS = {}, {}


def _jit(kernel):
    """The kernel as a JITFunction (an interpreted kernel's function wrapped in one, which
    compiles nothing until launched): what ``launch`` keys and Triton binds."""
    if kernel not in _JITS:
        _JITS[kernel] = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    return _JITS[kernel]


def triton_spec(kernel, args, kwargs):
    """Triton's specialization and options of one call, for sm_90 (JITFunction.run adds the
    last two options before binding). Also checks that the arguments ``launch`` passes to the
    compiled kernel after ``args`` are the ones Triton's binder passes."""
    jit = _jit(kernel)
    if id(jit) not in _BINDERS:  # by id: a JITFunction's hash is its source's cache key
        _BINDERS[id(jit)] = create_function_from_signature(jit.signature, jit.params, _BACKEND)
    bound, specialization, options = _BINDERS[id(jit)](*args, **kwargs, debug=False, instrumentation_mode="")
    want = list(bound.values())[len(args):]
    got = launch_mod._tail(jit, len(args), kwargs)
    assert len(got) == len(want) and all(x is y or (type(x) is type(y) and not isinstance(x, torch.Tensor) and x == y)
                                         for x, y in zip(got, want)), f"{kernel}: launcher arguments differ from Triton's"
    return tuple(specialization), options


def key_of(kernel, args, kwargs):
    return launch_mod._key(_jit(kernel), 0, args, kwargs)


@pytest.fixture
def recorded(monkeypatch):
    """The (kernel, args, kwargs) of every ``launch`` the launchers make; the launches still run
    (in the interpreter) unless ``run`` is set False."""
    calls = []
    calls_run = {"run": True}

    def record(kernel, grid, *args, **kwargs):
        calls.append((kernel, args, kwargs))
        if calls_run["run"]:
            launch_mod.launch(kernel, grid, *args, **kwargs)

    def record_site(key, build):
        # launch_site's callers: the launch that build() describes, built on every call here.
        kernel, grid, args, kwargs = build()
        calls.append((kernel, args, kwargs))
        if calls_run["run"]:
            launch_mod.launch_site(key, lambda: (kernel, grid, args, kwargs))

    for module in LAUNCHERS:
        for name, fn in (("launch", record), ("launch_site", record_site)):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, fn)
    return calls, calls_run


def _misaligned(x: torch.Tensor) -> torch.Tensor:
    """A tensor of x's shape and dtype whose base is not 16-byte aligned."""
    buf = torch.empty(x.numel() + 16, dtype=x.dtype)
    return buf[1:1 + x.numel()].view(x.shape)


def _same_class_int(a: int) -> int:
    # Another int that Triton types and specializes alike: 1 stays 1; a multiple of 16 (0 too)
    # becomes another one, any other int another non-multiple.
    return a if a == 1 else a + 112 if a % 16 == 0 else a + 16


def _replace(x, same: bool):
    """A stand-in for one argument: ``same`` keeps everything Triton specializes on (the key's
    claim), otherwise one such property changes. None when there is nothing to replace."""
    if type(x) is int:
        return _same_class_int(x) if same else (x + 1 if x != 0 else 3)
    if isinstance(x, torch.Tensor):
        if same:
            return _misaligned(x) if x.data_ptr() % 16 else torch.empty_like(x, memory_format=torch.contiguous_format)
        return _misaligned(x) if x.data_ptr() % 16 == 0 else None
    if same and hasattr(x, "block_shape") and isinstance(getattr(x, "base", None), torch.Tensor):
        # The descriptor moved onto another base (misaligned, other shape and strides), same block.
        other = object.__new__(type(x))
        other.__dict__.update(x.__dict__)
        base = _misaligned(torch.empty(3, 5, 7, x.shape[-1], dtype=x.base.dtype))
        other.base, other.shape, other.strides = base, [3, 7, 5, x.shape[-1]], [base.stride(i) for i in (0, 2, 1, 3)]
        return other
    return None


def _variants(kernel, args, kwargs, same: bool):
    """Calls that differ from ``(args, kwargs)`` in one runtime argument, replaced by
    :func:`_replace` (constexprs and options are keyed by value and left alone)."""
    names, _, constexprs, _ = launch_mod._signature(_jit(kernel))
    for i, (name, a) in enumerate(zip(names, args)):
        r = None if name in constexprs else _replace(a, same)
        if r is not None:
            yield args[:i] + (r,) + args[i + 1:], kwargs
    for name, a in kwargs.items():
        r = None if name in constexprs or name not in names else _replace(a, same)
        if r is not None:
            yield args, dict(kwargs, **{name: r})


def check_key_refines_spec(calls, key_fn=key_of):
    """Every recorded call and its variants (both kinds): equal keys, equal Triton
    specializations. Returns how many pairs with equal keys were compared."""
    seen = {}
    checked = 0
    for kernel, args, kwargs in calls:
        variants = [(args, kwargs), *_variants(kernel, args, kwargs, True), *_variants(kernel, args, kwargs, False)]
        for v_args, v_kwargs in variants:
            key = key_fn(kernel, v_args, v_kwargs)
            assert key is not None, f"{kernel}: a launcher passes an argument the key does not cover"
            spec = triton_spec(kernel, v_args, v_kwargs)
            if key in seen:
                assert seen[key] == spec, f"{kernel}: one key, two specializations:\n{seen[key]}\n{spec}"
                checked += 1
            seen[key] = spec
    return checked


def _flash_calls(dtype):
    # Odd and 16-multiple lengths, MHA, GQA and MQA, both causal alignments, forward and backward.
    for B, Tq, Tk, H, Hkv, D, causal in [(1, 37, 37, 2, 2, 64, True), (2, 48, 32, 4, 2, 64, False),
                                         (1, 33, 64, 4, 1, 128, True), (1, 16, 16, 2, 1, 32, False)]:
        q, k, v = make_qkv(B, Tq, Tk, H, Hkv, D, dtype=dtype, requires_grad=True)
        out = flash_attn_func(q, k, v, causal=causal)
        out.backward(torch.randn_like(out))
    # The portable kernels' features: a window, ALiBi slopes (a tensor where None was), dropout (a seed).
    q, k, v = make_qkv(1, 40, 40, 2, 1, 64, dtype=dtype, requires_grad=True)
    out = flash_attn_func(q, k, v, window_size=(8, 0), alibi_slopes=torch.rand(2), dropout_p=0.2)
    out.backward(torch.randn_like(out))


@pytest.mark.parametrize("backend", ["tma", "portable"])
def test_key_refines_triton_specialization_flash(recorded, monkeypatch, backend):
    if backend == "portable":
        monkeypatch.setenv("IOATTN_TMA", "0")
    monkeypatch.setenv("IOATTN_BACKEND", "triton")
    calls, _ = recorded
    _flash_calls(torch.float16 if backend == "tma" else torch.float32)
    assert len({c[0] for c in calls}) >= 2, "both the forward and the backward kernels launch"
    assert check_key_refines_spec(calls) > 0


def test_key_refines_triton_specialization_gpu_configs(recorded):
    # The launchers with the GPU's configs (bf16; the interpreter's configs are other tiles) and the
    # Gluon forward, recorded without running: only their argument lists are needed.
    calls, calls_run = recorded
    calls_run["run"] = False
    for D, T, causal in [(64, 37, True), (128, 512, False), (128, 4096, True)]:
        q, k, v = make_qkv(1, T, T, 4, 2, D, dtype=torch.bfloat16)
        out, lse = torch.empty_like(q), torch.empty(1, 4, T)
        fwd_tma.flash_fwd_tma(q, k, v, 0.1, causal, 0,
                              config=get_tma_fwd_config(D, q.dtype, causal, interpret=False, seqlen=T))
        bwd_tma.flash_bwd_tma(torch.randn_like(q), q, k, v, out, lse, 0.1, causal, 0,
                              config=get_tma_bwd_config(D, q.dtype, causal, interpret=False, seqlen=T))
        gluon = get_gluon_fwd_config(D, q.dtype, causal, T)
        if fwd_gluon.HAS_GLUON and gluon is not None:
            fwd_pingpong.gluon_launcher(gluon)(q, k, v, 0.1, causal, 0, config=gluon)
        if fwd_gluon.HAS_GLUON:
            fwd_pingpong.flash_fwd_pingpong(q, k, v, 0.1, causal, 0,
                                            config=TmaFwdConfig(128, 128, 4, 2, pingpong=True))
            bwd_gluon.dkdv_gluon(q, k, v, torch.randn_like(q), lse, torch.empty(1, 4, T), torch.empty_like(k),
                                 torch.empty_like(v), 0.1, causal, 0,
                                 dataclasses.replace(get_tma_bwd_config(D, q.dtype, causal, interpret=False),
                                                     gluon1=True))
        if fwd_gluon.HAS_GLUON:
            # The row-held Gluon backward with its table config (launched through launch_site).
            rows = get_fused_bwd_config(D, q.dtype, causal, interpret=False, seqlen=0, gluon=True)
            if rows is not None and rows.rows:
                bwd_gluon_rows.fused_gluon_rows(q, k, v, torch.randn_like(q), lse, torch.empty(1, 4, T),
                                                torch.empty_like(k), torch.empty_like(v), torch.zeros(q.shape), 0.1,
                                                causal, 0, rows)
        # The one-pass backward: the GPU's config where it has one, both ways of adding dQ.
        fused = get_fused_bwd_config(D, q.dtype, causal, interpret=False, seqlen=0) or FusedBwdConfig(64, 128, 8, 2)
        for tma_reduce in (False, True):
            bwd_fused.flash_bwd_fused(torch.randn_like(q), q, k, v, out, lse, 0.1, causal, 0,
                                      config=dataclasses.replace(fused, tma_reduce=tma_reduce))
    kernels = {c[0] for c in calls}
    assert {bwd_tma._bwd_dq_tma_kernel, bwd_tma._bwd_dkdv_tma_kernel, fwd_tma._fwd_tma_kernel} <= kernels
    assert check_key_refines_spec(calls) > 0


def test_key_refines_triton_specialization_decode(recorded, monkeypatch):
    monkeypatch.setenv("IOATTN_BACKEND", "triton")
    calls, _ = recorded
    B, H, Hkv, D = 2, 4, 2, 64
    for T_cache, num_splits in [(40, 1), (64, 3)]:
        q = torch.randn(B, 1, H, D, dtype=torch.float16)
        k_cache, v_cache = (torch.randn(B, T_cache, Hkv, D, dtype=torch.float16) for _ in range(2))
        seqlens = torch.tensor([T_cache - 5, 7], dtype=torch.int32)
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=num_splits)
        # With new rows appended, into the contiguous cache and into a paged one.
        new = torch.randn(B, 2, Hkv, D, dtype=torch.float16)
        flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=seqlens - 2, num_splits=num_splits)
        per_seq = T_cache // 16
        table = torch.arange(B * per_seq, dtype=torch.int32).view(B, per_seq)
        pages = k_cache[:, :per_seq * 16].reshape(-1, 16, Hkv, D)
        flash_attn_with_kvcache(q, pages, pages.clone(), new, new, cache_seqlens=torch.tensor([3, 9], dtype=torch.int32),
                                block_table=table, num_splits=num_splits)
        # With rotary tables: q rotated in its own launch, k inside the append's.
        cos, sin = (torch.rand(T_cache, 8, dtype=torch.float16) for _ in range(2))
        flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cos, sin, cache_seqlens=seqlens - 2, causal=True,
                                num_splits=num_splits)
    assert {decode_kernel._splitkv_kernel, decode_append._append_kernel, decode_rotary._rotary_q_kernel,
            decode_index_check._index_values_kernel} <= {c[0] for c in calls}
    assert check_key_refines_spec(calls) > 0


@pytest.mark.parametrize("drop", ["alignment", "divisibility"])
def test_a_weaker_key_fails_the_check(recorded, monkeypatch, drop):
    # The check can fail: a key that drops the tensors' alignment, or the ints' divisibility by
    # 16, maps two specializations to one key.
    monkeypatch.setenv("IOATTN_BACKEND", "triton")
    calls, _ = recorded
    _flash_calls(torch.float16)

    def weaker(a):
        if drop == "alignment" and isinstance(a, torch.Tensor):
            return a.dtype
        if drop == "divisibility" and type(a) is int:
            return a == 1
        return launch_mod._arg_key(a)

    def weak_key(kernel, args, kwargs):
        names, _, constexprs, _ = launch_mod._signature(_jit(kernel))
        return (kernel, tuple(a if n in constexprs else weaker(a) for n, a in zip(names, args)),
                tuple((n, a if n in constexprs or n not in names else weaker(a)) for n, a in kwargs.items()))

    with pytest.raises(AssertionError, match="one key, two specializations"):
        check_key_refines_spec(calls, weak_key)


def test_per_call_values_share_a_key(recorded, monkeypatch):
    # A fresh dropout seed, other lengths of the same divisibility, another tensor: one key, so
    # one compiled kernel reused (the key keeps nothing that differs call to call).
    # The two seeds are set, not drawn: a drawn seed is a multiple of 16 one time in 16, which
    # Triton compiles apart (and so does the key), and the assertion would then fail by chance.
    monkeypatch.setenv("IOATTN_BACKEND", "triton")
    calls, _ = recorded
    seeds = iter([(1 << 62) + 17, (1 << 62) + 35])
    monkeypatch.setattr(ops, "draw_seed", lambda p: torch.tensor(next(seeds)))
    for T in (37, 53):
        q, k, v = make_qkv(1, T, T, 2, 1, 64, dtype=torch.float16)
        flash_attn_func(q, k, v, dropout_p=0.2, alibi_slopes=torch.rand(2))
    assert len(calls) == 2
    (kernel, a1, k1), (_, a2, k2) = calls
    assert k1["seed"] != k2["seed"] and k1["ALIBI"] is not k2["ALIBI"]
    assert key_of(kernel, a1, k1) == key_of(kernel, a2, k2)


def test_keys_of_arguments():
    t = torch.empty(4, dtype=torch.float16)
    key = launch_mod._arg_key
    assert key(1) != key(True), "Triton types bools as i1, 1 as a constant"
    assert key(1) != key(17) and key(16) != key(17) and key(16) == key(32) and key(0) == key(48)
    assert key(17) == key(33) and key(2**31 + 1) != key(17) and key(2**63 + 1) != key(2**31 + 1)
    assert key(0.5) == key(2.0), "floats are fp32 whatever the value"
    assert key(t) != key(_misaligned(t))
    assert key(t) != key(t.to(torch.bfloat16))
    assert key(object()) is ..., "an unknown type is not keyed"


def test_constexpr_bool_and_int_differ():
    # True == 1 in Python; as constexprs they are two specializations, so two keys.
    kernel = _jit(bwd_tma._bwd_dq_tma_kernel)
    assert launch_mod._key(kernel, 0, (), {"HEAD_DIM": 1}) != launch_mod._key(kernel, 0, (), {"HEAD_DIM": True})


@pytest.mark.gpu
def test_cached_launches_match_triton_path(monkeypatch):
    # Each call three times through the cache (the first fills launch.py's plans, the second its
    # call sites' (launch_site), the third runs from those where its buffers' addresses came
    # back; neither of the last two may reach JITFunction.run, with new dropout seeds too), then
    # through Triton's path: the same bits.
    # The Gluon and TMA forwards, the TMA backward, the one-pass backward (whose dq may differ
    # in its last bits: atomics), the portable kernels (a window; dropout with ALiBi), and
    # decoding with splits. Call sites run as in use here, not rebuilt and compared.
    monkeypatch.setattr(launch_mod, "VERIFY_SITES", False)
    monkeypatch.setattr(launch_mod, "_SITES", {})
    runs = []
    run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **kw: runs.append(self) or run(self, *a, **kw))
    q, k, v = make_qkv(2, 300, 300, 4, 2, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dout = torch.randn_like(q)
    k_cache, v_cache = (torch.randn(2, 1000, 2, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    seqlens = torch.tensor([999, 500], dtype=torch.int32, device="cuda")
    slopes = torch.rand(4, device="cuda")
    cos, sin = (torch.rand(1000, 32, device="cuda").to(torch.bfloat16) for _ in range(2))
    q2, k2, v2 = make_qkv(1, 1024, 1024, 2, 2, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dout2 = torch.randn_like(q2)

    def calls():
        torch.manual_seed(0)  # the same dropout seeds in every round
        out = flash_attn_func(q2, k2, v2, causal=True)  # the one-pass backward from T = 1024
        results = [out, *torch.autograd.grad(out, (q2, k2, v2), dout2)]
        for kwargs in (dict(causal=True), dict(causal=False), dict(window_size=(64, 0)),
                       dict(dropout_p=0.1, alibi_slopes=slopes)):
            out = flash_attn_func(q, k, v, **kwargs)
            results += [out, *torch.autograd.grad(out, (q, k, v), dout)]
        results.append(flash_attn_with_kvcache(q[:, :1].detach(), k_cache, v_cache, cache_seqlens=seqlens,
                                               num_splits=4))
        # An append (into copies: each round starts from the same caches).
        kc, vc = k_cache.clone(), v_cache.clone()
        results.append(flash_attn_with_kvcache(q[:, :1].detach(), kc, vc, k_cache[:, :1], v_cache[:, :1],
                                               cache_seqlens=seqlens - 1))
        # And with rotary tables (q and the new k rotated in the kernels).
        results.append(flash_attn_with_kvcache(q[:, :1].detach(), kc, vc, k_cache[:, :1], v_cache[:, :1], cos, sin,
                                               cache_seqlens=seqlens - 1, causal=True))
        results += [kc, vc]
        return results

    misses = []
    prepared = launch_mod._prepared
    monkeypatch.setattr(launch_mod, "_prepared", lambda *a: misses.append(1) or prepared(*a))

    def round_on_cpu():
        # Copies: each round's GPU buffers are freed before the next, so that PyTorch's allocator
        # can hand the next round the same addresses, as a training loop's steps get them.
        return [r.detach().cpu() for r in calls()]

    launch_mod._PLANS.clear()
    first = round_on_cpu()
    assert launch_mod._PLANS, "the first calls leave plans"
    # The Gluon and TMA kernels' plans launch through their C launcher with kept tensor maps.
    assert any(direct is not None for _, direct in launch_mod._PLANS.values()), "no direct launches"
    runs.clear()
    # Another seed, the same plan: the seeds drawn after manual_seed(0) and (1) are 15 and 11
    # mod 16 (a multiple of 16 would be another specialization, in Triton too).
    torch.manual_seed(1)
    flash_attn_func(q, k, v, dropout_p=0.1, alibi_slopes=slopes)
    misses.clear()
    cached = round_on_cpu()
    assert launch_mod._SITES, "the second calls leave call-site plans"
    second_misses = len(misses)
    misses.clear()
    from_sites = round_on_cpu()
    # Where an address came back, the third round's launch ran from its site, without _prepared.
    assert len(misses) < second_misses, "no call of the third round found its site"
    assert not runs, f"cached launches went through Triton: {runs}"
    monkeypatch.setenv("IOATTN_FAST_LAUNCH", "0")
    triton_path = round_on_cpu()
    assert runs, "IOATTN_FAST_LAUNCH=0 launches through Triton"
    for i, rounds in enumerate(zip(first, cached, from_sites, triton_path)):
        if i == 1:  # the one-pass backward's dq
            for r in rounds[1:]:
                assert (r.float() - rounds[0].float()).abs().max() <= 1e-2 * rounds[0].float().abs().max()
        else:
            assert all(torch.equal(rounds[0], r) for r in rounds[1:])


class _Desc:
    """A host descriptor as make_tensordesc_arg reads it."""

    def __init__(self, base, shape, strides, padding="zero"):
        self.base, self.shape, self.strides, self.padding = base, shape, strides, padding


def _fake_compiled(signature, metas, recorder, scratch=0):
    """A compiled kernel whose launcher is Triton's own descriptor wrapper (triton 3.6) around
    ``recorder`` instead of the C launcher."""
    from types import SimpleNamespace
    from triton.backends.nvidia.driver import wrap_handle_tensordesc
    run = SimpleNamespace(launch=wrap_handle_tensordesc(recorder, signature, metas), global_scratch_size=scratch,
                          profile_scratch_size=0, launch_cooperative_grid=False, launch_pdl=True)
    return SimpleNamespace(run=run, function=1234, packed_metadata=(4, 1))


def test_direct_launch_expands_descriptors_as_triton(monkeypatch):
    # The direct launch's argument list against the one Triton's wrapper builds from the same
    # values (make_tensordesc_arg stubbed: the real one needs the CUDA driver), and the tensor
    # maps kept by value: the same descriptor values are encoded once, another address, shape or
    # metadata again.
    encoded = []

    def encode(desc, meta):
        encoded.append(desc)
        return [("map", desc.base.data_ptr(), tuple(desc.shape), meta["swizzle"]), *desc.shape, *desc.strides]

    import triton.backends.nvidia.driver as driver
    monkeypatch.setattr(driver, "make_tensordesc_arg", encode)
    monkeypatch.setattr(launch_mod, "make_tensordesc_arg", encode)
    monkeypatch.setattr(launch_mod, "_TENSOR_MAPS", {})
    signature = {"X": "*bf16", "dq": "tensordesc<bf16[64, 64]>", "n": "i32", "dk": "tensordesc<bf16[64, 128]>",
                 "BLOCK": "constexpr"}
    metas = [dict(swizzle=128, elem_size=2, elem_type=10, block_size=[64, 64], fp4_padded=False),
             dict(swizzle=64, elem_size=2, elem_type=10, block_size=[64, 128], fp4_padded=False)]
    calls = []
    compiled = _fake_compiled(signature, metas, lambda *a: calls.append(a))
    direct = launch_mod._direct(compiled)
    assert direct is not None and direct[1] == (1, 3)
    x, a, b = torch.empty(8), torch.empty(64 * 64), torch.empty(64 * 128)
    for base in (a, a, b):
        values = (x, _Desc(base, [64, 64], [64, 1]), 7, _Desc(b, [64, 128], [128, 1]), 16)
        ours = launch_mod._direct_args(direct, compiled, (3, 2, 1), 99, values)
        compiled.run.launch(3, 2, 1, 99, 1234, False, True, None, None, (4, 1), None, None, None, *values)
        assert ours == list(calls.pop())
    # Triton's path encoded both descriptors in each of the 3 rounds; ours three maps in all:
    # a and b under the first descriptor's metadata, b under the second's (found again after).
    assert len(encoded) == 6 + 3


def test_direct_launch_only_for_a_known_launcher():
    from types import SimpleNamespace
    signature = {"X": "*bf16", "d": "tensordesc<bf16[64, 64]>"}
    meta = dict(swizzle=128, elem_size=2, elem_type=10, block_size=[64, 64], fp4_padded=False)
    assert launch_mod._direct(_fake_compiled(signature, [meta], lambda *a: None)) is not None
    # Descriptors without metadata pass the tensor itself: not kept.
    assert launch_mod._direct(_fake_compiled(signature, None, lambda *a: None)) is None
    # Scratch buffers are allocated per launch by Triton's launcher.
    assert launch_mod._direct(_fake_compiled(signature, [meta], lambda *a: None, scratch=64)) is None
    # No descriptors and a launcher that is not a C function (test_direct_launch_without_descriptors
    # has the C function).
    assert launch_mod._direct(_fake_compiled({"X": "*bf16"}, None, lambda *a: None)) is None
    # Another launcher shape.
    run = SimpleNamespace(launch=lambda *a: None, global_scratch_size=0, profile_scratch_size=0)
    assert launch_mod._direct(SimpleNamespace(run=run)) is None


def test_launch_site_keeps_the_argument_list(monkeypatch):
    # launch_site with the GPU's parts stubbed (a plan's launcher, the stream): a key's launch is
    # built once, kept with its tensors as addresses, and run from there; a changed launch under
    # a seen key fails in verify mode; IOATTN_FAST_LAUNCH=0 and a None key build every time.
    launched, builds = [], []

    def c_launcher(*a):
        launched.append(a)

    def prepared(kernel, grid, args, kwargs, device):
        return c_launcher, (grid[0], 1, 1), (1234, *args, *kwargs.values()), kernel != "no direct call"

    monkeypatch.setattr(launch_mod, "_prepared", prepared)
    monkeypatch.setattr(launch_mod, "_fast", lambda kernel: True)
    monkeypatch.setattr(launch_mod, "_SITES", {})
    monkeypatch.setattr(launch_mod, "VERIFY_SITES", False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 77, raising=False)
    x = torch.zeros(4)

    def build(n=5):
        builds.append(n)
        return "kernel", (3,), (x, n, 0.5), {"BLOCK": 16}

    for _ in range(3):
        launch_mod.launch_site(("site", x.data_ptr()), build)
    assert builds == [5]
    assert launched[0][:5] == (3, 1, 1, 77, 1234) and launched[0][5] is x
    assert launched[1] == launched[2] == (3, 1, 1, 77, 1234, x.data_ptr(), 5, 0.5, 16)
    monkeypatch.setattr(launch_mod, "VERIFY_SITES", True)
    launch_mod.launch_site(("site", x.data_ptr()), build)
    assert builds == [5, 5] and len(launched) == 4
    with pytest.raises(AssertionError, match="arguments changed"):
        launch_mod.launch_site(("site", x.data_ptr()), lambda: build(6))
    monkeypatch.setattr(launch_mod, "VERIFY_SITES", False)
    monkeypatch.setenv("IOATTN_FAST_LAUNCH", "0")
    launch_mod.launch_site(("site", x.data_ptr()), build)
    monkeypatch.delenv("IOATTN_FAST_LAUNCH")
    launch_mod.launch_site(None, build)
    assert builds == [5, 5, 6, 5, 5]
    # A launch without the C launcher's direct call (its arguments would hold descriptors and
    # their tensors) is never kept.
    for _ in range(2):
        launch_mod.launch_site(("other", 1), lambda: ("no direct call", (1,), (x,), {}))
    assert ("other", 1) not in launch_mod._SITES and launched[-1][5] is x


def test_direct_launch_without_descriptors():
    # A kernel without descriptor arguments: Triton's launch is its C function (a builtin here),
    # called directly with the arguments Triton's CudaLauncher.__call__ passes it.
    calls = []
    compiled = _fake_compiled({"X": "*bf16", "n": "i32"}, None, calls.append)
    direct = launch_mod._direct(compiled)
    assert direct is not None and direct[0] == calls.append and direct[1] == ()
    x = torch.empty(8)
    assert launch_mod._direct_args(direct, compiled, (3, 2, 1), 99, (x, 7)) == [
        3, 2, 1, 99, 1234, False, True, None, None, (4, 1), None, None, None, x, 7]
    # With a scratch buffer Triton allocates per launch: its path.
    assert launch_mod._direct(_fake_compiled({"X": "*bf16"}, None, calls.append, scratch=64)) is None


def _as_launch(kernel, grid, args, kwargs):
    """A built launch with its tensors as addresses: what launch_site keeps under a key."""
    def value(a):
        return ("ptr", a.data_ptr(), a.dtype) if isinstance(a, torch.Tensor) else (type(a), a)
    return kernel, tuple(grid), tuple(map(value, args)), tuple(sorted((n, value(a)) for n, a in kwargs.items()))


def test_decode_site_keys_name_their_launches(monkeypatch):
    # Every decode launcher's launch_site key against the launch it builds, on the CPU: the same
    # inputs (and, through a stand-in for the launchers' allocations, the same output buffers)
    # called with each option changed in turn. Two calls with one key must build one launch; a
    # key that left out an option (the window, the scale, the split count, ...) fails here.
    monkeypatch.setenv("IOATTN_BACKEND", "triton")
    sites, keys_seen = {}, []

    def record_site(key, build):
        kernel, grid, args, kwargs = build()
        built = _as_launch(kernel, grid, args, kwargs)
        assert sites.setdefault(key, built) == built, f"site key {key!r} names two launches"
        keys_seen.append(key)
        launch_mod.launch(kernel, grid, *args, **kwargs)

    buffers = {}

    def stable_empty(shape, *, dtype, device):
        # One buffer per shape and dtype (zeroed each time): outputs keep their addresses.
        t = buffers.setdefault((tuple(shape), dtype), torch.empty(shape, dtype=dtype, device=device))
        return t.zero_()

    for module in (decode_kernel, decode_combine, decode_append, decode_rotary, decode_index_check):
        monkeypatch.setattr(module, "launch_site", record_site)
        monkeypatch.setattr(module, "empty", stable_empty)
    B, H, Hkv, D, T = 2, 4, 2, 32, 48
    q = torch.randn(B, 1, H, D, dtype=torch.float16)
    q2 = torch.randn(B, 2, H, D, dtype=torch.float16)
    k_cache, v_cache = (torch.randn(B, T, Hkv, D, dtype=torch.float16) for _ in range(2))
    pages_k, pages_v = (c.reshape(-1, 16, Hkv, D) for c in (k_cache, v_cache))
    table = torch.arange(B * T // 16, dtype=torch.int32).view(B, -1).flip(1).contiguous()
    seqlens = torch.tensor([T - 4, 9], dtype=torch.int32)
    new = torch.randn(B, 2, Hkv, D, dtype=torch.float16)
    cos, sin = (torch.rand(T, 8, dtype=torch.float16) for _ in range(2))
    slopes = torch.rand(H)
    leftpad = torch.tensor([2, 1], dtype=torch.int32)
    rows = torch.tensor([1, 0], dtype=torch.int32)
    base = dict(cache_seqlens=seqlens - 2, num_splits=2)
    variants = [{}, dict(num_splits=1), dict(num_splits=3), dict(causal=True), dict(window_size=(5, 0)),
                dict(window_size=(5, 3)), dict(softcap=10.0), dict(softmax_scale=0.3), dict(alibi_slopes=slopes),
                dict(cache_leftpad=leftpad), dict(cache_batch_idx=rows), dict(k=new, v=new),
                dict(k=new, v=new, rotary_cos=cos, rotary_sin=sin), dict(k=new, v=new, rotary_cos=cos, rotary_sin=sin,
                                                                      rotary_interleaved=False),
                dict(k=new, v=new, rotary_cos=cos, rotary_sin=sin, causal=True),
                dict(k=new[:, :1], v=new[:, :1]), dict(k=new, v=new, cache_batch_idx=rows)]
    kc, vc = k_cache.clone(), v_cache.clone()
    for query in (q, q2):
        for kwargs in variants:
            args = dict(base, **kwargs)
            kc.copy_(k_cache), vc.copy_(v_cache)  # appends write into kc, vc: the same buffers each time
            flash_attn_with_kvcache(query, kc, vc, **args)
            flash_attn_with_kvcache(query, kc, vc, **args)  # the same call again: its keys again
        for kwargs in (dict(block_table=table), dict(block_table=table, k=new, v=new),
                       dict(block_table=table[:, 1:], cache_seqlens=torch.tensor([20, 7], dtype=torch.int32))):
            flash_attn_with_kvcache(query, pages_k.clone(), pages_v.clone(), **dict(base, **kwargs))
    names = {key[0] for key in keys_seen}
    assert names == {"splitkv", "combine", "append", "rotary_q", "index_values"}, names
    # The stand-in kept the addresses, so calls did share keys where they should.
    assert len(set(keys_seen)) < len(keys_seen)
