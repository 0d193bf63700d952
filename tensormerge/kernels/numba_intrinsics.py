"""What generated numba kernels need that numba does not offer: a float32 bit cast."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def as_float32(typingctx, bits):
    """The float32 whose bit pattern is the uint32 `bits` (a register move, no memory)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def as_uint32(typingctx, value):
    """The bit pattern of the float32 `value` as a uint32 (a register move, no memory)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def fma32(typingctx, a, b, c):
    """a·b + c rounded once (LLVM's fma; a vfmadd where the CPU has one): what torch's
    vectorized `add_(x, alpha=a)` computes, checked at first use (kernels.cpu)."""

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)

    return types.float32(types.float32, types.float32, types.float32), codegen
