"""flash_attn_varlen_func and the pad/unpad helpers (src/ioattn/flash/varlen.py).

The reference is the dense reference applied to each sequence's slice; the accuracy rule is
applied to the packed out, lse and gradients, on the CPU backend and on the Triton kernels in
the interpreter.
"""
import pytest
import torch

from ioattn import flash_attn_varlen_func, pad_input, unpad_input
from ioattn.flash.cpu_blocked import sequence_seed
from ioattn.flash.ops import draw_seed
from ioattn.flash.reference import attention_ref
from ioattn.testing import assert_attention_close, dropout_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (len_q, len_k) per sequence: empty queries, empty keys, single tokens, Tq < Tk and Tq > Tk.
SEQS = [(5, 5), (0, 3), (1, 1), (17, 30), (3, 0), (40, 12), (1, 9)]
TAIL = 3  # rows past cu_seqlens[-1] in q and k, owned by no sequence


def _cu(lengths, device):
    return torch.tensor([0] + lengths, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)


def _make(seqs, H, Hkv, D, dtype, tail=TAIL, device=DEVICE):
    lq, lk = [s[0] for s in seqs], [s[1] for s in seqs]
    q = torch.randn(sum(lq) + tail, H, D, device=device).to(dtype).requires_grad_()
    k = torch.randn(sum(lk) + tail, Hkv, D, device=device).to(dtype).requires_grad_()
    v = torch.randn(sum(lk) + tail, Hkv, D, device=device).to(dtype).requires_grad_()
    return q, k, v, _cu(lq, device), _cu(lk, device)


