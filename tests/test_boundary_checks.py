"""The invariants csrc/bindings.cpp enforces before a tensor reaches a C++ kernel, each shown to
fire: the entry points of fusedlm._C are called directly with one bad argument, and must raise
the expected exception type with a message naming that argument.

Complements tests/test_bad_inputs.py (which covers dims, dtypes, devices and shapes of most
arguments) with the checks it does not: finiteness of scalars, the stride/offset range of
every tensor, per-parameter AdamW state dtypes (a float32 exp_avgs[i] with a 16-bit
exp_avg_sqs[i] made the kernel read and write past the end of the 16-bit tensor), the
remaining arguments of the attention entry points, and every check of the rotary_embedding and
glu_fwd/bwd entry points (their angle tables' conversion too)."""

from __future__ import annotations

import math

import pytest
import torch

import fusedlm
from tests.helpers import cpu_backend_available, cpu_unavailable_reason

pytestmark = pytest.mark.skipif(not cpu_backend_available(), reason=cpu_unavailable_reason())

META = "meta"
BIG = 2**62  # a stride whose offsets overflow int64 once multiplied by a size of 3


def _ext():
    return fusedlm._ext.load()


def _q(dtype=torch.float32, device="cpu"):
    return torch.randn(1, 2, 3, 4, dtype=dtype, device=device)


def _lse():
    return torch.zeros(1, 2, 3)


def _huge_strides(shape=(3, 2, 3, 4)):
    """A meta tensor (no storage) whose largest element offset does not fit in int64."""
    return torch.empty_strided(shape, (BIG, 1, 1, 1), device=META)


def _bwd(**bad):
    args = {"grad_out": _q(), "q": _q(), "k": _q(), "v": _q(), "out": _q(), "lse": _lse(),
            "scale": 0.5, "causal": False, "causal_offset": 0}
    args.update(bad)
    return lambda e: e.attention_bwd(*args.values())


def _fwd(**bad):
    args = {"q": _q(), "k": _q(), "v": _q(), "scale": 0.5, "causal": False, "causal_offset": 0}
    args.update(bad)
    return lambda e: e.attention_fwd(*args.values())


X = lambda: torch.randn(3, 8)  # noqa: E731


def _adamw(**overrides):
    args = {
        "params": [torch.randn(4, dtype=torch.bfloat16)],
        "grads": [torch.randn(4, dtype=torch.bfloat16)],
        "exp_avgs": [torch.zeros(4)],
        "exp_avg_sqs": [torch.zeros(4)],
        "max_exp_avg_sqs": [],
        "steps": [1.0],
        "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
        "amsgrad": False, "maximize": False,
    }
    args.update(overrides)
    return list(args.values())


def _target():
    return torch.tensor([1, 7, -100])


def _ce(**overrides):
    args = {"logits": X(), "target": _target(), "ignore_index": -100, "label_smoothing": 0.0}
    args.update(overrides)
    return list(args.values())


def _ce_bwd(**overrides):
    args = {"grad_loss": torch.ones(3), "logits": X(), "target": _target(),
            "row_max": torch.zeros(3), "log_sum": torch.zeros(3), "ignore_index": -100,
            "label_smoothing": 0.0}
    args.update(overrides)
    return list(args.values())


def _rot(**overrides):
    """rotary_embedding's arguments: x (1, 2, 3, 4), cos and sin (T = 3, R/2 = 2)."""
    args = {"x": _q(), "cos": torch.randn(3, 2), "sin": torch.randn(3, 2), "interleaved": False,
            "conjugate": False}
    args.update(overrides)
    return list(args.values())


def _meta(*shape):
    return torch.empty(shape, device=META)


def _many_elements(dim):
    """A meta tensor of 2^62 elements (stride 0, no storage): past check_fits_index."""
    shape = (2**30, 2**31, 1, 2)[-dim:] if dim == 4 else (2**31, 2**31)
    return torch.empty_strided(shape, (0,) * len(shape), device=META)


def _sw(**overrides):
    """glu_bwd's tensor arguments (glu_fwd's are the last two): (3, 8) float32 operands."""
    args = {"grad_out": X(), "gate": X(), "up": X()}
    args.update(overrides)
    return list(args.values())


def _gf(e, gate, up):
    """glu_fwd(gate, up, activation) for each activation: each must raise (the checks run
    whatever the activation); the last error is re-raised for the case to inspect."""
    for activation in ("gelu", "gelu_tanh", "silu"):
        with pytest.raises((ValueError, TypeError)) as info:
            e.glu_fwd(gate, up, activation)
    raise info.value


