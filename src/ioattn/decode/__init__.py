"""KV-cache decoding: flash_attn_with_kvcache (split-KV, paged cache) and small cache classes."""
