"""The layouts of the CUDA attention kernels against CUTLASS's CuTe (layouts_cute.cpp,
host code only: no GPU needed): the Hopper ones, and the sm_80 instructions they build on.

Why: the emulation (warp_emulation.h, sm90_emulation.h) and the kernels were written from one
reading of the PTX ISA's wgmma descriptors, 128-byte swizzle and fragment layouts (and
mma.sync's and ldmatrix's), so the emulated attention tests cannot catch a misreading the two
share. CuTe's layouts and descriptors run on A100s and H100s in production: each test here
checks one piece of our reading against theirs, at every tile shape the kernels use, for both
16-bit types.
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


def test_sm80_instructions_match_cute(cute_layouts_library):
    """mma.m16n8k16's A, B and C fragments (f16 and bf16) and ldmatrix.x4, plain and .trans, as
    the emulation runs the sm_80 kernels = CuTe's SM80 MMA_Traits and SM75 LDSM Copy_Traits."""
    _check(cute_layouts_library, "cute_check_sm80_instructions")
