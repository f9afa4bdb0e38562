"""Small KV caches for users who generate without a serving engine: one object per attention
layer, holding the keys and values and how many tokens each sequence has, and calling
:func:`ioattn.flash_attn_with_kvcache` with the right arguments.

- :class:`KVCache`: one contiguous ``[B, max_seqlen, Hkv, D]`` buffer per keys and values.
- :class:`PagedKVCache`: a pool of ``page_size``-token pages shared by up to ``max_batch``
  sequences, pages handed out as sequences grow and returned by :meth:`PagedKVCache.free`.

Both keep the lengths on the host too and check an append against them there, so a decoding
step never reads anything back from the GPU (flash_attn_with_kvcache's own value checks wait for
the GPU to read the index tensors; here the same checks, with the same messages, run on the host
copy). Their ``seqlens`` tensor mirrors that copy for the kernels: change lengths only through
the methods.
"""
import torch

from .._utils import cdiv
from .api import _with_kvcache
from .checks import check_call_lengths

# Index arguments the cache classes fill in themselves; a call that passes its own (a leftpad,
# say) is checked by flash_attn_with_kvcache on the device values instead.
_CALLER_INDICES = ("cache_batch_idx", "cache_leftpad")
# Pages an allocation writes into the block table one entry at a time (see allocate).
_FILL_PAGES = 4


def _check_on_host(lengths, T_new: int, cap: int, q, causal: bool, kwargs) -> int:
    """check_lengths on the cache's host lengths (raises ValueError before anything changes);
    returns the longest sequence after the append, or -1 when the call must check itself."""
    rot = kwargs.get("rotary_cos")
    if any(kwargs.get(n) is not None for n in _CALLER_INDICES) or not (rot is None or torch.is_tensor(rot)):
        return -1
    return check_call_lengths(lengths, T_new, cap, rot, q.shape[1], causal, kwargs.get("window_size", (-1, -1)))


