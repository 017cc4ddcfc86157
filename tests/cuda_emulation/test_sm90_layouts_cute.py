"""The Hopper layouts of the sm_90a attention kernels against CUTLASS's CuTe
(sm90_layouts_cute.cpp, host code only: no GPU needed).

Why: the emulation (sm90_emulation.h) and the kernels were written from one reading of the PTX
ISA's wgmma descriptors, 128-byte swizzle and fragment layouts, so the emulated attention tests
cannot catch a misreading the two share. CuTe's GMMA layouts and descriptors run on H100s in
production: each test here checks one piece of our reading against theirs, at every tile shape
the kernels use, for both 16-bit types.
"""

from __future__ import annotations

import pytest


def _check(lib, name: str, *args) -> None:
    mismatches = getattr(lib, name)(*args)
    first = lib.cute_first_mismatch().decode()
    assert mismatches == 0, f"{mismatches} mismatches with CuTe; first: {first}"


@pytest.mark.parametrize("bf16", [0, 1], ids=["float16", "bfloat16"])
def test_operand_tiles_and_descriptors_match_cute(cute_layouts_library, bf16):
    """TMA's swizzled placement = CuTe's 128B GMMA atoms (K- and MN-major); the descriptors the
    kernels build = CuTe's make_gmma_desc for the same tensors; the addresses the emulated wgmma
    reads through them = CuTe's."""
    _check(cute_layouts_library, "cute_check_operands", bf16)


@pytest.mark.parametrize("n", [64, 128])
def test_accumulator_fragment_matches_cute(cute_layouts_library, n):
    """The emulation's m64nNk16 accumulator layout (the kernels' softmax rows, masks and output
    stores follow it) = CuTe's CLayout_64xN."""
    _check(cute_layouts_library, "cute_check_accumulators", n)


def test_register_a_fragment_matches_cute(cute_layouts_library):
    """The register A operand of O = P V, dV += P^T dO and dK += dS^T Q = CuTe's ALayout_64x16."""
    _check(cute_layouts_library, "cute_check_a_fragment")


def test_instruction_forms_match_cute(cute_layouts_library):
    """imm-trans 1 is MN-major and descriptor layout type 1 is the 128B swizzle, in CuTe too."""
    _check(cute_layouts_library, "cute_check_instruction_forms")
