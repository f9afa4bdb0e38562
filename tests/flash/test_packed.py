"""Packed entry points agree with flash_attn_func, gradients included, and reject bad packing."""
import pytest
import torch

from ioattn import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func


def test_qkvpacked_matches_unpacked():
    qkv = torch.randn(2, 19, 3, 4, 40, requires_grad=True)
    out = flash_attn_qkvpacked_func(qkv, causal=True, window_size=(5, 0))
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, dout)
    q, k, v = (x.detach().requires_grad_() for x in qkv.unbind(2))
    ref = flash_attn_func(q, k, v, causal=True, window_size=(5, 0))
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(ref, (q, k, v), dout)
    torch.testing.assert_close(grad, torch.stack(grads, dim=2))


def test_kvpacked_matches_unpacked_gqa():
    q = torch.randn(2, 11, 8, 24, requires_grad=True)
    kv = torch.randn(2, 23, 2, 2, 24, requires_grad=True)
    out, lse, _ = flash_attn_kvpacked_func(q, kv, causal=True, return_attn_probs=True)
    dout = torch.randn_like(out)
    dq, dkv = torch.autograd.grad(out, (q, kv), dout)
    k, v = (x.detach().requires_grad_() for x in kv.unbind(2))
    q2 = q.detach().requires_grad_()
    ref, ref_lse, _ = flash_attn_func(q2, k, v, causal=True, return_attn_probs=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    rq, rk, rv = torch.autograd.grad(ref, (q2, k, v), dout)
    torch.testing.assert_close(dq, rq)
    torch.testing.assert_close(dkv, torch.stack((rk, rv), dim=2))


def test_bad_packing():
    with pytest.raises(ValueError, match="qkv must have shape"):
        flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, 16))
    with pytest.raises(ValueError, match="kv must have shape"):
        flash_attn_kvpacked_func(torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16))
    with pytest.raises(TypeError, match="qkv must be a torch.Tensor"):
        flash_attn_qkvpacked_func([1, 2, 3])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_varlen_packed_match_unpacked(monkeypatch, backend):
    """qkv [total, 3, H, D] and kv [total_k, 2, Hkv, D] views give flash_attn_varlen_func's out,
    lse and (packed) gradients exactly, on both backends (Triton: interpreter or GPU)."""
    from ioattn import flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setenv("IOATTN_BACKEND", backend)
    dtype = torch.float16 if backend == "triton" else torch.float32
    cu = torch.tensor([0, 5, 5, 22, 30], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 9, 10, 10, 27], dtype=torch.int32, device=device)

    def leaf(*shape):
        return torch.randn(*shape, device=device).to(dtype).requires_grad_()

    def same(packed_out, packed_in, outs_ref, ins_ref):
        out, lse, _ = packed_out
        ref, ref_lse, _ = outs_ref
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
        torch.testing.assert_close(lse, ref_lse, atol=0, rtol=0)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, packed_in, dout)
        rq, rk, rv = torch.autograd.grad(ref, ins_ref, dout)
        return grads, (rq, rk, rv)

    qkv = leaf(30, 3, 4, 16)
    q, k, v = (x.detach().requires_grad_() for x in qkv.unbind(1))
    (dqkv,), (rq, rk, rv) = same(
        flash_attn_varlen_qkvpacked_func(qkv, cu, None, causal=True, return_attn_probs=True), (qkv,),
        flash_attn_varlen_func(q, k, v, cu, cu, 17, 17, causal=True, return_attn_probs=True), (q, k, v))
    torch.testing.assert_close(dqkv, torch.stack((rq, rk, rv), dim=1), atol=0, rtol=0)

    q, kv = leaf(30, 4, 16), leaf(27, 2, 2, 16)
    q2 = q.detach().requires_grad_()
    k, v = (x.detach().requires_grad_() for x in kv.unbind(1))
    (dq, dkv), (rq, rk, rv) = same(
        flash_attn_varlen_kvpacked_func(q, kv, cu, cu_k, 17, 17, window_size=(4, 2), return_attn_probs=True),
        (q, kv),
        flash_attn_varlen_func(q2, k, v, cu, cu_k, 17, 17, window_size=(4, 2), return_attn_probs=True),
        (q2, k, v))
    torch.testing.assert_close(dq, rq, atol=0, rtol=0)
    torch.testing.assert_close(dkv, torch.stack((rk, rv), dim=1), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"kv must have shape \[total_k, 2, Hkv, D\]"):
        flash_attn_varlen_kvpacked_func(q, kv[:, :1], cu, cu_k)
