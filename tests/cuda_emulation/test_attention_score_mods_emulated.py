"""Soft-capping and dropout in the CUDA attention kernels (the kScoreMods instances of the sm_80
forward, dK/dV and dQ kernels and of the sm_90a forward and backward), run on the CPU by the
warp emulation (test_attention_emulated.py says how and why) against the float64 truth by
DESIGN.md's rule.

The truth soft-caps the scores (Gemma 2's softcap * tanh(s / softcap)) and drops the
probabilities of fusedlm.reference.attention_dropout_keep's mask: the Philox stream every backend
shares. A kernel that drew other elements than that mask (a wrong counter for a fragment's row or
column, a query head packed into rows, a key split) fails by far more than the tolerance: at
p = 0.5 half the probabilities differ. The soft-cap is small (1.5 on scores of about unit size)
so that tanh saturates and its gradient's 1 - tanh^2 matters."""

from __future__ import annotations

import pytest
import torch

from .test_attention_emulated import (
    TIMING_IDS,
    TIMINGS,
    _check,
    document_key_ranges,
)

CAP = 1.5
# (softcap, dropout_p): each modifier alone and both
MODS = [(CAP, 0.0), (0.0, 0.5), (CAP, 0.3)]
MOD_IDS = ["softcap", "dropout", "softcap-dropout"]
# (B, Hq, Hkv, Tq, Tk, D): every sm_80 head-dim template (40 -> 64, 72 -> 96, 160 -> 192), ragged
# tiles, Tq > Tk and Tq < Tk, GQA and MQA, several query and key tiles.
SHAPES = [
    (1, 1, 1, 1, 1, 8),
    (2, 2, 1, 17, 40, 40),
    (1, 1, 1, 150, 130, 64),
    (1, 2, 2, 70, 33, 72),
    (1, 3, 1, 33, 100, 128),
    (1, 1, 1, 20, 37, 160),
    (1, 1, 1, 40, 70, 256),
]
IDS = ["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s) for s in SHAPES]


@pytest.mark.parametrize("mods", MODS, ids=MOD_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_sm80(library, shape, causal, mods):
    softcap, dropout_p = mods
    _check(library, shape, causal, torch.float16, softcap=softcap, dropout_p=dropout_p,
           dropout_seed=1234)


@pytest.mark.parametrize("mods", MODS, ids=MOD_IDS)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
def test_sm80_dq_paths_and_bfloat16(library, deterministic, mods):
    """Both dQ paths (atomics from the dK/dV kernel; the deterministic dQ kernel, which
    regenerates the mask by query rows), in bfloat16, GQA."""
    softcap, dropout_p = mods
    _check(library, (2, 4, 2, 70, 90, 64), True, torch.bfloat16, deterministic=deterministic,
           softcap=softcap, dropout_p=dropout_p, dropout_seed=77)


@pytest.mark.parametrize("mods", MODS, ids=MOD_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 8), (2, 2, 1, 17, 40, 40),
                                   (1, 2, 2, 150, 140, 64), (1, 3, 1, 70, 200, 128)],
                         ids=["one", "gqa-D40", "D64", "mqa-D128"])
def test_sm90(library, shape, causal, mods):
    """The sm_90a forward and backward (FUSEDLM_ATTENTION_SM90=require: no sm_80 fallback); the
    backward's tile is transposed (keys x queries), so its mask is drawn per element."""
    softcap, dropout_p = mods
    _check(library, shape, causal, torch.float16, hopper=True, softcap=softcap,
           dropout_p=dropout_p, dropout_seed=2**40 + 3)


@pytest.mark.parametrize("hopper", [False, True], ids=["sm80", "sm90"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
def test_with_masks_and_gradient_of_lse(library, hopper, deterministic):
    """Both modifiers with a sliding window, per-query key ranges (packed documents) and a
    gradient of lse (which lowers delta: dS = P (M dP / (1 - p) - delta) (1 - tanh^2))."""
    ranges = document_key_ranges(2, 150, 150, [[37, 27, 86], [1, 128, 21]])
    _check(library, (2, 2, 1, 150, 150, 64), True, torch.float16, deterministic=deterministic,
           hopper=hopper, window_offset=-60, key_range=ranges, with_grad_lse=True,
           softcap=CAP, dropout_p=0.25, dropout_seed=5)


def test_batch_key_range(library):
    """A key range per batch row (padded batches), one row with no key at all."""
    ranges = torch.tensor([[10, 90], [0, 0]], dtype=torch.int32)
    _check(library, (2, 2, 2, 40, 90, 64), False, torch.float16, key_range=ranges,
           softcap=CAP, dropout_p=0.4, dropout_seed=9)


@pytest.mark.parametrize("shape", [(1, 8, 2, 1, 700, 64), (2, 4, 4, 1, 600, 128),
                                   (1, 3, 1, 40, 520, 96)],
                         ids=["packed-heads-split", "split-D128", "short-prompt-split"])
def test_decode(library, shape):
    """Few query rows: the forward packs a GQA group's query heads into rows and splits the keys
    over CTAs (test_attention_emulated.test_decode_plan); the packed rows' flat index is the
    unpacked one, so the mask is the same."""
    _check(library, shape, True, torch.float16, softcap=CAP, dropout_p=0.5, dropout_seed=11)


@pytest.mark.parametrize("timing", TIMINGS, ids=TIMING_IDS)
def test_copy_timing(library, timing):
    """The kScoreMods instances' cp.async protocol under every copy timing and schedule."""
    late, schedule = timing
    _check(library, (1, 2, 1, 150, 130, 64), True, torch.float16, late=late, schedule=schedule,
           softcap=CAP, dropout_p=0.5, dropout_seed=3)


def test_high_dropout(library):
    """p = 0.9: most probabilities dropped, the rest scaled by 10."""
    _check(library, (1, 2, 1, 70, 90, 64), False, torch.float16, dropout_p=0.9, dropout_seed=21)
