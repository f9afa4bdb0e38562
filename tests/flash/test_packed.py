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
