"""2^x for Gluon kernels with one element in n computed by a polynomial on the FMA and integer
pipes instead of the special-function unit (FlashAttention-4's trick), for fwd_gluon_loop.py's
softmax (``EXP2_EMU``). Measured slower on the H200 at every n (benchmarks/LOG.md v1.18); no
table uses it, and one sweep candidate per head dim keeps it compiled and tested.
"""
try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # older triton: no Gluon kernels run (fwd_gluon.HAS_GLUON)
    gluon = None


if gluon is not None:

    @gluon.constexpr_function
    def _exp2_asm(n):
        """PTX for ``n`` fp32 elements ($n.. in, $0.. out): 2^x of the first by a polynomial on
        the FMA and integer pipes, of the others by the special-function unit (ex2.approx.ftz,
        as gl.exp2). Why: an SM's SFU does 16 exponentials a clock against 128 FMAs; at D = 64 a
        key block's exponentials take about as long there as its two matrix multiplies on the
        tensor cores, so moving some of them to the FMA pipes could shorten the softmax
        (FlashAttention-4's trick). Measured on the H200 it did not: one in 2 / 4 / 8 ran 14 /
        5 / 1% slower at D = 64, slower at D = 128 too (benchmarks/LOG.md v1.18), so no config
        in the tables uses it. The polynomial: x = j + f with j = floor(x) from one add
        rounded down against 1.5 * 2^23 (the sum's low mantissa bits are j), 2^f by a degree-3
        fit on [0, 1) held to 1 at f = 0 and 2 at f = 1 (relative error 1.03e-4, against the
        3.9e-3 to which P is rounded before P·V), times 2^j built in the exponent field. Held at
        both ends it is continuous across each integer, so a row's largest score, shifted to 0
        or by its FMA's rounding to just below 0 (then j = -1, f ~ 1), counts 1 in its sum to
        ~1e-8: free ends were 7.5e-5 off at f = 0 and 8.6e-5 with only that end held, and a
        one-key row's lse missed the accuracy rule by that in GPU tests. Like the SFU's flush to
        zero, x < -126 gives exactly 0 (a masked key's -inf too, so rows that see no key keep
        l = 0), and NaN stays NaN (it goes through the multiply)."""
        x = f"${n}"
        lines = [
            "{", ".reg .f32 t, jf, fr, p, sc, r;", ".reg .b32 e;", ".reg .pred lo;",
            f"add.rm.f32 t, {x}, 0f4B400000;", "sub.f32 jf, t, 0f4B400000;", f"sub.f32 fr, {x}, jf;",
            "fma.rn.f32 p, fr, 0f3DA04B36, 0f3E67BD53;", "fma.rn.f32 p, p, fr, 0f3F320745;",
            "fma.rn.f32 p, p, fr, 0f3F800000;", "mov.b32 e, t;", "shl.b32 e, e, 23;", "add.s32 e, e, 0x3F800000;",
            "mov.b32 sc, e;", "mul.f32 r, p, sc;", f"setp.lt.f32 lo, {x}, 0fC2FE0000;",
            "selp.f32 $0, 0f00000000, r, lo;",
        ]
        lines += [f"ex2.approx.ftz.f32 ${i}, ${n + i};" for i in range(1, n)]
        return "\n".join(lines + ["}"])

    @gluon.constexpr_function
    def _exp2_constraints(n):
        return ",".join(["=f"] * n + ["f"] * n)

    @gluon.jit
    def _exp2(x, EXP2_EMU: gl.constexpr):
        """2^x; with ``EXP2_EMU`` = n > 0, one element in n computed by :func:`_exp2_asm`'s
        polynomial instead of the SFU."""
        if EXP2_EMU == 0:
            return gl.exp2(x)
        else:
            return gl.inline_asm_elementwise(_exp2_asm(EXP2_EMU), _exp2_constraints(EXP2_EMU), [x],
                                             dtype=gl.float32, is_pure=True, pack=EXP2_EMU)
