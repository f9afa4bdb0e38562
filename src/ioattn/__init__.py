"""ioattn: fast, exact, memory-efficient (IO-aware) attention for GPUs (Triton) and CPUs."""
from .flash.api import backend_for, flash_attn_func, scaled_dot_product_attention
from .flash.packed import (flash_attn_kvpacked_func, flash_attn_qkvpacked_func, flash_attn_varlen_kvpacked_func,
                           flash_attn_varlen_qkvpacked_func)
from .flash.varlen import flash_attn_varlen_func, pad_input, unpad_input
from .merge import merge_partials

__version__ = "0.1.0"

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
           "unpad_input", "pad_input",
           "scaled_dot_product_attention", "backend_for", "merge_partials", "__version__"]

from .decode.api import flash_attn_with_kvcache  # noqa: E402
from .decode.cache import KVCache, PagedKVCache  # noqa: E402
from .merge import merge_partials_many  # noqa: E402

__all__ += ["flash_attn_with_kvcache", "KVCache", "PagedKVCache", "merge_partials_many"]
