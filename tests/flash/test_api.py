"""Public functions: contract, bad input, empty input, torch SDPA semantics, torch.compile.

Accuracy of each backend is tested in test_cpu.py / test_fwd.py / test_bwd.py; here the
accuracy rule is applied through the public entry points (autograd included) on the default
backend of the device, and once on the Triton kernels in the interpreter.
"""
import pytest
import torch

from ioattn import flash_attn_func, scaled_dot_product_attention
from ioattn.flash.reference import attention_ref
from ioattn.testing import assert_attention_close, assert_close, make_qkv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check_against_ref(q, k, v, *, causal, diag_offset=None, fn=None):
    """Run ``fn`` (default flash_attn_func) fwd+bwd and apply the accuracy rule to out and grads."""
    dout = torch.randn_like(q)
    if fn is None:
        out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    else:
        out, lse = fn(q, k, v), None
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    ref, ref_lse = attention_ref(q, k, v, causal=causal, diag_offset=diag_offset)
    base, base_lse = attention_ref(q, k, v, causal=causal, diag_offset=diag_offset, upcast=False)
    assert_close("out", out, ref, base)
    if lse is not None:
        assert_close("lse", lse, ref_lse, base_lse)
    grads_ref = torch.autograd.grad(ref, (q, k, v), dout.to(ref.dtype))
    grads_base = torch.autograd.grad(base, (q, k, v), dout)
    for name, g, gr, gb in zip(("dq", "dk", "dv"), (dq, dk, dv), grads_ref, grads_base):
        assert_close(name, g, gr, gb, factor=3.0)


@pytest.mark.parametrize(
    "B,Tq,Tk,H,Hkv,D,causal",
    [
        (2, 63, 63, 4, 4, 64, True),
        (1, 17, 100, 8, 2, 40, True),
        (1, 100, 17, 4, 1, 72, True),
        (2, 1, 257, 4, 2, 128, False),
    ],
    ids=lambda x: str(x),
)
def test_flash_attn_func_matches_reference(B, Tq, Tk, H, Hkv, D, causal):
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    q, k, v = make_qkv(B, Tq, Tk, H, Hkv, D, dtype=dtype, device=DEVICE, requires_grad=True)
    _check_against_ref(q, k, v, causal=causal)


@pytest.mark.parametrize(
    "window,softcap,alibi,causal",
    [((8, 4), 0.0, False, False), ((5, -1), 0.0, False, True), ((-1, -1), 3.0, False, True),
     ((-1, -1), 0.0, True, False), ((6, 0), 2.0, True, True)],
    ids=["window", "window-causal", "softcap-causal", "alibi", "all-causal"],
)
def test_features_match_reference(window, softcap, alibi, causal):
    _check_features(window, softcap, alibi, causal, torch.bfloat16 if DEVICE == "cuda" else torch.float32)


@pytest.mark.parametrize("window,softcap,alibi,causal", [((8, 4), 0.0, False, False), ((6, 0), 2.0, True, True)],
                         ids=["window", "all-causal"])
def test_features_triton_interpreter(monkeypatch, window, softcap, alibi, causal):
    """Feature options reach the Triton kernels through the public path (interpreter on CPU)."""
    if DEVICE == "cpu":
        monkeypatch.setenv("IOATTN_BACKEND", "triton")
    _check_features(window, softcap, alibi, causal, torch.float16)


def _check_features(window, softcap, alibi, causal, dtype):
    B, Tq, Tk, H, Hkv, D = 2, 37, 50, 4, 2, 40
    q, k, v = make_qkv(B, Tq, Tk, H, Hkv, D, dtype=dtype, device=DEVICE, requires_grad=True)
    slopes = torch.rand(B, H, device=DEVICE) if alibi else None
    kw = dict(causal=causal, window=window, softcap=softcap, alibi_slopes=slopes)
    dout = torch.randn_like(q)
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                  alibi_slopes=slopes, return_attn_probs=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, ref_lse = attention_ref(q, k, v, **kw)
    base, base_lse = attention_ref(q, k, v, upcast=False, **kw)
    assert_attention_close(out, lse, grads, ref, ref_lse, base, base_lse, (q, k, v), dout)


def test_flash_attn_func_triton_interpreter(monkeypatch):
    """The public path (custom op + autograd) on the Triton kernels, in the interpreter on CPU."""
    if DEVICE == "cpu":
        monkeypatch.setenv("IOATTN_BACKEND", "triton")
    q, k, v = make_qkv(1, 20, 33, 4, 2, 40, dtype=torch.float16, device=DEVICE, requires_grad=True)
    _check_against_ref(q, k, v, causal=True)


def test_output_contract():
    q, k, v = make_qkv(2, 5, 7, 4, 2, 24, dtype=torch.float32, device=DEVICE)
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (2, 4, 5) and lse.dtype == torch.float32
    assert probs is None
    assert torch.equal(flash_attn_func(q, k, v), out)


def test_rows_without_keys_are_zero_not_nan():
    # Tq > Tk causal, bottom-right: the first Tq - Tk rows see no key.
    q, k, v = make_qkv(1, 6, 2, 2, 2, 16, dtype=torch.float32, device=DEVICE, requires_grad=True)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.all(out[:, :4] == 0) and torch.all(lse[:, :, :4] == float("-inf"))
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 4:]).all()
    out.sum().backward()
    assert torch.all(q.grad[:, :4] == 0) and torch.isfinite(q.grad).all()


def test_empty_inputs():
    q, k, v = make_qkv(2, 0, 5, 4, 4, 16, device=DEVICE, dtype=torch.float32)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.shape == (2, 0, 4, 16) and lse.shape == (2, 4, 0)
    q, k, v = make_qkv(2, 3, 0, 4, 4, 16, device=DEVICE, dtype=torch.float32, requires_grad=True)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    out.sum().backward()
    assert torch.all(q.grad == 0)


