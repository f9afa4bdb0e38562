"""merge_partials: attention over A ∪ B from the results over A and over B."""
import torch

from ioattn import merge_partials
from ioattn.flash.reference import attention_ref
from ioattn.testing import make_qkv


def test_merge_of_key_halves_equals_full_attention():
    q, k, v = make_qkv(2, 9, 30, 4, 2, 16, dtype=torch.float64)
    out_a, lse_a = attention_ref(q, k[:, :11], v[:, :11])
    out_b, lse_b = attention_ref(q, k[:, 11:], v[:, 11:])
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    ref, ref_lse = attention_ref(q, k, v)
    # lse is fp32 by contract, so the merge weights carry fp32 rounding
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, ref_lse)


def test_merge_with_empty_parts():
    q, k, v = make_qkv(1, 6, 4, 2, 2, 16, dtype=torch.float64)
    # causal Tq > Tk: the first rows see no key in part A; part B is entirely empty
    out_a, lse_a = attention_ref(q, k, v, causal=True)
    out_b = torch.zeros_like(out_a)
    lse_b = torch.full_like(lse_a, float("-inf"))
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, out_a)
    torch.testing.assert_close(lse, lse_a)
    assert torch.all(out[:, :2] == 0) and not torch.isnan(out).any()


def test_merge_many_parts_equals_full_attention():
    from ioattn import merge_partials_many

    q, k, v = make_qkv(2, 5, 40, 4, 2, 16, dtype=torch.float64)
    # Three parts, the middle one empty; lse kept [B, H, T] and handed over transposed.
    bounds = [(0, 13), (13, 13), (13, 40)]
    parts = [attention_ref(q, k[:, a:b], v[:, a:b]) for a, b in bounds]
    outs = torch.stack([o for o, _ in parts])
    lses = torch.stack([lse.transpose(1, 2) for _, lse in parts])
    out, lse = merge_partials_many(outs, lses)
    ref, ref_lse = attention_ref(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse.transpose(1, 2), ref_lse)


def test_merge_many_all_empty_rows_stay_zero():
    from ioattn import merge_partials_many

    outs = torch.zeros(3, 2, 4, 8)
    lses = torch.full((3, 2, 4), float("-inf"))
    lses[1, 0] = 0.5
    outs[1, 0] = 1.0
    out, lse = merge_partials_many(outs, lses)
    assert torch.equal(out[0], torch.ones(4, 8)) and torch.equal(out[1], torch.zeros(4, 8))
    assert torch.all(lse[0] == 0.5) and torch.all(torch.isneginf(lse[1]))