class KVCache:
    """Contiguous KV cache of one layer for ``batch_size`` sequences of up to ``max_seqlen`` tokens.

    ``attend(q, k, v)`` appends k, v (``[B, Tnew, Hkv, D]``) after each sequence's tokens and
    returns the attention of q (``[B, Tq, H, D]``) over everything cached, causal by default.
    """

    def __init__(self, batch_size: int, max_seqlen: int, num_kv_heads: int, head_dim: int, *,
                 dtype=torch.bfloat16, device=None):
        shape = (batch_size, max_seqlen, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self._lengths = [0] * batch_size

    def length(self, b: int) -> int:
        return self._host_lengths()[b]

    def _host_lengths(self) -> list:
        """The host copy of the lengths, read back once if a compiled call left it stale."""
        if self._lengths is None:
            self._lengths = self.seqlens.tolist()
        return self._lengths

    def attend(self, q, k, v, *, causal: bool = True, **kwargs):
        """flash_attn_with_kvcache on this cache (rotary tables, window etc. go in kwargs), then
        advance every sequence by Tnew."""
        if torch.compiler.is_compiling() or not (torch.is_tensor(q) and torch.is_tensor(k) and k.dim() == 4):
            # Under torch.compile a host copy would be guarded on, one recompile a step: the op
            # checks the device values, and the copy is read back at the next eager call. Bad
            # arguments: flash_attn_with_kvcache names what is wrong.
            out = _with_kvcache(q, self.k, self.v, k, v, cache_seqlens=self.seqlens, causal=causal, **kwargs)
            if k is not None:
                self.seqlens += k.shape[1]
                self._lengths = None
            return out
        T_new = k.shape[1]
        lengths = self._host_lengths()
        known = _check_on_host(lengths, T_new, self.k.shape[1], q, causal, kwargs)
        out = _with_kvcache(q, self.k, self.v, k, v, cache_seqlens=self.seqlens, causal=causal,
                            known_seqlen_k=known, **kwargs)
        self.seqlens += T_new
        self._lengths = [n + T_new for n in lengths]
        return out

    def reset(self):
        """Forget every sequence (the buffers stay allocated)."""
        self.seqlens.zero_()
        self._lengths = [0] * self.seqlens.shape[0]

    def reorder(self, index):
        """Beam search: sequence b continues from sequence ``index[b]`` (ints, or an int tensor
        ``[B]``, which is read to the host once)."""
        lengths = self._host_lengths()
        rows = [int(i) for i in (index.tolist() if torch.is_tensor(index) else index)]
        if len(rows) != len(lengths) or not all(0 <= i < len(lengths) for i in rows):
            raise ValueError(f"index: must hold {len(lengths)} sequence numbers in [0, {len(lengths)}), got {rows}")
        index = torch.tensor(rows, device=self.k.device)
        self.k.copy_(self.k[index])
        self.v.copy_(self.v[index])
        self.seqlens.copy_(self.seqlens[index])
        self._lengths = [lengths[i] for i in rows]


class PagedKVCache:
    """Paged KV cache of one layer: ``num_pages`` pages of ``page_size`` tokens (a power of two
    >= 16) shared by up to ``max_batch`` sequences ("slots") of up to
    ``max_pages_per_seq · page_size`` tokens each.

    Slots get pages as they grow (:meth:`attend` allocates them) and give them back with
    :meth:`free`; a sequence's pages need not be adjacent or in order.
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *,
                 max_batch: int, max_pages_per_seq: int, dtype=torch.bfloat16, device=None):
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.page_size = page_size
        self.block_table = torch.zeros(max_batch, max_pages_per_seq, dtype=torch.int32, device=device)
        self.seqlens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        # Host state: the free pages, each slot's pages and length.
        self._free = list(range(num_pages - 1, -1, -1))
        self._pages = [[] for _ in range(max_batch)]
        self._lengths = [0] * max_batch
        self._indices = {}  # tuple of slots -> their device tensor (see _slot_index)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def length(self, slot: int) -> int:
        return self._lengths[slot]

    def allocate(self, slot: int, n_tokens: int):
        """Make room for ``n_tokens`` more tokens in ``slot``, taking pages from the pool."""
        need = cdiv(self._lengths[slot] + n_tokens, self.page_size) - len(self._pages[slot])
        if need <= 0:
            return
        if len(self._pages[slot]) + need > self.block_table.shape[1]:
            raise ValueError(f"slot {slot} would need {len(self._pages[slot]) + need} pages, more than "
                             f"max_pages_per_seq = {self.block_table.shape[1]}")
        if need > len(self._free):
            raise RuntimeError(f"out of pages: slot {slot} needs {need}, {len(self._free)} are free")
        new = [self._free.pop() for _ in range(need)]
        first = len(self._pages[slot])
        self._pages[slot] += new
        if need <= _FILL_PAGES:
            # A page or two (a decoding step): each entry filled by a kernel that takes the page
            # number as an argument. `table[i, j] = page` would copy it from host memory, and
            # torch synchronizes the stream on such copies (the sync test caught that form).
            for j, page in enumerate(new):
                self.block_table[slot, first + j].fill_(page)
        else:
            self.block_table[slot, first:first + need] = torch.tensor(new, dtype=torch.int32)

    def free(self, slot: int):
        """End the sequence in ``slot`` and return its pages to the pool."""
        self._free += reversed(self._pages[slot])
        self._pages[slot] = []
        self._lengths[slot] = 0
        self.seqlens[slot].zero_()  # a kernel; `= 0` would copy from host memory (a sync)

    def attend(self, q, k, v, *, slots=None, causal: bool = True, **kwargs):
        """Append k, v (``[B, Tnew, Hkv, D]``) to the sequences in ``slots`` (default the first B)
        and return the attention of q ``[B, Tq, H, D]`` over them."""
        if not (torch.is_tensor(q) and torch.is_tensor(k) and k.dim() == 4):
            raise ValueError("q and k must be tensors [B, Tq, H, D] and [B, Tnew, Hkv, D]")
        slots = list(range(q.shape[0])) if slots is None else list(slots)
        T_new = k.shape[1]
        cap = self.block_table.shape[1] * self.page_size
        known = _check_on_host([self._lengths[s] for s in slots], T_new, cap, q, causal, kwargs)
        need = sum(max(0, cdiv(self._lengths[s] + T_new, self.page_size) - len(self._pages[s])) for s in slots)
        if need > len(self._free):
            raise RuntimeError(f"out of pages: slots {slots} need {need} more, {len(self._free)} are free")
        for s in slots:
            self.allocate(s, T_new)
        index = self._slot_index(slots)
        out = _with_kvcache(q, self.k, self.v, k, v, cache_seqlens=self.seqlens[index],
                            block_table=self.block_table[index], causal=causal, known_seqlen_k=known, **kwargs)
        for s in slots:
            self._lengths[s] += T_new
        self.seqlens[index] += T_new
        return out

    def _slot_index(self, slots):
        """The slots as a device tensor, made once per list of slots (a fresh one would be a
        copy from host memory, which synchronizes the stream, on every step)."""
        key = tuple(slots)
        index = self._indices.get(key)
        if index is None:
            if len(self._indices) >= 64:
                self._indices.clear()
            index = self._indices[key] = torch.tensor(slots, device=self.k.device)
        return index

    def reorder(self, index):
        """Beam search: slot b continues from slot ``index[b]``, for b < len(index). The pages'
        contents are copied (no sharing between slots), so every slot stays independent."""
        index = [int(i) for i in index]
        sources = [(list(self._pages[i]), self._lengths[i]) for i in index]
        # Gather every source first: a slot's pages may be the source of another slot.
        saved = [(self.k[pages].clone(), self.v[pages].clone()) for pages, _ in sources]
        for b, ((pages, length), (k, v)) in enumerate(zip(sources, saved)):
            self.free(b)
            self.allocate(b, length)
            self._lengths[b] = length
            self.seqlens[b].fill_(length)
            dst = torch.tensor(self._pages[b], dtype=torch.long, device=self.k.device)
            self.k[dst] = k
            self.v[dst] = v