def test_noncontiguous_last_dim_is_copied():
    q, k, v = make_qkv(1, 9, 9, 2, 2, 32, dtype=torch.float32, device=DEVICE)
    q_strided = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert q_strided.stride(-1) != 1
    torch.testing.assert_close(flash_attn_func(q_strided, k, v), flash_attn_func(q, k, v))


def _good():
    return make_qkv(1, 8, 8, 4, 2, 32, dtype=torch.float32, device=DEVICE)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dims"),
        (lambda q, k, v: (q, k[:, :5], v), ValueError, "k and v must have the same shape"),
        (lambda q, k, v: (q, k, v[..., :16]), ValueError, "head dim of v .* must equal that of q/k"),
        (lambda q, k, v: (q, k[..., :16], v[..., :16]), ValueError, "head dim"),
        (lambda q, k, v: (q, torch.cat([k, k]), torch.cat([v, v])), ValueError, "batch size"),
        (lambda q, k, v: (q[:, :, :3], k, v), ValueError, "multiple"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "q must be float16"),
        (lambda q, k, v: (q.half(), k, v), TypeError, "share one dtype"),
        (lambda q, k, v: (q.tolist(), k, v), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v: (q[..., :4], k[..., :4], v[..., :4]), ValueError, r"head dim D must be in \[8, 256\]"),
        (lambda q, k, v: (torch.randn(1, 8, 4, 264, device=q.device),) * 3, ValueError, "head dim D"),
    ],
    ids=["rank", "kv-shape", "dv", "head-dim", "batch", "heads", "int", "mixed", "not-tensor", "D<8", "D>256"],
)
def test_bad_input_is_rejected(mutate, exc, match):
    with pytest.raises(exc, match=match):
        flash_attn_func(*mutate(*_good()))


def test_bad_options_are_rejected():
    q, k, v = _good()
    for p in (1.5, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
            flash_attn_func(q, k, v, dropout_p=p)
    with pytest.raises(TypeError, match="dropout_p"):
        flash_attn_func(q, k, v, dropout_p="0.1")
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, k, v, window_size=(-2, 0))
    with pytest.raises(TypeError, match="window_size"):
        flash_attn_func(q, k, v, window_size=(4.0, 0))
    with pytest.raises(ValueError, match="softcap"):
        flash_attn_func(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="alibi_slopes"):
        flash_attn_func(q, k, v, alibi_slopes=torch.ones(3, device=q.device))
    with pytest.raises(TypeError, match="alibi_slopes"):
        flash_attn_func(q, k, v, alibi_slopes=torch.ones(4, dtype=torch.float64, device=q.device))
    with pytest.raises(ValueError, match="softmax_scale"):
        flash_attn_func(q, k, v, softmax_scale=float("nan"))


def test_fp64_on_gpu_and_mixed_devices_rejected():
    q, k, v = _good()
    if torch.cuda.is_available():
        with pytest.raises(TypeError, match="float64"):
            flash_attn_func(q.double(), k.double(), v.double())
        with pytest.raises(ValueError, match="one device"):
            flash_attn_func(q.cpu(), k, v)
    else:
        with pytest.raises(ValueError, match="one device"):
            flash_attn_func(q, k.to("meta"), v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Tq,Tk", [(33, 33), (20, 45), (45, 20)])
def test_sdpa_matches_torch(causal, Tq, Tk):
    """Top-left causal alignment and [B, H, T, D] layout, as torch's SDPA."""
    q, k, v = make_qkv(2, Tq, Tk, 4, 2, 40, dtype=torch.float32, device=DEVICE, layout="bhtd",
                       requires_grad=True)
    # to torch's [B, H, T, D]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def run(fn):
        return lambda *_: fn(qt, kt, vt, is_causal=causal, enable_gqa=True).transpose(1, 2)

    _check_against_ref(q, k, v, causal=causal, diag_offset=0, fn=run(scaled_dot_product_attention))
    torch.testing.assert_close(
        run(scaled_dot_product_attention)(), run(torch.nn.functional.scaled_dot_product_attention)(),
        atol=1e-5, rtol=1e-5,
    )


def test_sdpa_bad_input():
    q, k, v = (x.transpose(1, 2) for x in _good())
    with pytest.raises(ValueError, match="enable_gqa"):
        scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="query must have 4 dims"):
        scaled_dot_product_attention(q[0], k, v)


def test_torch_compile_fullgraph():
    q, k, v = make_qkv(2, 24, 40, 4, 2, 32, dtype=torch.float32, device=DEVICE, requires_grad=True)

    def f(q, k, v):
        return flash_attn_func(q, k, v, causal=True).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_eager = f(q, k, v)
    grads_eager = torch.autograd.grad(loss_eager, (q, k, v))
    torch.testing.assert_close(loss, loss_eager)
    for g, ge in zip(grads, grads_eager):
        torch.testing.assert_close(g, ge)


@pytest.mark.parametrize(
    "kw",
    [dict(causal=True), dict(window_size=(2, 1)), dict(softcap=1.5, causal=True),
     dict(alibi_slopes=torch.tensor([0.3, 0.1]))],
    ids=["causal", "window", "softcap", "alibi"],
)
def test_gradcheck_fp64_cpu(kw):
    """Finite differences in fp64 on the CPU backend: the backward is the derivative of the forward."""
    q, k, v = make_qkv(1, 5, 7, 2, 1, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attn_func(q, k, v, **kw), (q, k, v))
