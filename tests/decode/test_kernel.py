"""The split-KV Triton kernel (src/ioattn/decode/kernel.py) against the dense reference.

Without a GPU these run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET;
IOATTN_BACKEND=triton sends CPU tensors to the kernel). fp16 and fp32 here; bf16 at GPU sizes in
the gpu-marked tests (bf16 dots are wrong in triton 3.6's interpreter).
"""

import pytest
import torch

from ioattn import flash_attn_with_kvcache
from ioattn.decode.config import DecodeConfig, get_decode_config, get_num_splits, resident_per_sm
from ioattn.decode.kernel import kvcache_fwd_triton

from .cases import CASES, DEVICE, DTYPES, check_kvcache, make_case


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("IOATTN_BACKEND", "triton")


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_cases(name, triton_backend):
    *shape, seqlens, options = CASES[name]
    check_kvcache(make_case(*shape, seqlens, dtype=torch.float16, **options))


@pytest.mark.parametrize("name", ["varlen-empty-full", "paged32-causal-spec", "window-softcap-alibi"])
def test_kernel_fp32(name, triton_backend):
    *shape, seqlens, options = CASES[name]
    check_kvcache(make_case(*shape, seqlens, dtype=torch.float32, **options))


@pytest.mark.parametrize("num_splits", [1, 2, 5, 64])
def test_kernel_splits(num_splits, triton_backend):
    # 80 keys in 16-key blocks: 1 split, 2 uneven ones, 5 of one block each, and more splits
    # than blocks (the launcher caps them; the short sequences leave most splits empty).
    check_kvcache(make_case(3, 1, 1, 80, 4, 2, 40, [0, 37, 79], dtype=torch.float16, page_size=16,
                            num_splits=num_splits))


def _launch(config, num_splits):
    """flash_attn_with_kvcache's launcher, with a forced config."""
    def call(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None, causal=False,
             return_softmax_lse=True):
        from ioattn.decode.ops import append_kv
        append_kv(k_cache, v_cache, k, v, cache_seqlens, block_table=block_table)
        return kvcache_fwd_triton(q, k_cache, v_cache, cache_seqlens + k.shape[1], q.shape[-1] ** -0.5,
                                  causal, block_table=block_table, num_splits=num_splits, config=config)
    return call


@pytest.mark.parametrize("prefetch", [False, True], ids=["", "prefetch"])
@pytest.mark.parametrize("page_size", [16, 64], ids=lambda p: f"page{p}")
def test_kernel_pages_smaller_and_larger_than_tiles(page_size, prefetch):
    # 32-key tiles over 16-key pages gather two pages per tile; over 64-key pages, half a page.
    # 16-row query tiles split the 2 heads x 12 queries over two programs. Page numbers loaded
    # in the tile or a tile ahead.
    cfg = DecodeConfig(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1, prefetch_pages=prefetch)
    kw = make_case(2, 12, 12, 128, 4, 2, 24, [3, 100], dtype=torch.float16, page_size=page_size,
                   causal=True)
    check_kvcache(kw, call=_launch(cfg, num_splits=3))


@pytest.mark.parametrize("variant", ["base", "paged_split", "full_grid"])
def test_kernel_gpu_configs_run(variant):
    # The configs the H200 picks (interpret=False), run here too (in the interpreter without a
    # GPU) on a cache longer than their 64- and 128-key tiles, paged where the variant is.
    cfg = get_decode_config(4, 64, torch.float16, interpret=False, paged_split=variant == "paged_split",
                            full_grid=variant == "full_grid")
    kw = make_case(2, 1, 1, 320, 8, 2, 64, [300, 77], dtype=torch.float16,
                   page_size=16 if variant == "paged_split" else None)
    check_kvcache(kw, call=_launch(cfg, num_splits=2 if variant == "paged_split" else 1))