def _gb(e, grad_out, gate, up):
    """glu_bwd(grad_out, gate, up, activation) for each activation, as _gf."""
    for activation in ("gelu", "gelu_tanh", "silu"):
        with pytest.raises((ValueError, TypeError)) as info:
            e.glu_bwd(grad_out, gate, up, activation)
    raise info.value


CASES = [
    # attention: the softmax scale must be a finite number
    ("att_fwd_scale_nan", ValueError, "'scale'", _fwd(scale=math.nan)),
    ("att_fwd_scale_inf", ValueError, "'scale'", _fwd(scale=math.inf)),
    ("att_fwd_scale_neg_inf", ValueError, "'scale'", _fwd(scale=-math.inf)),
    ("att_bwd_scale_nan", ValueError, "'scale'", _bwd(scale=math.nan)),
    ("att_bwd_scale_inf", ValueError, "'scale'", _bwd(scale=math.inf)),
    # attention: arguments tests/test_bad_inputs.py leaves out
    ("att_fwd_v_dtype", TypeError, "'v'", _fwd(v=_q(torch.float64))),
    ("att_fwd_v_meta", ValueError, "'v'", _fwd(v=_q(device=META))),
    ("att_fwd_q_meta", ValueError, "'q'", _fwd(q=_q(device=META))),
    ("att_fwd_k_2d", ValueError, "'k'", _fwd(k=torch.randn(3, 4))),
    ("att_fwd_batch", ValueError, "batch",
     _fwd(k=torch.randn(2, 2, 3, 4), v=torch.randn(2, 2, 3, 4))),
    ("att_fwd_head_dims", ValueError, "head dim",
     _fwd(k=torch.randn(1, 2, 3, 5), v=torch.randn(1, 2, 3, 5))),
    ("att_fwd_zero_kv_heads", ValueError, "heads",
     _fwd(k=torch.randn(1, 0, 3, 4), v=torch.randn(1, 0, 3, 4))),
    ("att_bwd_grad_shape", ValueError, "'grad_out'", _bwd(grad_out=torch.randn(1, 2, 4, 4))),
    ("att_bwd_out_dtype", TypeError, "'out'", _bwd(out=_q(torch.float16))),
    ("att_bwd_out_meta", ValueError, "'out'", _bwd(out=_q(device=META))),
    ("att_bwd_lse_meta", ValueError, "'lse'", _bwd(lse=torch.zeros(1, 2, 3, device=META))),
    ("att_bwd_q_dtype", TypeError, "'k'", _bwd(q=_q(torch.float64), grad_out=_q(torch.float64),
                                               out=_q(torch.float64),
                                               lse=torch.zeros(1, 2, 3, dtype=torch.float64))),
    ("att_bwd_v_shape", ValueError, "'v'", _bwd(v=torch.randn(1, 2, 2, 4))),
    # attention: the key range (padded batches) must be (B, 2) integers on q's device
    ("att_fwd_key_range_float", TypeError, "'key_range'",
     _fwd(window_offset=None, key_range=torch.zeros(1, 2))),
    ("att_fwd_key_range_bool", TypeError, "'key_range'",
     _fwd(window_offset=None, key_range=torch.ones(1, 2, dtype=torch.bool))),
    ("att_fwd_key_range_shape", ValueError, "'key_range'",
     _fwd(window_offset=None, key_range=torch.zeros(2, 2, dtype=torch.int32))),
    ("att_fwd_key_range_1d", ValueError, "'key_range'",
     _fwd(window_offset=None, key_range=torch.zeros(2, dtype=torch.int32))),
    ("att_fwd_key_range_meta", ValueError, "'key_range'",
     _fwd(window_offset=None, key_range=torch.zeros(1, 2, dtype=torch.int32, device=META))),
    ("att_bwd_key_range_shape", ValueError, "'key_range'",
     _bwd(window_offset=None, key_range=torch.zeros(1, 3, dtype=torch.int64))),
    # ... or (B, Tq, 2) per query (packed documents)
    ("att_fwd_key_range_rows", ValueError, "'key_range'",
     _fwd(window_offset=None, key_range=torch.zeros(1, 4, 2, dtype=torch.int32))),
    ("att_fwd_key_range_4d", ValueError, "'key_range'",
     _fwd(window_offset=None, key_range=torch.zeros(1, 3, 2, 1, dtype=torch.int32))),
    ("att_bwd_key_range_pairs", ValueError, "'key_range'",
     _bwd(window_offset=None, key_range=torch.zeros(1, 3, 3, dtype=torch.int64))),
    # attention: every tensor's offsets must fit the kernels' int64 index arithmetic
    ("att_fwd_q_strides", ValueError, "'q'",
     lambda e: e.attention_fwd(_huge_strides(), *(torch.empty(3, 2, 3, 4, device=META),) * 2,
                               0.5, False, 0)),
    ("att_fwd_k_strides", ValueError, "'k'",
     lambda e: e.attention_fwd(torch.empty(3, 2, 3, 4, device=META), _huge_strides(),
                               torch.empty(3, 2, 3, 4, device=META), 0.5, False, 0)),
    ("att_fwd_v_strides", ValueError, "'v'",
     lambda e: e.attention_fwd(*(torch.empty(3, 2, 3, 4, device=META),) * 2, _huge_strides(),
                               0.5, False, 0)),
    # norms: eps must be finite (NaN and negative are in tests/test_bad_inputs.py)
    ("ln_fwd_eps_inf", ValueError, "'eps'", lambda e: e.layer_norm_fwd(X(), None, None, math.inf)),
    ("rms_fwd_eps_inf", ValueError, "'eps'", lambda e: e.rms_norm_fwd(X(), None, math.inf)),
    ("rms_fwd_eps_nan", ValueError, "'eps'", lambda e: e.rms_norm_fwd(X(), None, math.nan)),
    ("rms_bwd_x_int", TypeError, "'x'",
     lambda e: e.rms_norm_bwd(X(), X().int(), torch.ones(3), None)),
    ("rms_bwd_weight_shape", ValueError, "'weight'",
     lambda e: e.rms_norm_bwd(X(), X(), torch.ones(3), torch.ones(5))),
    ("ln_bwd_rstd_meta", ValueError, "'rstd'",
     lambda e: e.layer_norm_bwd(X(), X(), torch.zeros(3), torch.ones(3, device=META), None, False)),
    # the residual add fused into the norms (fusedlm._C.add_*: CPU kernels only)
    ("add_ln_fwd_eps_inf", ValueError, "'eps'",
     lambda e: e.add_layer_norm_fwd(X(), X(), None, None, math.inf)),
    ("add_rms_fwd_eps_nan", ValueError, "'eps'",
     lambda e: e.add_rms_norm_fwd(X(), X(), None, math.nan)),
    ("add_rms_fwd_eps_inf", ValueError, "'eps'",
     lambda e: e.add_rms_norm_fwd(X(), X(), None, math.inf)),
    ("add_ln_fwd_weight_meta", ValueError, "'weight'",
     lambda e: e.add_layer_norm_fwd(X(), X(), torch.ones(8, device=META), None, 1e-5)),
    ("add_ln_fwd_bias_meta", ValueError, "'bias'",
     lambda e: e.add_layer_norm_fwd(X(), X(), None, torch.ones(8, device=META), 1e-5)),
    ("add_ln_fwd_bias_2d", ValueError, "'bias'",
     lambda e: e.add_layer_norm_fwd(X(), X(), None, torch.ones(1, 8), 1e-5)),
    ("add_ln_fwd_residual_too_many_elements", ValueError, "'residual'",
     lambda e: e.add_layer_norm_fwd(_many_elements(2), _many_elements(2), None, None, 1e-5)),
    ("add_ln_fwd_on_meta", ValueError, "'residual'",  # (no meta kernel)
     lambda e: e.add_layer_norm_fwd(_meta(3, 8), _meta(3, 8), None, None, 1e-5)),
    ("add_rms_bwd_on_meta", ValueError, "'h'",
     lambda e: e.add_rms_norm_bwd(_meta(3, 8), None, _meta(3, 8), torch.ones(3, device=META),
                                  None)),
    ("add_ln_bwd_rstd_meta", ValueError, "'rstd'",
     lambda e: e.add_layer_norm_bwd(X(), None, X(), torch.zeros(3), torch.ones(3, device=META),
                                    None, False)),
    ("add_ln_bwd_mean_1d_wrong_rows", ValueError, "'mean'",
     lambda e: e.add_layer_norm_bwd(X(), None, X(), torch.zeros(3, 1), torch.ones(3), None,
                                    False)),
    ("add_rms_bwd_weight_shape", ValueError, "'weight'",
     lambda e: e.add_rms_norm_bwd(X(), None, X(), torch.ones(3), torch.ones(5))),
    ("add_rms_bwd_weight_meta", ValueError, "'weight'",
     lambda e: e.add_rms_norm_bwd(X(), X(), X(), torch.ones(3), torch.ones(8, device=META))),
    ("add_rms_bwd_grad_h_int", TypeError, "'grad_h'",
     lambda e: e.add_rms_norm_bwd(X(), X().int(), X(), torch.ones(3), None)),
    # cross-entropy: logits (N, V) float, target (N) int64, statistics (N) in the compute dtype
    ("ce_fwd_logits_1d", ValueError, "'logits'",
     lambda e: e.cross_entropy_fwd(*_ce(logits=X()[0]))),
    ("ce_fwd_logits_int", TypeError, "'logits'",
     lambda e: e.cross_entropy_fwd(*_ce(logits=X().long()))),
    ("ce_fwd_no_classes", ValueError, "'logits'",
     lambda e: e.cross_entropy_fwd(*_ce(logits=torch.randn(3, 0)))),
    ("ce_fwd_logits_meta", ValueError, "'logits'",
     lambda e: e.cross_entropy_fwd(*_ce(logits=X().to(META), target=_target().to(META)))),
    ("ce_fwd_logits_strides", ValueError, "'logits'",
     lambda e: e.cross_entropy_fwd(*_ce(logits=torch.empty_strided((3, 8), (BIG, 1),
                                                                  device=META)))),
    ("ce_fwd_target_int32", TypeError, "'target'",
     lambda e: e.cross_entropy_fwd(*_ce(target=_target().int()))),
    ("ce_fwd_target_shape", ValueError, "'target'",
     lambda e: e.cross_entropy_fwd(*_ce(target=torch.zeros(4, dtype=torch.int64)))),
    ("ce_fwd_target_meta", ValueError, "'target'",
     lambda e: e.cross_entropy_fwd(*_ce(target=_target().to(META)))),
    ("ce_fwd_smoothing_over_1", ValueError, "'label_smoothing'",
     lambda e: e.cross_entropy_fwd(*_ce(label_smoothing=1.5))),
    ("ce_fwd_smoothing_nan", ValueError, "'label_smoothing'",
     lambda e: e.cross_entropy_fwd(*_ce(label_smoothing=math.nan))),
    ("ce_fwd_z_loss_negative", ValueError, "'z_loss'",
     lambda e: e.cross_entropy_fwd(*_ce(), z_loss=-1e-4)),
    ("ce_fwd_z_loss_inf", ValueError, "'z_loss'",
     lambda e: e.cross_entropy_fwd(*_ce(), z_loss=math.inf)),
    ("ce_bwd_z_loss_nan", ValueError, "'z_loss'",
     lambda e: e.cross_entropy_bwd(*_ce_bwd(), z_loss=math.nan)),
    ("ce_bwd_grad_dtype", TypeError, "'grad_loss'",
     lambda e: e.cross_entropy_bwd(*_ce_bwd(grad_loss=torch.ones(3, dtype=torch.float64)))),
    ("ce_bwd_grad_shape", ValueError, "'grad_loss'",
     lambda e: e.cross_entropy_bwd(*_ce_bwd(grad_loss=torch.ones(1, 3)))),
    ("ce_bwd_row_max_shape", ValueError, "'row_max'",
     lambda e: e.cross_entropy_bwd(*_ce_bwd(row_max=torch.zeros(4)))),
    ("ce_bwd_log_sum_meta", ValueError, "'log_sum'",
     lambda e: e.cross_entropy_bwd(*_ce_bwd(log_sum=torch.zeros(3, device=META)))),
    ("ce_bwd_target_int32", TypeError, "'target'",
     lambda e: e.cross_entropy_bwd(*_ce_bwd(target=_target().int()))),
    ("ce_bwd_out_shape", ValueError, "'out'",
     lambda e: e.cross_entropy_bwd(*_ce_bwd(), out=torch.empty(3, 9))),
    ("ce_bwd_out_1d", ValueError, "'out'",
     lambda e: e.cross_entropy_bwd(*_ce_bwd(), out=torch.empty(24))),
    ("ce_bwd_out_dtype", TypeError, "'out'",
     lambda e: e.cross_entropy_bwd(*_ce_bwd(), out=X().double())),
    ("ce_bwd_out_meta", ValueError, "'out'",
     lambda e: e.cross_entropy_bwd(*_ce_bwd(), out=X().to(META))),
    ("ce_bwd_out_not_contiguous", ValueError, "'out' must be contiguous",
     lambda e: e.cross_entropy_bwd(*_ce_bwd(), out=torch.empty(8, 3).t())),
    ("ce_bwd_out_overlaps_logits", ValueError, "'out' must be the logits themselves",
     lambda e: (lambda base: e.cross_entropy_bwd(
         *_ce_bwd(logits=base[:3]), out=base[1:]))(torch.randn(4, 8))),
    # rotary embeddings: x (B, H, T, D) float; cos and sin (T, R/2) or (B, T, R/2) float with
    # 1 <= R/2 <= D/2, sin shaped as cos; all on x's device (the tables may be any float dtype:
    # angle_table converts them)
    ("rot_x_3d", ValueError, "'x'", lambda e: e.rotary_embedding(*_rot(x=torch.randn(2, 3, 4)))),
    ("rot_x_int", TypeError, "'x'", lambda e: e.rotary_embedding(*_rot(x=_q().long()))),
    ("rot_x_too_many_elements", ValueError, "'x'",
     lambda e: e.rotary_embedding(*_rot(x=_many_elements(4), cos=_meta(1, 1), sin=_meta(1, 1)))),
    ("rot_x_strides", ValueError, "'x'",
     lambda e: e.rotary_embedding(*_rot(x=_huge_strides(), cos=_meta(3, 2), sin=_meta(3, 2)))),
    ("rot_x_meta", ValueError, "'x'",
     lambda e: e.rotary_embedding(*_rot(x=_q(device=META), cos=_meta(3, 2), sin=_meta(3, 2)))),
    ("rot_cos_1d", ValueError, "'cos'",
     lambda e: e.rotary_embedding(*_rot(cos=torch.randn(2), sin=torch.randn(2)))),
    ("rot_cos_4d", ValueError, "'cos'",
     lambda e: e.rotary_embedding(*_rot(cos=torch.randn(1, 1, 3, 2)))),
    ("rot_cos_int", TypeError, "'cos'",
     lambda e: e.rotary_embedding(*_rot(cos=torch.ones(3, 2, dtype=torch.int32)))),
    ("rot_cos_meta", ValueError, "'cos'", lambda e: e.rotary_embedding(*_rot(cos=_meta(3, 2)))),
    ("rot_cos_positions", ValueError, "'cos'",
     lambda e: e.rotary_embedding(*_rot(cos=torch.randn(4, 2), sin=torch.randn(4, 2)))),
    ("rot_cos_batch_rows", ValueError, "'cos'",
     lambda e: e.rotary_embedding(*_rot(cos=torch.randn(2, 3, 2), sin=torch.randn(2, 3, 2)))),
    ("rot_cos_no_angles", ValueError, "'cos'",
     lambda e: e.rotary_embedding(*_rot(cos=torch.randn(3, 0), sin=torch.randn(3, 0)))),
    ("rot_cos_R_over_D", ValueError, "'cos'",
     lambda e: e.rotary_embedding(*_rot(cos=torch.randn(3, 3), sin=torch.randn(3, 3)))),
    ("rot_sin_shape", ValueError, "'sin'",
     lambda e: e.rotary_embedding(*_rot(sin=torch.randn(3, 1)))),
    ("rot_sin_per_row_cos_shared", ValueError, "'sin'",
     lambda e: e.rotary_embedding(*_rot(sin=torch.randn(1, 3, 2)))),
    ("rot_sin_int", TypeError, "'sin'",
     lambda e: e.rotary_embedding(*_rot(sin=torch.ones(3, 2, dtype=torch.int64)))),
    ("rot_sin_meta", ValueError, "'sin'", lambda e: e.rotary_embedding(*_rot(sin=_meta(3, 2)))),
    # GLU (SwiGLU, GeGLU): gate (N, I) float; up and grad_out of gate's shape, dtype and device;
    # activation one of "silu", "gelu", "gelu_tanh"
    ("glu_fwd_gate_1d", ValueError, "'gate'",
     lambda e: _gf(e, torch.randn(8), torch.randn(8))),
    ("glu_fwd_gate_3d", ValueError, "'gate'",
     lambda e: _gf(e, torch.randn(2, 3, 8), torch.randn(2, 3, 8))),
    ("glu_fwd_gate_int", TypeError, "'gate'",
     lambda e: _gf(e, X().int(), X().int())),
    ("glu_fwd_gate_too_many_elements", ValueError, "'gate'",
     lambda e: _gf(e, _many_elements(2), _many_elements(2))),
    ("glu_fwd_gate_strides", ValueError, "'gate'",
     lambda e: _gf(e, torch.empty_strided((3, 8), (BIG, 1), device=META), _meta(3, 8))),
    ("glu_fwd_gate_meta", ValueError, "'gate'",
     lambda e: _gf(e, _meta(3, 8), _meta(3, 8))),
    ("glu_fwd_up_1d", ValueError, "'up'", lambda e: _gf(e, X(), torch.randn(24))),
    ("glu_fwd_up_shape", ValueError, "'up'", lambda e: _gf(e, X(), torch.randn(3, 9))),
    ("glu_fwd_up_dtype", TypeError, "'up'", lambda e: _gf(e, X(), X().double())),
    ("glu_fwd_up_int", TypeError, "'up'", lambda e: _gf(e, X(), X().long())),
    ("glu_fwd_up_meta", ValueError, "'up'", lambda e: _gf(e, X(), _meta(3, 8))),
    ("glu_fwd_up_strides", ValueError, "'up'",
     lambda e: _gf(e, _meta(3, 8), torch.empty_strided((3, 8), (BIG, 1), device=META))),
    ("glu_bwd_gate_1d", ValueError, "'gate'",
     lambda e: _gb(e, *_sw(gate=torch.randn(8)))),
    ("glu_bwd_gate_int", TypeError, "'gate'",
     lambda e: _gb(e, *_sw(gate=X().int(), up=X().int(), grad_out=X().int()))),
    ("glu_bwd_gate_too_many_elements", ValueError, "'gate'",
     lambda e: _gb(e, *(_many_elements(2),) * 3)),
    ("glu_bwd_gate_strides", ValueError, "'gate'",
     lambda e: _gb(e, *_sw(grad_out=_meta(3, 8), up=_meta(3, 8),
                                 gate=torch.empty_strided((3, 8), (BIG, 1), device=META)))),
    ("glu_bwd_gate_meta", ValueError, "'gate'",
     lambda e: _gb(e, _meta(3, 8), _meta(3, 8), _meta(3, 8))),
    ("glu_bwd_up_shape", ValueError, "'up'", lambda e: _gb(e, *_sw(up=X()[:2]))),
    ("glu_bwd_up_dtype", TypeError, "'up'",
     lambda e: _gb(e, *_sw(up=X().to(torch.bfloat16)))),
    ("glu_bwd_up_meta", ValueError, "'up'", lambda e: _gb(e, *_sw(up=_meta(3, 8)))),
    ("glu_bwd_grad_out_1d", ValueError, "'grad_out'",
     lambda e: _gb(e, *_sw(grad_out=torch.randn(24)))),
    ("glu_bwd_grad_out_shape", ValueError, "'grad_out'",
     lambda e: _gb(e, *_sw(grad_out=X().t()))),
    ("glu_bwd_grad_out_dtype", TypeError, "'grad_out'",
     lambda e: _gb(e, *_sw(grad_out=X().half()))),
    ("glu_bwd_grad_out_meta", ValueError, "'grad_out'",
     lambda e: _gb(e, *_sw(grad_out=_meta(3, 8)))),
    ("glu_bwd_grad_out_strides", ValueError, "'grad_out'",
     lambda e: _gb(e, *_sw(grad_out=torch.empty_strided((3, 8), (BIG, 1), device=META),
                                 gate=_meta(3, 8), up=_meta(3, 8)))),
    ("glu_fwd_activation_unknown", ValueError, "'activation'",
     lambda e: e.glu_fwd(X(), X(), "relu")),
    ("glu_fwd_activation_case", ValueError, "'activation'",
     lambda e: e.glu_fwd(X(), X(), "GELU")),
    ("glu_fwd_activation_empty", ValueError, "'activation'", lambda e: e.glu_fwd(X(), X(), "")),
    ("glu_bwd_activation_unknown", ValueError, "'activation'",
     lambda e: e.glu_bwd(X(), X(), X(), "gelu_new")),
    ("glu_fwd_activation_not_a_string", TypeError, "glu_fwd", lambda e: e.glu_fwd(X(), X(), 1)),
    # AdamW: the state tensors of one parameter must share one dtype (the kernel reads them all
    # with exp_avgs[i]'s element type)
    ("adamw_exp_avg_sqs_16bit_under_float32_exp_avgs", TypeError, "'exp_avg_sqs[0]'",
     lambda e: e.adamw_step(*_adamw(exp_avg_sqs=[torch.zeros(4, dtype=torch.bfloat16)]))),
    ("adamw_exp_avg_sqs_float32_under_16bit_exp_avgs", TypeError, "'exp_avg_sqs[0]'",
     lambda e: e.adamw_step(*_adamw(exp_avgs=[torch.zeros(4, dtype=torch.bfloat16)]))),
    ("adamw_max_exp_avg_sqs_dtype", TypeError, "'max_exp_avg_sqs[0]'",
     lambda e: e.adamw_step(*_adamw(amsgrad=True,
                                    max_exp_avg_sqs=[torch.zeros(4, dtype=torch.bfloat16)]))),
    ("adamw_steps_nan", ValueError, "steps[0]", lambda e: e.adamw_step(*_adamw(steps=[math.nan]))),
    ("adamw_steps_inf", ValueError, "steps[0]", lambda e: e.adamw_step(*_adamw(steps=[math.inf]))),
    ("adamw_params_meta_vs_cpu_grads", ValueError, "'grads[0]'",
     lambda e: e.adamw_step(*_adamw(params=[torch.randn(4, dtype=torch.bfloat16, device=META)]))),
    ("adamw_params_devices_differ", ValueError, "'params[1]'",
     lambda e: e.adamw_step(*_adamw(
         params=[torch.randn(4, dtype=torch.bfloat16),
                 torch.randn(4, dtype=torch.bfloat16, device=META)],
         grads=[torch.randn(4, dtype=torch.bfloat16)] * 2, exp_avgs=[torch.zeros(4)] * 2,
         exp_avg_sqs=[torch.zeros(4)] * 2, steps=[1.0, 1.0]))),
]


