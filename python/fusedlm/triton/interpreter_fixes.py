"""Fixes to triton's interpreter (``TRITON_INTERPRET=1``), which runs the Triton kernels on
the CPU for the tests of machines without a GPU. Each makes the interpreter compute what a GPU
computes; none changes a kernel. ``patch_interpreter()`` applies them all (idempotent; call it
only when interpreting: it imports the interpreter).

* ``__index__`` of a scalar: the interpreter turns one into a Python int with ``int(array of
  shape (1,))``, which numpy >= 2.4 rejects, so any ``range`` whose bounds are kernel arguments
  fails (triton-lang/triton#9171, fixed upstream by #9172). Patched to use ``.item()``.
* bfloat16: the interpreter keeps bfloat16 values as their uint16 bit patterns. A cast from
  float32 to bfloat16 then truncates (a GPU rounds to nearest even: a value can come out one
  bfloat16 ulp off, found by ``tests/test_fuzz.py --fuzz-long`` on AdamW), a cast from float64
  converts the number itself to uint16, and ``tl.dot`` of bfloat16 operands multiplies the bit
  patterns as integers. Patched: casts to bfloat16 round to nearest even (NaN kept), casts from
  bfloat16 widen the bits exactly, and ``tl.dot`` widens bfloat16 operands to float32 first
  (a GPU's bfloat16 MMA multiplies exactly and accumulates in float32).
"""

from __future__ import annotations

import numpy as np

_FLOAT_NUMPY = ("fp16", "fp32", "fp64")  # element types the interpreter keeps as numpy floats


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Float ``values`` as bfloat16 bit patterns (uint16), rounded to nearest even as a GPU's
    ``cvt.rn.bf16.f32`` does (float64 rounds to float32 first); NaN stays a quiet NaN."""
    single = np.ascontiguousarray(values, dtype=np.float32)
    bits = single.view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16)
    quiet_nan = (bits >> 16) | np.uint32(0x40)
    return np.where(np.isnan(single), quiet_nan, rounded).astype(np.uint16)


def bfloat16_values(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as the float32 values they hold (exact)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def _patch_index(interpreter) -> None:
    original = interpreter._patch_lang_tensor
    if getattr(original, "_fusedlm_fix", False):
        return

    def patched(tensor, *scope):
        # triton 3.6 patches through a scope it can undo; 3.4 (torch 2.8's) sets attributes.
        original(tensor, *scope)
        index = lambda self: int(self.handle.data.item())  # noqa: E731
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patched._fusedlm_fix = True
    interpreter._patch_lang_tensor = patched


def _patch_bfloat16(interpreter) -> None:
    import triton.language as tl

    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "_fusedlm_fix", False):
        return
    handle = interpreter.TensorHandle
    original_cast, original_fp_to_fp = builder.cast_impl, builder.create_fp_to_fp
    original_dot = builder.create_dot
    round_to_nearest_even = interpreter._ir.ROUNDING_MODE.RTNE

    def converted(src, dst_type):
        """``src`` cast to ``dst_type`` where bfloat16 is on one side and a numpy float on the
        other, else None."""
        source, target = src.dtype.scalar, dst_type.scalar
        if target == tl.bfloat16 and source.name in _FLOAT_NUMPY:
            return handle(bfloat16_bits(src.data), tl.bfloat16)
        if source == tl.bfloat16 and target.name in _FLOAT_NUMPY:
            values = bfloat16_values(src.data)
            return handle(values.astype(interpreter._get_np_dtype(target)), target)
        return None

    def cast_impl(self, src, dst_type):
        result = converted(src, dst_type)
        return result if result is not None else original_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if rounding_mode is None or rounding_mode == round_to_nearest_even:
            result = converted(src, dst_type)
            if result is not None:
                return result
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    def widened(operand):
        if operand.dtype.scalar != tl.bfloat16:
            return operand
        return handle(bfloat16_values(operand.data), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widened(a), widened(b), d, input_precision,
                            max_num_imprecise_acc)

    for function in (cast_impl, create_fp_to_fp, create_dot):
        function._fusedlm_fix = True
    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
    builder.create_dot = create_dot


def patch_interpreter() -> None:
    """Apply every fix above to triton's interpreter (idempotent)."""
    from triton.runtime import interpreter

    _patch_index(interpreter)
    _patch_bfloat16(interpreter)