def _varlen_ref(q, k, v, cu_q, cu_k, *, upcast, alibi_slopes=None, masks=None, **kw):
    """Dense reference per sequence, packed back: out ``[total_q, H, D]``, lse ``[H, total_q]``;
    the rows past cu_q[-1] hold 0 and −inf. ``masks``: the dropout keep mask of each sequence."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1]
        o, lse = attention_ref(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
                               upcast=upcast, alibi_slopes=slopes,
                               dropout_mask=None if masks is None else masks[b], **kw)
        outs.append(o[0])
        lses.append(lse[0])
    tail = q.shape[0] - cq[-1]
    outs.append(torch.zeros(tail, *q.shape[1:], dtype=outs[0].dtype, device=q.device))
    lses.append(torch.full((q.shape[1], tail), float("-inf"), device=q.device))
    return torch.cat(outs), torch.cat(lses, dim=1)


def _check(q, k, v, cu_q, cu_k, *, causal=False, window=(-1, -1), softcap=0.0, alibi_slopes=None):
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=causal, window_size=window,
                                         softcap=softcap, alibi_slopes=alibi_slopes,
                                         return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    dout = torch.randn_like(q)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    kw = dict(causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    ref, ref_lse = _varlen_ref(q, k, v, cu_q, cu_k, upcast=True, **kw)
    base, base_lse = _varlen_ref(q, k, v, cu_q, cu_k, upcast=False, **kw)
    assert_attention_close(out, lse, grads, ref, ref_lse, base, base_lse, (q, k, v), dout)
    return out, lse, grads


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_matches_reference(monkeypatch, backend, dtype, causal):
    if DEVICE == "cuda":
        pytest.skip("the CPU and interpreter variants; GPU runs test_varlen_gpu_bf16")
    if backend == "cpu" and dtype == torch.float16:
        pytest.skip("fp16 on the CPU backend is covered by test_cpu.py's dense cases")
    monkeypatch.setenv("IOATTN_BACKEND", backend)
    q, k, v, cu_q, cu_k = _make(SEQS, 4, 2, 40, dtype)
    out, lse, (dq, dk, dv) = _check(q, k, v, cu_q, cu_k, causal=causal)
    # Rows past cu_seqlens[-1]: out 0, lse −inf, gradient 0 (documented).
    end_q, end_k = cu_q[-1].item(), cu_k[-1].item()
    assert (out[end_q:] == 0).all() and (lse[:, end_q:] == float("-inf")).all()
    assert (dq[end_q:] == 0).all() and (dk[end_k:] == 0).all() and (dv[end_k:] == 0).all()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_varlen_features(monkeypatch, backend):
    """Window, softcap and per-sequence ALiBi slopes, aligned bottom-right in each sequence."""
    if DEVICE == "cpu":
        monkeypatch.setenv("IOATTN_BACKEND", backend)
    dtype = torch.float32 if backend == "cpu" else torch.float16
    seqs = [(9, 20), (0, 2), (12, 7), (1, 1)]
    # The CPU backend runs CPU tensors on a GPU host too.
    device = "cpu" if backend == "cpu" else DEVICE
    q, k, v, cu_q, cu_k = _make(seqs, 4, 1, 32, dtype, device=device)
    slopes = torch.rand(len(seqs), 4, device=device)
    _check(q, k, v, cu_q, cu_k, causal=True, window=(5, -1), softcap=2.0, alibi_slopes=slopes)


def _varlen_masks(seed, seqs, total_q, H, p, backend):
    """Each sequence's keep mask ``[1, H, Tq_b, Tk_b]``: on the Triton kernels a slice of one
    mask over the packed rows (dropout.py), on CPU one mask per sequence seed."""
    if backend == "cpu":
        return [dropout_mask(sequence_seed(int(seed), b), 1, H, lq, lk, p, backend="cpu")
                for b, (lq, lk) in enumerate(seqs)]
    dense = dropout_mask(seed, 1, H, total_q, max(lk for _, lk in seqs), p, backend=backend, device=DEVICE)
    starts = _cu([lq for lq, _ in seqs], "cpu").tolist()
    return [dense[:, :, starts[b]:starts[b] + lq, :lk] for b, (lq, lk) in enumerate(seqs)]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_varlen_dropout(monkeypatch, backend):
    """Dropout with the masks the backend makes from the seed drawn after torch.manual_seed;
    sequences 0 and 3 have equal lengths and must still get masks of their own."""
    if DEVICE == "cpu":
        monkeypatch.setenv("IOATTN_BACKEND", backend)
    dtype = torch.float32 if backend == "cpu" else torch.float16
    seqs, H, p = [(9, 20), (0, 2), (12, 7), (9, 20), (1, 1)], 4, 0.3
    # The CPU backend runs CPU tensors on a GPU host too.
    q, k, v, cu_q, cu_k = _make(seqs, H, 2, 32, dtype, device="cpu" if backend == "cpu" else DEVICE)
    torch.manual_seed(9)
    seed = draw_seed(p)
    torch.manual_seed(9)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, dropout_p=p, causal=True,
                                         return_attn_probs=True)
    dout = torch.randn_like(q)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    masks = _varlen_masks(seed, seqs, q.shape[0], H, p, backend)
    kw = dict(causal=True, dropout_p=p, masks=masks)
    ref, ref_lse = _varlen_ref(q, k, v, cu_q, cu_k, upcast=True, **kw)
    base, base_lse = _varlen_ref(q, k, v, cu_q, cu_k, upcast=False, **kw)
    assert_attention_close(out, lse, grads, ref, ref_lse, base, base_lse, (q, k, v), dout)
    assert not torch.equal(masks[0], masks[3])


def test_varlen_all_empty():
    """B = 0 and sequences of length 0 only: nothing runs, everything is 0 / −inf."""
    q, k, v, cu_q, cu_k = _make([(0, 0), (0, 4)], 2, 2, 16, torch.float32, tail=2)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, return_attn_probs=True)
    assert (out == 0).all() and (lse == float("-inf")).all()
    empty = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out = flash_attn_varlen_func(q, k, v, empty, empty)
    assert out.shape == q.shape and (out == 0).all()


def test_varlen_matches_dense_when_equal_lengths():
    """Equal lengths packed = flash_attn_func on the padded-free batch (same backend, same bits)."""
    from ioattn import flash_attn_func

    B, T, H, D = 3, 21, 4, 32
    q, k, v = (torch.randn(B, T, H, D, device=DEVICE) for _ in range(3))
    cu = _cu([T] * B, DEVICE)
    out = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, T, T, causal=True)
    torch.testing.assert_close(out.unflatten(0, (B, T)), flash_attn_func(q, k, v, causal=True))


def test_unpad_pad_round_trip_and_gradient():
    B, T, H, D = 3, 7, 2, 8
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]],
                        dtype=torch.bool, device=DEVICE)
    x = torch.randn(B, T, H, D, device=DEVICE, requires_grad=True)
    x_unpad, indices, cu, max_seqlen = unpad_input(x, mask)
    assert x_unpad.shape == (10, H, D) and max_seqlen == 7
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 10, 10]
    y = pad_input(x_unpad, indices, B, T)
    torch.testing.assert_close(y, x * mask[:, :, None, None])
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g * mask[:, :, None, None])


def test_unpad_attention_pad_matches_masked_dense():
    """The typical use: unpad, varlen attention, pad back == per-sequence attention."""
    B, T, H, D = 2, 9, 2, 16
    lengths = [9, 4]
    mask = torch.arange(T, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]
    q, k, v = (torch.randn(B, T, H, D, device=DEVICE) for _ in range(3))
    qu, idx, cu, m = unpad_input(q, mask)
    ku, _, _, _ = unpad_input(k, mask)
    vu, _, _, _ = unpad_input(v, mask)
    out = pad_input(flash_attn_varlen_func(qu, ku, vu, cu, cu, m, m, causal=True), idx, B, T)
    for b, n in enumerate(lengths):
        ref, _ = attention_ref(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], causal=True)
        torch.testing.assert_close(out[b:b + 1, :n], ref.to(out.dtype), atol=1e-5, rtol=1e-5)
        assert (out[b, n:] == 0).all()


def _bad_inputs():
    q, k, v, cu_q, cu_k = _make([(3, 4), (2, 2)], 2, 2, 16, torch.float32, tail=0)
    return q.detach(), k.detach(), v.detach(), cu_q, cu_k


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda a: {**a, "cu_seqlens_q": a["cu_seqlens_q"].long()}, TypeError, "cu_seqlens_q must be int32"),
        (lambda a: {**a, "cu_seqlens_k": [0, 4, 6]}, TypeError, "cu_seqlens_k must be a torch.Tensor"),
        (lambda a: {**a, "cu_seqlens_q": a["cu_seqlens_q"][None]}, ValueError, "cu_seqlens_q must be 1-D"),
        (lambda a: {**a, "cu_seqlens_k": a["cu_seqlens_k"][:2]}, ValueError, "same length"),
        (lambda a: {**a, "cu_seqlens_q": a["cu_seqlens_q"] + 1}, ValueError, "cu_seqlens_q must start at 0"),
        (lambda a: {**a, "cu_seqlens_k": torch.tensor([0, 5, 4], dtype=torch.int32)}, ValueError,
         "cu_seqlens_k must be non-decreasing"),
        (lambda a: {**a, "cu_seqlens_q": torch.tensor([0, 3, 6], dtype=torch.int32)}, ValueError,
         r"cu_seqlens_q\[-1\] = 6 is past"),
        (lambda a: {**a, "max_seqlen_q": 2}, ValueError, "max_seqlen_q = 2 is less"),
        (lambda a: {**a, "max_seqlen_k": -1}, ValueError, "max_seqlen_k must be an int"),
        (lambda a: {**a, "q": a["q"][None]}, ValueError, "q must have 3 dims"),
        (lambda a: {**a, "alibi_slopes": torch.rand(3, 2)}, ValueError, "alibi_slopes"),
        (lambda a: {**a, "dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\)"),
    ],
    ids=["cu-dtype", "cu-list", "cu-2d", "cu-length", "cu-start", "cu-monotone", "cu-past-end",
         "max-too-small", "max-negative", "q-4d", "alibi-shape", "dropout"],
)
def test_varlen_bad_input(change, exc, match):
    if DEVICE == "cuda":
        pytest.skip("CPU-built bad inputs")
    q, k, v, cu_q, cu_k = _bad_inputs()
    args = change(dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k))
    with pytest.raises(exc, match=match):
        flash_attn_varlen_func(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_varlen_bad_input_device():
    q, k, v, cu_q, cu_k = _make([(3, 4)], 2, 2, 16, torch.float16)
    with pytest.raises(ValueError, match="cu_seqlens_q must be on q's device"):
        flash_attn_varlen_func(q, k, v, cu_q.cpu(), cu_k)


@pytest.mark.parametrize("given_max", [True, False], ids=["max-given", "max-none"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_varlen_torch_compile_fullgraph(given_max, dropout_p):
    if dropout_p and DEVICE == "cuda":
        pytest.skip("inductor draws the dropout seed with its own generator (see ops.draw_seed)")
    seqs = [(5, 8), (0, 2), (11, 11)]
    q, k, v, cu_q, cu_k = _make(seqs, 4, 2, 32, torch.float32 if DEVICE == "cpu" else torch.bfloat16)
    mq, mk = (11, 11) if given_max else (None, None)

    def f(q, k, v, cu_q, cu_k):
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, dropout_p=dropout_p, causal=True)
        return out.float().square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    # The same seed for both calls when dropout is on.
    torch.manual_seed(4)
    loss = compiled(q, k, v, cu_q, cu_k)
    grads = torch.autograd.grad(loss, (q, k, v))
    torch.manual_seed(4)
    loss_e = f(q, k, v, cu_q, cu_k)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss, loss_e)
    for g, ge in zip(grads, grads_e):
        torch.testing.assert_close(g, ge)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_gpu_bf16(causal):
    seqs = SEQS + [(300, 300), (129, 513)]
    q, k, v, cu_q, cu_k = _make(seqs, 8, 2, 128, torch.bfloat16)
    _check(q, k, v, cu_q, cu_k, causal=causal)


@pytest.mark.gpu
def test_varlen_gpu_bf16_features():
    seqs = [(100, 250), (0, 2), (77, 40), (1, 1)]
    q, k, v, cu_q, cu_k = _make(seqs, 4, 4, 64, torch.bfloat16)
    slopes = torch.rand(4, device=DEVICE)
    _check(q, k, v, cu_q, cu_k, causal=False, window=(16, 8), softcap=5.0, alibi_slopes=slopes)
