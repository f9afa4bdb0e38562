"""The copy engine's bulk reduction for Gluon kernels on Hopper.

Gluon 3.6 exposes TMA loads and stores (``hopper.tma``) but not ``cp.reduce.async.bulk.tensor``,
although its op builder has the op (``create_async_tma_reduce``) and the compiler lowers it as it
does a TMA store: one elected thread a warp issues it, ``tma.store_wait`` waits for it (the
same bulk-group counter), and a tile wider than the swizzle is split into several messages. This
builtin is that one line, so a kernel can add a shared-memory tile into global memory with one
instruction instead of element-wise atomics (bwd_gluon.py's dQ).
"""
from .fwd_gluon import HAS_GLUON

if HAS_GLUON:
    from triton._C.libtriton import ir
    from triton.experimental.gluon.language._core import builtin

    @builtin
    def tma_reduce_add(tensor_desc, coord, src, _semantic=None):
        """Add the shared-memory tile ``src`` (the descriptor's block, in its layout) into the
        global tensor of ``tensor_desc`` at ``coord``, asynchronously; out-of-bounds elements are
        dropped. Before ``src`` is written again, ``tma.store_wait`` must see the add done."""
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                  src.handle)
