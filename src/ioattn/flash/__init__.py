"""Training/prefill attention: the FlashAttention-2 family (Triton kernels and a CPU backend)."""