def test_kernel_empty_rows_are_zero(triton_backend):
    # Empty caches and no append: every row sees nothing, in every split.
    kw = make_case(2, 1, 0, 32, 4, 2, 16, [0, 0], dtype=torch.float16, num_splits=3)
    out, lse = flash_attn_with_kvcache(**kw, return_softmax_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_num_splits_heuristic():
    # A full GPU does not split; a small batch splits toward two waves, limited by the length.
    assert get_num_splits(132 * 2, 100_000, 64, 132) == 1
    assert get_num_splits(8, 128 * 1024, 64, 132) == 66
    assert get_num_splits(64, 32 * 1024, 64, 132) == 8
    assert get_num_splits(8, 1024, 64, 132) == 16
    assert get_num_splits(8, 10, 64, 132) == 1
    assert get_num_splits(1, 10**7, 64, 132) == 128
    # With three programs resident per SM, long splits fill those slots once: B = 1 x 128k and
    # B = 8 x 32k (8 and 64 programs); short splits (B = 1 x 32k, B = 8 x 8k) and long-split
    # tiles' lengths (B = 8 x 128k) keep the waves.
    assert get_num_splits(8, 128 * 1024, 64, 132, resident=3) == 49
    assert get_num_splits(64, 32 * 1024, 64, 132, resident=3) == 6
    assert get_num_splits(8, 32 * 1024, 64, 132, resident=3) == 66
    assert get_num_splits(64, 8 * 1024, 64, 132, resident=3) == 8
    assert get_num_splits(64, 128 * 1024, 64, 132, resident=3) == 8
    assert get_num_splits(132 * 2, 100_000, 64, 132, resident=3) == 1
    # A full grid of a long contiguous cache at Tq = 1 splits in 4 (B = 64 x 128k, 512
    # programs), each split keeping 32k keys; shorter caches and other calls do not.
    assert get_num_splits(512, 128 * 1024, 64, 132, split_full_grid=True) == 4
    assert get_num_splits(512, 128 * 1024 - 1, 64, 132, split_full_grid=True) == 1
    assert get_num_splits(512, 32 * 1024, 64, 132, split_full_grid=True) == 1
    assert get_num_splits(512, 128 * 1024, 64, 132) == 1


def test_resident_only_where_measured():
    decode = get_decode_config(4, 128, torch.bfloat16, interpret=False)
    assert resident_per_sm(decode, 128, torch.bfloat16) == 3
    assert resident_per_sm(decode, 64, torch.bfloat16) == 0
    assert resident_per_sm(decode, 128, torch.float32) == 0
    assert resident_per_sm(get_decode_config(4, 128, torch.bfloat16, interpret=False, full_grid=True),
                           128, torch.bfloat16) == 0
    assert resident_per_sm(get_decode_config(4, 128, torch.bfloat16, interpret=False, paged_split=True),
                           128, torch.bfloat16) == 0


def test_config_branches():
    for rows in (1, 4, 8, 40, 300):
        for D in (16, 64, 128, 256):
            for dtype in DTYPES.values():
                for interpret in (False, True):
                    cfg = get_decode_config(rows, D, dtype, interpret=interpret)
                    for block in (cfg.BLOCK_M, cfg.BLOCK_N):
                        assert block >= 16 and block & (block - 1) == 0, cfg


GPU_CASES = {
    "decode-4k-splits": (4, 1, 1, 4096, 32, 8, 128, [4095, 1, 3000, 0], {}),
    "paged16": (4, 1, 1, 4096, 32, 8, 128, [4095, 17, 3000, 0], dict(page_size=16)),
    "paged256-rotary": (2, 1, 1, 4096, 32, 8, 128, [4000, 700], dict(page_size=256, rotary_dim=128,
                                                                      causal=True)),
    "spec-causal-leftpad": (2, 4, 4, 2048, 16, 2, 64, [2000, 9], dict(causal=True, leftpad=True)),
    "prefill-chunk": (1, 300, 300, 2048, 8, 2, 128, [1200], dict(causal=True)),
    "mqa-window-alibi-rows": (2, 1, 1, 4096, 16, 1, 96, [4000, 333], dict(window_size=(512, 0), alibi=True,
                                                                          batch_rows=5)),
    # 24 x 8 programs fill the H200's 132 SMs unsplit, over >= 4096 keys: the full-grid tiles.
    "full-grid": (24, 1, 1, 4608, 32, 8, 128, list(range(0, 4608, 193)), {}),
    # With 4 splits each streams 16384 keys: the same tiles, split.
    "long-splits": (2, 1, 1, 65536, 32, 8, 128, [65535, 40001], {}),
}


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [0, 1, 4, 16])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_kernel_gpu(name, dtype, num_splits):
    *shape, seqlens, options = GPU_CASES[name]
    check_kvcache(make_case(*shape, seqlens, dtype=DTYPES[dtype], num_splits=num_splits, **options))


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged16"])
def test_kernel_gpu_under_cuda_graph(paged):
    # A captured call (value checks skipped: they read back to the host) replays to the eager
    # result bit for bit, splits and their combine included.
    kw = make_case(2, 1, 0, 4096, 32, 8, 128, [4096, 1000], dtype=torch.bfloat16,
                   page_size=16 if paged else None, num_splits=16)
    eager = flash_attn_with_kvcache(**kw)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        captured = flash_attn_with_kvcache(**kw)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)