@pytest.mark.parametrize(("exc", "argument", "call"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_entry_point_check_fires(exc, argument, call):
    with pytest.raises(exc) as info:
        call(_ext())
    message = str(info.value)
    assert argument in message, f"{type(info.value).__name__} does not name {argument!r}: {message}"


def test_rejected_adamw_state_dtypes_leave_everything_untouched():
    """The state-dtype check runs before the kernel: nothing is written."""
    args = _adamw(exp_avg_sqs=[torch.zeros(4, dtype=torch.bfloat16)])
    before = [t.clone() for t in (args[0][0], args[2][0], args[3][0])]
    with pytest.raises(TypeError):
        _ext().adamw_step(*args)
    for t, b in zip((args[0][0], args[2][0], args[3][0]), before, strict=True):
        assert torch.equal(t, b)


def test_matching_mixed_precision_states_are_accepted():
    """bfloat16 params with float32 states (what fusedlm.optim.AdamW keeps) still work."""
    args = _adamw()
    before = args[0][0].clone()
    _ext().adamw_step(*args)
    assert not torch.equal(args[0][0], before)


@pytest.mark.parametrize("layout", ["transposed", "expanded", "offset"])
def test_entry_points_take_any_layout(layout):
    """What the kernels cannot read in place is converted at the boundary, not rejected:
    every entry point gives the result of the same call on contiguous copies."""
    e = _ext()
    base = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    if layout == "transposed":
        q = base.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "expanded":
        q = base[:, :, :1].expand(2, 3, 5, 8)
    else:
        q = torch.randn(base.numel() + 3, dtype=torch.float64)[3:].view(base.shape)
    out, lse = e.attention_fwd(q, q, q, 0.3, True, 0)
    ref_out, ref_lse = e.attention_fwd(*(q.contiguous(),) * 3, 0.3, True, 0)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
    grads = e.attention_bwd(q, q, q, q, out, lse, 0.3, True, 0)
    ref = e.attention_bwd(*(q.contiguous(),) * 4, ref_out, ref_lse, 0.3, True, 0)
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)
    x = q.reshape(-1, 8) if layout != "expanded" else q[0, 0]
    y, mean, rstd = e.layer_norm_fwd(x, x[0], x[1], 1e-5)
    ry, rmean, rrstd = e.layer_norm_fwd(x.contiguous(), x[0].contiguous(), x[1].contiguous(), 1e-5)
    torch.testing.assert_close(y, ry, rtol=0, atol=1e-12)
    dx = e.rms_norm_bwd(x, x, rrstd, x[0])[0]
    rdx = e.rms_norm_bwd(x.contiguous(), x.contiguous(), rrstd, x[0].contiguous())[0]
    torch.testing.assert_close(dx, rdx, rtol=0, atol=1e-12)
    target = torch.arange(x.shape[0]) % 8
    stats = e.cross_entropy_fwd(x, target, -100, 0.1)
    for s, r in zip(stats, e.cross_entropy_fwd(x.contiguous(), target, -100, 0.1), strict=True):
        torch.testing.assert_close(s, r, rtol=0, atol=1e-12)
    grad = torch.tensor(0.5, dtype=torch.float64).expand(x.shape[0])  # (a reduced loss's)
    dlogits = e.cross_entropy_bwd(grad, x, target, *stats[1:], -100, 0.1)
    rdlogits = e.cross_entropy_bwd(grad.contiguous(), x.contiguous(), target, *stats[1:], -100,
                                   0.1)
    torch.testing.assert_close(dlogits, rdlogits, rtol=0, atol=1e-12)


def test_angle_tables_in_any_layout_and_dtype_are_converted():
    """angle_table: cos and sin in any float dtype and layout, (T, R/2) or (B, T, R/2) (a batch
    of one, or rows expanded from one), reach the kernel as the compute dtype's contiguous
    (B or 1, T, R/2) table: every form gives the result of contiguous float32 (T, R/2) tables,
    bit for bit (float32 x, whose rows take the same loop in every call)."""
    e = _ext()
    x = torch.randn(2, 3, 7, 10)
    cos, sin = torch.randn(7, 4), torch.randn(7, 4)
    for interleaved in (False, True):
        expected = e.rotary_embedding(x, cos, sin, interleaved, False)
        for c, s in [
            (cos.double(), sin.double()),                                # converted to float32
            (cos.t().contiguous().t(), sin.t().contiguous().t()),        # transposed
            (torch.cat((cos, cos), 1)[:, :4], torch.cat((sin, sin), 1)[:, :4]),  # row stride 8
            (cos[None].expand(2, 7, 4), sin[None].expand(2, 7, 4)),      # per row, stride 0
        ]:
            torch.testing.assert_close(e.rotary_embedding(x, c, s, interleaved, False), expected,
                                       rtol=0, atol=0)
        # a batch of one: its (1, T, R/2) table is its (T, R/2) one
        torch.testing.assert_close(
            e.rotary_embedding(x[:1], cos[None], sin[None].double(), interleaved, False),
            expected[:1], rtol=0, atol=0)
    # float16 tables hold rounded angles: the same as passing those values in float32
    half_cos, half_sin = cos.half(), sin.half()
    torch.testing.assert_close(e.rotary_embedding(x, half_cos, half_sin, False, False),
                               e.rotary_embedding(x, half_cos.float(), half_sin.float(), False,
                                                  False), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["transposed", "expanded", "offset", "halves"])
def test_rotary_and_glu_entry_points_take_any_layout(layout):
    """The rotary and GLU entry points read strided operands in place: each gives the result
    of the same call on contiguous copies (float64: no vectorized loop, one arithmetic)."""
    e = _ext()
    base = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    if layout == "transposed":
        x = base.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "expanded":
        x = base[:, :1].expand(2, 3, 5, 8)
    elif layout == "offset":
        x = torch.randn(base.numel() + 3, dtype=torch.float64)[3:].view(base.shape)
    else:  # every other feature
        x = torch.randn(2, 3, 5, 16, dtype=torch.float64)[..., ::2]
    cos, sin = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    for interleaved in (False, True):
        out = e.rotary_embedding(x, cos, sin, interleaved, True)
        ref = e.rotary_embedding(x.contiguous(), cos, sin, interleaved, True)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    rows = x.reshape(-1, 8) if layout != "expanded" else x[0, 0]
    if layout == "halves":
        gate, up = torch.randn(30, 16, dtype=torch.float64).chunk(2, dim=-1)
    else:
        gate, up = rows, rows.flip(0)
    grad = torch.tensor(0.5, dtype=torch.float64).expand(gate.shape)  # (a summed loss's)
    for activation in ("silu", "gelu", "gelu_tanh"):
        out = e.glu_fwd(gate, up, activation)
        torch.testing.assert_close(out, e.glu_fwd(gate.contiguous(), up.contiguous(), activation),
                                   rtol=0, atol=0)
        for g, r in zip(e.glu_bwd(grad, gate, up, activation),
                        e.glu_bwd(grad.contiguous(), gate.contiguous(), up.contiguous(),
                                  activation), strict=True):
            torch.testing.assert_close(g, r, rtol=0, atol=0)
