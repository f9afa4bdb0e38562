"""index_check.py's kernel (the value checks' gathering of the index vectors and count of bad
pages) against the torch ops the CPU backend runs, in Triton's interpreter on CPU tensors or on
the GPU."""
import pytest
import torch

from ioattn.decode import checks
from ioattn.decode.index_check import BLOCK_P, index_values

from .cases import DEVICE


def torch_values(seqlens, leftpad, rows, table, T_new, page, num_pages):
    """What the kernel gathers, with the torch ops of checks.py (bad pages counted per sequence)."""
    parts = [x.long() for x in (seqlens, leftpad, rows) if x is not None]
    if table is not None:
        parts.append(checks._bad_pages(table, seqlens.long() + T_new, page, num_pages).sum(1))
    return torch.cat(parts).tolist()


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("with_leftpad, with_rows", [(True, False), (False, True), (True, True), (False, False)])
def test_index_values_match_torch(paged, with_leftpad, with_rows):
    if not (paged or with_leftpad or with_rows):
        pytest.skip("nothing to gather: checks.py reads the lengths alone")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    page, num_pages = 16, 40
    for B, max_blocks in ((1, 3), (3, 7), (2, BLOCK_P + 45)):
        seqlens = torch.randint(-2, max_blocks * page + 1, (B,), generator=g, dtype=torch.int32)
        T_new = int(torch.randint(0, 3, (), generator=g))
        leftpad = torch.randint(0, 9, (B,), generator=g, dtype=torch.int32) if with_leftpad else None
        rows = torch.randperm(B, generator=g).to(torch.int32) if with_rows else None
        table = None
        if paged:
            # Mostly valid pages, some out of range either way, everywhere in the table (past the
            # used pages too, where they must not count).
            table = torch.randint(0, num_pages, (B, max_blocks), generator=g, dtype=torch.int32)
            spoil = torch.rand(B, max_blocks, generator=g) < 0.1
            table[spoil] = torch.tensor([-1, num_pages, 10**6], dtype=torch.int32)[
                torch.randint(0, 3, (int(spoil.sum()),), generator=g)]
            table = table.to(DEVICE)
        args = [None if t is None else t.to(DEVICE) for t in (seqlens, leftpad, rows)]
        want = torch_values(*args, table, T_new, page, num_pages)
        got = index_values(*args, table, T_new, page, num_pages).tolist()
        assert got == want, (B, max_blocks, T_new)


def test_paged_checks_agree_between_kernel_and_torch():
    # check_kvcache_values with the kernel and with the torch ops: the same result for good
    # indices, the same error for a bad page.
    page, num_pages, B, max_blocks = 16, 12, 2, 5
    k_cache = torch.zeros(num_pages, page, 1, 8, device=DEVICE)
    table = torch.arange(B * max_blocks, dtype=torch.int32, device=DEVICE).view(B, max_blocks) % num_pages
    table[1, 4] = 99  # past sequence 1's used pages: never read
    seqlens = torch.tensor([70, 40], dtype=torch.int32, device=DEVICE)
    for kernel in (False, True):
        assert checks.check_kvcache_values(k_cache, seqlens, 1, None, None, table, 0, 1, kernel=kernel) == 71
    table[1, 2] = -3
    for kernel in (False, True):
        with pytest.raises(ValueError, match=r"block_table\[1\] points outside"):
            checks.check_kvcache_values(k_cache, seqlens, 1, None, None, table, 0, 1, kernel=kernel)
