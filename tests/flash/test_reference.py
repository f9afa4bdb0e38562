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