@pytest.mark.gpu
def test_kernel_gpu_split_count_does_not_change_results():
    # Splits change the order of the sums only: results agree to rounding.
    kw = make_case(1, 1, 0, 8192, 32, 8, 128, [8192], dtype=torch.bfloat16)
    outs = [flash_attn_with_kvcache(**kw, num_splits=s).float() for s in (1, 3, 32)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=2e-2, rtol=2e-2)




@pytest.mark.gpu
def test_kernel_gpu_combine_pdl_matches_plain_launch(monkeypatch):
    # The combine launched as a programmatic dependent of the split kernel (it may start before
    # the splits end, and waits for their writes in gdc_wait) gives the plain launch's result bit
    # for bit: a combine reading partials too early would differ. Repeated, since a race need not
    # show every time.
    from ioattn.decode import combine

    kw = make_case(8, 1, 0, 32768, 32, 8, 128, [32768, 30000, 1, 0, 777, 32768, 16000, 5], dtype=torch.bfloat16,
                   num_splits=8)
    assert combine.use_pdl(kw["q"])
    with_pdl = [flash_attn_with_kvcache(**kw) for _ in range(5)]
    monkeypatch.setattr(combine, "PDL", False)
    assert not combine.use_pdl(kw["q"])
    plain = flash_attn_with_kvcache(**kw)
    for out in with_pdl:
        assert torch.equal(out, plain)


def test_combine_pdl_only_when_compiled():
    # The interpreter has no grid dependency control, and CPU tensors no GPU to launch on.
    from ioattn.decode import combine

    assert not combine.use_pdl(torch.zeros(1))


@pytest.mark.parametrize("S", [2, 3, 17])
def test_combine_equals_merge_partials_many(S):
    # The Triton combine and the torch merge that ring attention uses agree; rows empty in
    # every split stay (0, -inf), rows empty in some splits ignore those.
    from ioattn import merge_partials_many
    from ioattn.decode.combine import combine_splits

    parts = torch.randn(S, 2, 3, 4, 40, device=DEVICE)
    lses = torch.randn(S, 2, 3, 4, device=DEVICE) * 3
    lses[:, 0, 0, 0] = float("-inf")
    lses[1:, 1, 2, 3] = float("-inf")
    parts[lses == float("-inf")] = 0.0
    out, lse = combine_splits(parts, lses, torch.float16)
    ref, ref_lse = merge_partials_many(parts.double(), lses.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(lse.double(), ref_lse.transpose(1, 2), atol=1e-5, rtol=1e-5)
    assert torch.all(out[0, 0, 0] == 0) and lse[0, 0, 0] == float("-inf")



def test_gpu_configs_compile_without_spills():
    # The H200 configs (bf16, D = 128, every feature on and off) compile for sm_90a without spilling
    # registers (tests/decode/ptxas_check.py, no GPU needed).
    from tests.compile_child import child_report

    spills = child_report("tests.decode.ptxas_check")
    assert len(spills) == 10 and all(v == 0 for v in spills.values()), spills
