"""The reference is the spec: check it against torch's own math and the documented masks."""
import torch

from ioattn.flash.reference import attention_ref, visible_mask
from ioattn.testing import make_qkv


def test_causal_alignment_matches_docstring():
    rows = visible_mask(2, 5, causal=True, diag_offset=3).int().tolist()
    assert rows == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    rows = visible_mask(5, 2, causal=True, diag_offset=-3).int().tolist()
    assert rows == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]


def test_reference_matches_torch_math_sdpa():
    q, k, v = make_qkv(2, 13, 21, 6, 2, 24, dtype=torch.float64)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    for causal in (False, True):
        out, lse = attention_ref(q, k, v, causal=causal, diag_offset=0)
        ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True)
        torch.testing.assert_close(out, ref.transpose(1, 2))
        scores = (qt @ kt.repeat_interleave(3, 1).transpose(-1, -2)) / 24**0.5
        if causal:
            scores = scores.masked_fill(~visible_mask(13, 21, causal=True, diag_offset=0), float("-inf"))
        torch.testing.assert_close(lse, scores.logsumexp(-1).float())


def test_window_mask():
    rows = visible_mask(4, 4, causal=False, diag_offset=0, window=(1, 0)).int().tolist()
    assert rows == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    # causal forces right = 0; bottom-right alignment with Tq=2, Tk=5
    rows = visible_mask(2, 5, causal=True, diag_offset=3, window=(1, 2)).int().tolist()
    assert rows == [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]


def test_softcap_and_alibi_scores():
    q, k, v = make_qkv(1, 3, 4, 2, 1, 8, dtype=torch.float64)
    slopes = torch.tensor([0.5, 0.25])
    out, lse = attention_ref(q, k, v, softmax_scale=0.7, softcap=2.0, alibi_slopes=slopes)
    s = torch.einsum("bihd,bjd->bhij", q, k[:, :, 0]) * 0.7
    s = 2.0 * torch.tanh(s / 2.0)
    dist = (torch.arange(3)[:, None] + 1 - torch.arange(4)[None, :]).abs()
    s = s - slopes.double()[None, :, None, None] * dist
    torch.testing.assert_close(lse, s.logsumexp(-1).float())
    ref = torch.einsum("bhij,bjd->bihd", s.softmax(-1), v[:, :, 0])
    torch.testing.assert_close(out, ref)
