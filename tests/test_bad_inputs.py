"""Every bad input gets a clear exception that names the offending argument: the public ops
(norms, attention, the losses), the modules' and the optimizer's constructors, GPTConfig, and
the C++ entry points of fusedlm._C."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import fusedlm
from fusedlm.models.gpt import GPTConfig
from tests.helpers import cpu_backend_available, cpu_unavailable_reason


def _raises(exc, argument, fn, *args, one_line=True, **kwargs):
    """fn(*args, **kwargs) raises ``exc`` whose message names ``argument`` (in quotes) and,
    with ``one_line``, is one short line."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert argument in message, f"{type(info.value).__name__} does not name {argument!r}: {message}"
    # One line that says what was passed, not a dump of it (a tensor's repr runs to pages).
    if one_line:
        assert "\n" not in message and len(message) <= 400, f"not one short line: {message}"
    return message


X = lambda: torch.randn(3, 8)  # noqa: E731
W = lambda dtype=torch.float32, n=8: torch.randn(n, dtype=dtype)  # noqa: E731
META = "meta"

# ---- layer_norm / rms_norm ---------------------------------------------------------------------

NORM_CASES = [
    # (id, exception, argument, call)
    ("int_x", TypeError, "'x'", lambda f: f(torch.ones(3, 8, dtype=torch.int64), 8)),
    ("bool_x", TypeError, "'x'", lambda f: f(torch.ones(3, 8, dtype=torch.bool), 8)),
    ("complex_x", TypeError, "'x'", lambda f: f(torch.ones(3, 8, dtype=torch.complex64), 8)),
    ("list_x", TypeError, "'x'", lambda f: f([[1.0] * 8], 8)),
    ("numpy_x", TypeError, "'x'", lambda f: f(X().numpy(), 8)),
    ("shape_mismatch", ValueError, "'normalized_shape'", lambda f: f(X(), 7)),
    ("shape_too_long", ValueError, "'normalized_shape'", lambda f: f(X(), (2, 3, 8))),
    (
        "shape_2d_mismatch",
        ValueError,
        "'normalized_shape'",
        lambda f: f(torch.randn(2, 4, 6), (6, 4)),
    ),
    ("shape_empty", ValueError, "'normalized_shape'", lambda f: f(X(), ())),
    ("shape_none", TypeError, "'normalized_shape'", lambda f: f(X(), None)),
    ("shape_float", TypeError, "'normalized_shape'", lambda f: f(X(), 8.0)),
    ("shape_float_tensor", TypeError, "'normalized_shape'", lambda f: f(X(), torch.tensor(8.0))),
    ("shape_tensor_of_two", TypeError, "'normalized_shape'",
     lambda f: f(X(), torch.tensor([2, 8]))),
    ("weight_shape", ValueError, "'weight'", lambda f: f(X(), 8, W(n=7))),
    ("weight_2d", ValueError, "'weight'", lambda f: f(X(), 8, torch.randn(1, 8))),
    ("weight_int", TypeError, "'weight'", lambda f: f(X(), 8, torch.ones(8, dtype=torch.int32))),
    ("weight_float64_x_float32", TypeError, "'weight'", lambda f: f(X(), 8, W(torch.float64))),
    ("weight_bf16_x_float32", TypeError, "'weight'", lambda f: f(X(), 8, W(torch.bfloat16))),
    ("weight_not_tensor", TypeError, "'weight'", lambda f: f(X(), 8, [1.0] * 8)),
    ("weight_on_meta", ValueError, "'weight'", lambda f: f(X(), 8, torch.randn(8, device=META))),
    ("x_on_meta", ValueError, "'weight'", lambda f: f(torch.randn(3, 8, device=META), 8, W())),
    ("eps_negative", ValueError, "'eps'", lambda f: f(X(), 8, eps=-1e-5)),
    ("eps_nan", ValueError, "'eps'", lambda f: f(X(), 8, eps=float("nan"))),
    ("eps_inf", ValueError, "'eps'", lambda f: f(X(), 8, eps=float("inf"))),
    ("eps_str", TypeError, "'eps'", lambda f: f(X(), 8, eps="1e-5")),
    ("eps_bool", TypeError, "'eps'", lambda f: f(X(), 8, eps=True)),
    ("eps_tensor_2", ValueError, "'eps'", lambda f: f(X(), 8, eps=torch.tensor([1e-5, 1e-5]))),
    ("backend_unknown", ValueError, "'backend'", lambda f: f(X(), 8, backend="gpu")),
]


@pytest.mark.parametrize(
    "fn", [fusedlm.layer_norm, fusedlm.rms_norm], ids=["layer_norm", "rms_norm"]
)
@pytest.mark.parametrize(
    ("exc", "argument", "call"), [c[1:] for c in NORM_CASES], ids=[c[0] for c in NORM_CASES]
)
def test_norm_bad_input(call, argument, exc, fn):
    _raises(exc, argument, call, fn)


LN_ONLY_CASES = [
    ("bias_shape", ValueError, "'bias'", lambda: fusedlm.layer_norm(X(), 8, W(), W(n=4))),
    (
        "bias_int",
        TypeError,
        "'bias'",
        lambda: fusedlm.layer_norm(X(), 8, W(), torch.ones(8, dtype=torch.int64)),
    ),
    (
        "bias_dtype_differs_from_weight",
        TypeError,
        "'bias'",
        lambda: fusedlm.layer_norm(X().double(), 8, W(torch.float64), W(torch.float32)),
    ),
    (
        "bias_on_meta",
        ValueError,
        "'bias'",
        lambda: fusedlm.layer_norm(X(), 8, W(), torch.randn(8, device=META)),
    ),
    (
        "bias_float64_no_weight",
        TypeError,
        "'bias'",
        lambda: fusedlm.layer_norm(X(), 8, None, W(torch.float64)),
    ),
]


@pytest.mark.parametrize(
    ("exc", "argument", "call"), [c[1:] for c in LN_ONLY_CASES], ids=[c[0] for c in LN_ONLY_CASES]
)
def test_layer_norm_bad_bias(call, argument, exc):
    _raises(exc, argument, call)


@pytest.mark.parametrize(
    "fn", [fusedlm.layer_norm, fusedlm.rms_norm], ids=["layer_norm", "rms_norm"]
)
def test_norm_string_normalized_shape_names_argument(fn):
    _raises(TypeError, "'normalized_shape'", fn, torch.randn(3, 3), "abc")


@pytest.mark.parametrize(
    "fn", [fusedlm.layer_norm, fusedlm.rms_norm], ids=["layer_norm", "rms_norm"]
)
def test_norm_float_entries_in_normalized_shape_rejected(fn):
    _raises(TypeError, "'normalized_shape'", fn, torch.randn(3, 2), [2.7])


# ---- losses, norm modules, the optimizer's constructor ----------------------------------------
# Their arguments reached int() / float comparisons / torch.empty unchecked: "int() argument
# must be ... not 'NoneType'", "'<=' not supported between instances of 'float' and 'str'".
# (fusedlm.cross_entropy raises F.cross_entropy's exception types: it is a drop-in.)

LOGITS = lambda: torch.randn(4, 7)  # noqa: E731
TARGET = lambda: torch.randint(0, 7, (4,))  # noqa: E731
PARAMS = lambda: [torch.nn.Parameter(torch.randn(3))]  # noqa: E731
CE = fusedlm.cross_entropy
LCE = lambda **kw: fusedlm.linear_cross_entropy(  # noqa: E731
    torch.randn(4, 5), torch.randn(7, 5), TARGET(), **kw)
ADAMW = fusedlm.optim.AdamW
BIG = lambda: torch.randn(128)  # noqa: E731

PUBLIC_CASES = [
    ("ce_ignore_index_none", TypeError, "'ignore_index'",
     lambda: CE(LOGITS(), TARGET(), ignore_index=None)),
    ("ce_ignore_index_float", TypeError, "'ignore_index'",
     lambda: CE(LOGITS(), TARGET(), ignore_index=-100.0)),
    ("ce_ignore_index_tensor", TypeError, "'ignore_index'",
     lambda: CE(LOGITS(), TARGET(), ignore_index=torch.tensor([1, 2]))),
    ("ce_ignore_index_huge", ValueError, "'ignore_index'",
     lambda: CE(LOGITS(), TARGET(), ignore_index=2**63)),
    ("ce_reduction_int", ValueError, "'reduction'", lambda: CE(LOGITS(), TARGET(), reduction=1)),
    ("lce_ignore_index_str", TypeError, "'ignore_index'", lambda: LCE(ignore_index="-100")),
    ("lce_reduction_list", ValueError, "'reduction'", lambda: LCE(reduction=["mean"])),
    ("layer_norm_module_negative", ValueError, "'normalized_shape'",
     lambda: fusedlm.nn.LayerNorm(-1)),
    ("layer_norm_module_float", TypeError, "'normalized_shape'",
     lambda: fusedlm.nn.LayerNorm(8.0)),
    ("rms_norm_module_str", TypeError, "'normalized_shape'", lambda: fusedlm.nn.RMSNorm("8")),
    ("rms_norm_module_none_entry", TypeError, "'normalized_shape'",
     lambda: fusedlm.nn.RMSNorm((8, None))),
    ("attention_module_n_embd_none", ValueError, "'n_embd'",
     lambda: fusedlm.nn.CausalSelfAttention(None, 4)),
    ("attention_module_n_head_zero", ValueError, "'n_head'",
     lambda: fusedlm.nn.CausalSelfAttention(32, 0)),
    ("attention_module_n_kv_head_str", ValueError, "'n_kv_head'",
     lambda: fusedlm.nn.CausalSelfAttention(32, 4, "2")),
    ("swiglu_module_float_width", ValueError, "'intermediate_size'",
     lambda: fusedlm.nn.SwiGLUMLP(16, 2.5)),
    ("geglu_module_str_hidden", ValueError, "'hidden_size'", lambda: fusedlm.nn.GeGLUMLP("16", 8)),
    ("gpt_config_n_kv_head_str", ValueError, "'n_kv_head'", lambda: GPTConfig(n_kv_head="2")),
    ("gpt_config_intermediate_negative", ValueError, "'intermediate_size'",
     lambda: GPTConfig(arch="llama", intermediate_size=-1)),
    ("gpt_config_dropout_none", ValueError, "'dropout'", lambda: GPTConfig(dropout=None)),
    ("gpt_config_norm_eps_nan", ValueError, "'norm_eps'", lambda: GPTConfig(norm_eps=float("nan"))),
    ("gpt_config_rope_theta_zero", ValueError, "'rope_theta'", lambda: GPTConfig(rope_theta=0)),
    ("adamw_params_none", TypeError, "'params'", lambda: ADAMW(None)),
    ("adamw_lr_none", TypeError, "'lr'", lambda: ADAMW(PARAMS(), lr=None)),
    ("adamw_lr_nan", ValueError, "'lr'", lambda: ADAMW(PARAMS(), lr=float("nan"))),
    ("adamw_lr_two_elements", ValueError, "'lr'", lambda: ADAMW(PARAMS(), lr=torch.ones(2))),
    ("adamw_betas_scalar", TypeError, "'betas'", lambda: ADAMW(PARAMS(), betas=0.9)),
    ("adamw_betas_three", TypeError, "'betas'", lambda: ADAMW(PARAMS(), betas=(0.9, 0.99, 0.1))),
    ("adamw_beta2_one", ValueError, "'betas[1]'", lambda: ADAMW(PARAMS(), betas=(0.9, 1.0))),
    ("adamw_beta1_str", TypeError, "'betas[0]'", lambda: ADAMW(PARAMS(), betas=("0.9", 0.99))),
    ("adamw_eps_str", TypeError, "'eps'", lambda: ADAMW(PARAMS(), eps="1e-8")),
    ("adamw_weight_decay_negative", ValueError, "'weight_decay'",
     lambda: ADAMW(PARAMS(), weight_decay=-0.1)),
    # A large tensor where a number or a shape goes: the message says what it is, it does
    # not print it.
    ("norm_shape_big_tensor", TypeError, "'normalized_shape'",
     lambda: fusedlm.layer_norm(torch.randn(3, 128), BIG())),
    ("adamw_betas_big_tensor", TypeError, "'betas'", lambda: ADAMW(PARAMS(), betas=BIG())),
    ("adamw_eps_big_tensor", ValueError, "'eps'", lambda: ADAMW(PARAMS(), eps=BIG())),
    ("lce_chunk_size_big_tensor", ValueError, "'chunk_size'", lambda: LCE(chunk_size=BIG())),
    ("lce_label_smoothing_big_tensor", ValueError, "'label_smoothing'",
     lambda: LCE(label_smoothing=BIG())),
    ("lce_softcap_big_tensor", ValueError, "'softcap'", lambda: LCE(softcap=BIG())),
    ("lce_z_loss_big_tensor", ValueError, "'z_loss'", lambda: LCE(z_loss=BIG())),
    ("ce_z_loss_big_tensor", ValueError, "'z_loss'", lambda: CE(LOGITS(), TARGET(), z_loss=BIG())),
    ("lce_reduction_big_tensor", ValueError, "'reduction'", lambda: LCE(reduction=BIG())),
    ("ce_ignore_index_big_tensor", TypeError, "'ignore_index'",
     lambda: CE(LOGITS(), TARGET(), ignore_index=BIG())),
    ("attention_window_big_tensor", TypeError, "'window'",
     lambda: fusedlm.attention(*[torch.randn(1, 2, 4, 8)] * 3, window=BIG())),
    ("attention_scale_big_tensor", ValueError, "'scale'",
     lambda: fusedlm.attention(*[torch.randn(1, 2, 4, 8)] * 3, scale=BIG())),
    ("geglu_approximate_big_tensor", ValueError, "'approximate'",
     lambda: fusedlm.geglu(torch.randn(2, 4), torch.randn(2, 4), approximate=BIG())),
    ("gelu_module_approximate_big_list", ValueError, "'approximate'",
     lambda: fusedlm.nn.GeGLUMLP(16, 8, approximate=["tanh"] * 200)),
    ("attention_module_n_head_big_tensor", ValueError, "'n_head'",
     lambda: fusedlm.nn.CausalSelfAttention(32, BIG())),
    ("gpt_config_dropout_big_tensor", ValueError, "'dropout'", lambda: GPTConfig(dropout=BIG())),
    ("gpt_config_n_layer_big_tensor", ValueError, "'n_layer'", lambda: GPTConfig(n_layer=BIG())),
]


@pytest.mark.parametrize(
    ("exc", "argument", "call"), [c[1:] for c in PUBLIC_CASES], ids=[c[0] for c in PUBLIC_CASES]
)
def test_public_bad_input(call, argument, exc):
    _raises(exc, argument, call)


def test_adamw_takes_what_torch_takes():
    """The constructor's checks reject nothing torch.optim.AdamW accepts: a zero lr, eps and
    weight decay, numpy and tensor hyperparameters, a list of betas, a generator of params."""
    for kwargs in ({"lr": 0.0, "eps": 0.0, "weight_decay": 0.0}, {"lr": np.float32(1e-3)},
                   {"lr": torch.tensor(1e-3), "foreach": False}, {"betas": [0.0, 0.5]},
                   {"betas": (torch.tensor(0.9), torch.tensor(0.999)), "foreach": False}):
        for cls in (torch.optim.AdamW, ADAMW):
            cls(PARAMS(), **kwargs)
    ADAMW(p for p in PARAMS())


# ---- attention ---------------------------------------------------------------------------------


def _qkv(B=1, Hq=2, Hkv=2, Tq=5, Tk=6, D=8, dtype=torch.float32):
    return (
        torch.randn(B, Hq, Tq, D, dtype=dtype),
        torch.randn(B, Hkv, Tk, D, dtype=dtype),
        torch.randn(B, Hkv, Tk, D, dtype=dtype),
    )


def _with(index, value):
    q, k, v = _qkv()
    args = [q, k, v]
    args[index] = value(args[index]) if callable(value) else value
    return args


ATTENTION_CASES = [
    ("int_q", TypeError, "'q'", lambda: fusedlm.attention(*_with(0, lambda t: t.int()))),
    ("int_k", TypeError, "'k'", lambda: fusedlm.attention(*_with(1, lambda t: t.long()))),
    ("q32_k64", TypeError, "'k'", lambda: fusedlm.attention(*_with(1, lambda t: t.double()))),
    ("q32_v16", TypeError, "'v'", lambda: fusedlm.attention(*_with(2, lambda t: t.half()))),
    ("k_on_meta", ValueError, "'k'", lambda: fusedlm.attention(*_with(1, lambda t: t.to(META)))),
    ("v_on_meta", ValueError, "'v'", lambda: fusedlm.attention(*_with(2, lambda t: t.to(META)))),
    ("q_3d", ValueError, "'q'", lambda: fusedlm.attention(*_with(0, lambda t: t[0]))),
    ("k_5d", ValueError, "'k'", lambda: fusedlm.attention(*_with(1, lambda t: t[None]))),
    ("q_not_tensor", TypeError, "'q'", lambda: fusedlm.attention(*_with(0, [[1.0]]))),
    ("v_none", TypeError, "'v'", lambda: fusedlm.attention(*_with(2, None))),
    ("v_shape", ValueError, "'v'", lambda: fusedlm.attention(*_with(2, lambda t: t[:, :, :-1]))),
    ("heads_not_divisible", ValueError, "heads", lambda: fusedlm.attention(*_qkv(Hq=3, Hkv=2))),
    ("head_dim_257", ValueError, "head dim", lambda: fusedlm.attention(*_qkv(D=257))),
    (
        "head_dims_differ",
        ValueError,
        "head dim",
        lambda: fusedlm.attention(_qkv()[0], *_qkv(D=4)[1:]),
    ),
    ("batch_differs", ValueError, "batch", lambda: fusedlm.attention(_qkv(B=2)[0], *_qkv(B=1)[1:])),
    ("causal_int", TypeError, "'causal'", lambda: fusedlm.attention(*_qkv(), causal=1)),
    ("scale_nan", ValueError, "'scale'", lambda: fusedlm.attention(*_qkv(), scale=float("nan"))),
    ("scale_str", TypeError, "'scale'", lambda: fusedlm.attention(*_qkv(), scale="0.1")),
    ("window_int", TypeError, "'window'", lambda: fusedlm.attention(*_qkv(), window=4)),
    ("window_triple", TypeError, "'window'", lambda: fusedlm.attention(*_qkv(), window=(1, 2, 3))),
    ("window_float", TypeError, "'window'", lambda: fusedlm.attention(*_qkv(), window=(1.5, 0))),
    ("window_bool", TypeError, "'window'", lambda: fusedlm.attention(*_qkv(), window=(True, 0))),
    ("window_negative", ValueError, "'window'", lambda: fusedlm.attention(*_qkv(), window=(0, -2))),
    ("sinks_list", TypeError, "'sinks'", lambda: fusedlm.attention(*_qkv(), sinks=[0.0, 1.0])),
    ("sinks_int", TypeError, "'sinks'",
     lambda: fusedlm.attention(*_qkv(), sinks=torch.zeros(2, dtype=torch.int64))),
    ("sinks_per_kv_head", ValueError, "'sinks'",
     lambda: fusedlm.attention(*_qkv(Hq=4, Hkv=2), sinks=torch.zeros(2))),
    ("sinks_2d", ValueError, "'sinks'",
     lambda: fusedlm.attention(*_qkv(), sinks=torch.zeros(1, 2))),
    ("sinks_on_meta", ValueError, "'sinks'",
     lambda: fusedlm.attention(*_qkv(), sinks=torch.zeros(2, device=META))),
    ("return_lse_int", TypeError, "'return_lse'",
     lambda: fusedlm.attention(*_qkv(), return_lse=1)),
    ("softcap_negative", ValueError, "'softcap'", lambda: fusedlm.attention(*_qkv(), softcap=-5.0)),
    ("softcap_nan", ValueError, "'softcap'",
     lambda: fusedlm.attention(*_qkv(), softcap=float("nan"))),
    ("softcap_str", TypeError, "'softcap'", lambda: fusedlm.attention(*_qkv(), softcap="50")),
    ("softcap_big_tensor", ValueError, "'softcap'",
     lambda: fusedlm.attention(*_qkv(), softcap=BIG())),
    ("dropout_p_one", ValueError, "'dropout_p'", lambda: fusedlm.attention(*_qkv(), dropout_p=1.0)),
    ("dropout_p_negative", ValueError, "'dropout_p'",
     lambda: fusedlm.attention(*_qkv(), dropout_p=-0.1)),
    ("dropout_p_nan", ValueError, "'dropout_p'",
     lambda: fusedlm.attention(*_qkv(), dropout_p=float("nan"))),
    ("dropout_p_str", TypeError, "'dropout_p'",
     lambda: fusedlm.attention(*_qkv(), dropout_p="0.1")),
    ("dropout_p_big_tensor", ValueError, "'dropout_p'",
     lambda: fusedlm.attention(*_qkv(), dropout_p=BIG())),
    (
        "backend_unknown",
        ValueError,
        "'backend'",
        lambda: fusedlm.attention(*_qkv(), backend="flash"),
    ),
]


@pytest.mark.parametrize(
    ("exc", "argument", "call"),
    [c[1:] for c in ATTENTION_CASES],
    ids=[c[0] for c in ATTENTION_CASES],
)
def test_attention_bad_input(call, argument, exc):
    _raises(exc, argument, call)


def test_attention_head_dim_256_is_accepted():
    q, k, v = _qkv(Tq=2, Tk=3, D=256)
    assert fusedlm.attention(q, k, v).shape == q.shape


# ---- C++ entry points --------------------------------------------------------------------------

needs_ext = pytest.mark.skipif(not cpu_backend_available(), reason=cpu_unavailable_reason())


def _ext():
    return fusedlm._ext.load()


def _ln_stats(x):
    return torch.zeros(x.shape[0]), torch.ones(x.shape[0])


def _q():
    return torch.randn(1, 2, 3, 4)


EXT_CASES = [
    # layer_norm_fwd(x, weight, bias, eps)
    ("ln_fwd_int_x", TypeError, "'x'", lambda e: e.layer_norm_fwd(X().int(), None, None, 1e-5)),
    (
        "ln_fwd_3d_x",
        ValueError,
        "'x'",
        lambda e: e.layer_norm_fwd(torch.randn(2, 3, 8), None, None, 1e-5),
    ),
    (
        "ln_fwd_empty_row",
        ValueError,
        "'x'",
        lambda e: e.layer_norm_fwd(torch.randn(3, 0), None, None, 1e-5),
    ),
    (
        "ln_fwd_x_meta",
        ValueError,
        "'x'",
        lambda e: e.layer_norm_fwd(X().to(META), None, None, 1e-5),
    ),
    (
        "ln_fwd_weight_shape",
        ValueError,
        "'weight'",
        lambda e: e.layer_norm_fwd(X(), W(n=9), None, 1e-5),
    ),
    (
        "ln_fwd_weight_dtype",
        TypeError,
        "'weight'",
        lambda e: e.layer_norm_fwd(X(), W(torch.float64), None, 1e-5),
    ),
    (
        "ln_fwd_weight_meta",
        ValueError,
        "'weight'",
        lambda e: e.layer_norm_fwd(X(), W().to(META), None, 1e-5),
    ),
    (
        "ln_fwd_bias_dtype",
        TypeError,
        "'bias'",
        lambda e: e.layer_norm_fwd(X().half(), W().half(), W(), 1e-5),
    ),
    ("ln_fwd_bias_shape", ValueError, "'bias'", lambda e: e.layer_norm_fwd(X(), W(), W(n=2), 1e-5)),
    ("ln_fwd_eps_negative", ValueError, "'eps'", lambda e: e.layer_norm_fwd(X(), None, None, -1.0)),
    (
        "ln_fwd_eps_nan",
        ValueError,
        "'eps'",
        lambda e: e.layer_norm_fwd(X(), None, None, float("nan")),
    ),
    ("ln_fwd_x_not_tensor", TypeError, "x", lambda e: e.layer_norm_fwd("x", None, None, 1e-5)),
    # layer_norm_bwd(grad_y, x, mean, rstd, weight, has_bias)
    (
        "ln_bwd_grad_shape",
        ValueError,
        "'grad_y'",
        lambda e: e.layer_norm_bwd(torch.randn(3, 7), X(), *_ln_stats(X()), None, False),
    ),
    (
        "ln_bwd_grad_dtype",
        TypeError,
        "'grad_y'",
        lambda e: e.layer_norm_bwd(X().double(), X(), *_ln_stats(X()), None, False),
    ),
    (
        "ln_bwd_mean_dtype",
        TypeError,
        "'mean'",
        lambda e: e.layer_norm_bwd(
            X(), X(), torch.zeros(3, dtype=torch.float64), torch.ones(3), None, False
        ),
    ),
    (
        "ln_bwd_rstd_shape",
        ValueError,
        "'rstd'",
        lambda e: e.layer_norm_bwd(X(), X(), torch.zeros(3), torch.ones(4), None, False),
    ),
    (
        "ln_bwd_mean_meta",
        ValueError,
        "'mean'",
        lambda e: e.layer_norm_bwd(
            X(), X(), torch.zeros(3, device=META), torch.ones(3), None, False
        ),
    ),
    (
        "ln_bwd_weight_shape",
        ValueError,
        "'weight'",
        lambda e: e.layer_norm_bwd(X(), X(), *_ln_stats(X()), W(n=3), True),
    ),
    # rms_norm_fwd(x, weight, eps) / rms_norm_bwd(grad_y, x, rstd, weight)
    ("rms_fwd_int_x", TypeError, "'x'", lambda e: e.rms_norm_fwd(X().long(), None, 1e-6)),
    ("rms_fwd_1d_x", ValueError, "'x'", lambda e: e.rms_norm_fwd(torch.randn(8), None, 1e-6)),
    (
        "rms_fwd_weight_dtype",
        TypeError,
        "'weight'",
        lambda e: e.rms_norm_fwd(X().bfloat16(), W(torch.float16), 1e-6),
    ),
    ("rms_fwd_eps", ValueError, "'eps'", lambda e: e.rms_norm_fwd(X(), None, -1e-6)),
    (
        "rms_bwd_rstd_dtype",
        TypeError,
        "'rstd'",
        lambda e: e.rms_norm_bwd(X(), X(), torch.ones(3, dtype=torch.float16), None),
    ),
    (
        "rms_bwd_grad_meta",
        ValueError,
        "'grad_y'",
        lambda e: e.rms_norm_bwd(X().to(META), X(), torch.ones(3), None),
    ),
    # add_layer_norm_fwd(x, residual, weight, bias, eps): x in residual's dtype or 16-bit
    # beside a float32 residual; weight/bias in residual's dtype or float32
    ("add_ln_fwd_int_x", TypeError, "'x'",
     lambda e: e.add_layer_norm_fwd(X().int(), X(), None, None, 1e-5)),
    ("add_ln_fwd_x_shape", ValueError, "'x'",
     lambda e: e.add_layer_norm_fwd(X()[:2], X(), None, None, 1e-5)),
    ("add_ln_fwd_x_1d", ValueError, "'x'",
     lambda e: e.add_layer_norm_fwd(X()[0], X(), None, None, 1e-5)),
    ("add_ln_fwd_x32_residual_bf16", TypeError, "'x'",
     lambda e: e.add_layer_norm_fwd(X(), X().bfloat16(), None, None, 1e-5)),
    ("add_ln_fwd_x64_residual32", TypeError, "'x'",
     lambda e: e.add_layer_norm_fwd(X().double(), X(), None, None, 1e-5)),
    ("add_ln_fwd_x_meta", ValueError, "'x'",
     lambda e: e.add_layer_norm_fwd(X().to(META), X(), None, None, 1e-5)),
    ("add_ln_fwd_residual_int", TypeError, "'residual'",
     lambda e: e.add_layer_norm_fwd(X().int(), X().int(), None, None, 1e-5)),
    ("add_ln_fwd_residual_3d", ValueError, "'residual'",
     lambda e: e.add_layer_norm_fwd(torch.randn(2, 3, 8), torch.randn(2, 3, 8), None, None, 1e-5)),
    ("add_ln_fwd_residual_empty_row", ValueError, "'residual'",
     lambda e: e.add_layer_norm_fwd(torch.randn(3, 0), torch.randn(3, 0), None, None, 1e-5)),
    ("add_ln_fwd_residual_not_tensor", TypeError, "residual",
     lambda e: e.add_layer_norm_fwd(X(), "residual", None, None, 1e-5)),
    ("add_ln_fwd_weight_shape", ValueError, "'weight'",
     lambda e: e.add_layer_norm_fwd(X(), X(), W(n=9), None, 1e-5)),
    ("add_ln_fwd_weight_dtype", TypeError, "'weight'",
     lambda e: e.add_layer_norm_fwd(X(), X(), W(torch.float64), None, 1e-5)),
    ("add_ln_fwd_weight_of_x_dtype", TypeError, "'weight'",  # bf16 x, float32 residual and h
     lambda e: e.add_layer_norm_fwd(X().bfloat16(), X(), W(torch.bfloat16), None, 1e-5)),
    ("add_ln_fwd_bias_dtype", TypeError, "'bias'",
     lambda e: e.add_layer_norm_fwd(X(), X(), W(), W(torch.float16), 1e-5)),
    ("add_ln_fwd_bias_shape", ValueError, "'bias'",
     lambda e: e.add_layer_norm_fwd(X(), X(), None, W(n=2), 1e-5)),
    ("add_ln_fwd_eps_negative", ValueError, "'eps'",
     lambda e: e.add_layer_norm_fwd(X(), X(), None, None, -1.0)),
    # add_layer_norm_bwd(grad_y, grad_h, h, mean, rstd, weight, has_bias)
    ("add_ln_bwd_grad_y_shape", ValueError, "'grad_y'",
     lambda e: e.add_layer_norm_bwd(torch.randn(3, 7), None, X(), *_ln_stats(X()), None, False)),
    ("add_ln_bwd_grad_y_dtype", TypeError, "'grad_y'",
     lambda e: e.add_layer_norm_bwd(X().half(), None, X(), *_ln_stats(X()), None, False)),
    ("add_ln_bwd_grad_h_shape", ValueError, "'grad_h'",
     lambda e: e.add_layer_norm_bwd(X(), X()[:, :4], X(), *_ln_stats(X()), None, False)),
    ("add_ln_bwd_grad_h_dtype", TypeError, "'grad_h'",
     lambda e: e.add_layer_norm_bwd(X(), X().bfloat16(), X(), *_ln_stats(X()), None, False)),
    ("add_ln_bwd_grad_h_meta", ValueError, "'grad_h'",
     lambda e: e.add_layer_norm_bwd(X(), X().to(META), X(), *_ln_stats(X()), None, False)),
    ("add_ln_bwd_h_int", TypeError, "'h'",
     lambda e: e.add_layer_norm_bwd(X().int(), None, X().int(), *_ln_stats(X()), None, False)),
    ("add_ln_bwd_h_1d", ValueError, "'h'",
     lambda e: e.add_layer_norm_bwd(X()[0], None, X()[0], *_ln_stats(X()), None, False)),
    ("add_ln_bwd_mean_dtype", TypeError, "'mean'",
     lambda e: e.add_layer_norm_bwd(X(), None, X(), torch.zeros(3, dtype=torch.float64),
                                    torch.ones(3), None, False)),
    ("add_ln_bwd_rstd_shape", ValueError, "'rstd'",
     lambda e: e.add_layer_norm_bwd(X(), None, X(), torch.zeros(3), torch.ones(4), None, False)),
    ("add_ln_bwd_weight_shape", ValueError, "'weight'",
     lambda e: e.add_layer_norm_bwd(X(), None, X(), *_ln_stats(X()), W(n=3), True)),
    # add_rms_norm_fwd(x, residual, weight, eps) / add_rms_norm_bwd(grad_y, grad_h, h, rstd,
    # weight)
    ("add_rms_fwd_x16_residual_bf16", TypeError, "'x'",
     lambda e: e.add_rms_norm_fwd(X().half(), X().bfloat16(), None, 1e-6)),
    ("add_rms_fwd_residual_int", TypeError, "'residual'",
     lambda e: e.add_rms_norm_fwd(X().long(), X().long(), None, 1e-6)),
    ("add_rms_fwd_residual_meta", ValueError, "'residual'",
     lambda e: e.add_rms_norm_fwd(X(), X().to(META), None, 1e-6)),
    ("add_rms_fwd_weight_dtype", TypeError, "'weight'",
     lambda e: e.add_rms_norm_fwd(X().bfloat16(), X().bfloat16(), W(torch.float16), 1e-6)),
    ("add_rms_fwd_eps", ValueError, "'eps'",
     lambda e: e.add_rms_norm_fwd(X(), X(), None, -1e-6)),
    ("add_rms_bwd_grad_h_dtype", TypeError, "'grad_h'",
     lambda e: e.add_rms_norm_bwd(X(), X().double(), X(), torch.ones(3), None)),
    ("add_rms_bwd_grad_h_shape", ValueError, "'grad_h'",
     lambda e: e.add_rms_norm_bwd(X(), torch.randn(3, 8, 1), X(), torch.ones(3), None)),
    ("add_rms_bwd_h_3d", ValueError, "'h'",
     lambda e: e.add_rms_norm_bwd(X()[None], None, X()[None], torch.ones(3), None)),
    ("add_rms_bwd_rstd_dtype", TypeError, "'rstd'",
     lambda e: e.add_rms_norm_bwd(X(), None, X(), torch.ones(3, dtype=torch.float16), None)),
    ("add_rms_bwd_grad_y_meta", ValueError, "'grad_y'",
     lambda e: e.add_rms_norm_bwd(X().to(META), None, X(), torch.ones(3), None)),
    # attention_fwd(q, k, v, scale, causal, causal_offset)
    (
        "att_fwd_q_3d",
        ValueError,
        "'q'",
        lambda e: e.attention_fwd(_q()[0], _q(), _q(), 0.5, False, 0),
    ),
    (
        "att_fwd_q_int",
        TypeError,
        "'q'",
        lambda e: e.attention_fwd(_q().int(), _q().int(), _q().int(), 0.5, False, 0),
    ),
    (
        "att_fwd_k_dtype",
        TypeError,
        "'k'",
        lambda e: e.attention_fwd(_q(), _q().double(), _q(), 0.5, False, 0),
    ),
    (
        "att_fwd_v_shape",
        ValueError,
        "'v'",
        lambda e: e.attention_fwd(_q(), _q(), _q()[:, :, :2], 0.5, False, 0),
    ),
    (
        "att_fwd_k_meta",
        ValueError,
        "'k'",
        lambda e: e.attention_fwd(_q(), _q().to(META), _q(), 0.5, False, 0),
    ),
    (
        "att_fwd_heads",
        ValueError,
        "heads",
        lambda e: e.attention_fwd(torch.randn(1, 3, 3, 4), _q(), _q(), 0.5, False, 0),
    ),
    (
        "att_fwd_d257",
        ValueError,
        "head dim",
        lambda e: e.attention_fwd(*(torch.randn(1, 1, 2, 257),) * 3, 0.5, False, 0),
    ),
    # attention_bwd(grad_out, q, k, v, out, lse, scale, causal, causal_offset)
    (
        "att_bwd_lse_dtype",
        TypeError,
        "'lse'",
        lambda e: e.attention_bwd(
            *(_q(),) * 5, torch.zeros(1, 2, 3, dtype=torch.float64), 0.5, False, 0
        ),
    ),
    (
        "att_bwd_lse_shape",
        ValueError,
        "'lse'",
        lambda e: e.attention_bwd(*(_q(),) * 5, torch.zeros(1, 2, 4), 0.5, False, 0),
    ),
    (
        "att_bwd_out_shape",
        ValueError,
        "'out'",
        lambda e: e.attention_bwd(*(_q(),) * 4, _q()[:, :1], torch.zeros(1, 2, 3), 0.5, False, 0),
    ),
    (
        "att_bwd_grad_dtype",
        TypeError,
        "'grad_out'",
        lambda e: e.attention_bwd(_q().half(), *(_q(),) * 4, torch.zeros(1, 2, 3), 0.5, False, 0),
    ),
    (
        "att_bwd_grad_meta",
        ValueError,
        "'grad_out'",
        lambda e: e.attention_bwd(_q().to(META), *(_q(),) * 4, torch.zeros(1, 2, 3), 0.5, False, 0),
    ),
    # ... window_offset, key_range, grad_lse (B, Hq, Tq) in lse's dtype
    (
        "att_bwd_grad_lse_shape",
        ValueError,
        "'grad_lse'",
        lambda e: e.attention_bwd(*(_q(),) * 5, torch.zeros(1, 2, 3), 0.5, False, 0,
                                  grad_lse=torch.zeros(1, 2, 4)),
    ),
    (
        "att_bwd_grad_lse_dtype",
        TypeError,
        "'grad_lse'",
        lambda e: e.attention_bwd(*(_q(),) * 5, torch.zeros(1, 2, 3), 0.5, False, 0,
                                  grad_lse=torch.zeros(1, 2, 3, dtype=torch.float64)),
    ),
    (
        "att_bwd_grad_lse_meta",
        ValueError,
        "'grad_lse'",
        lambda e: e.attention_bwd(*(_q(),) * 5, torch.zeros(1, 2, 3), 0.5, False, 0,
                                  grad_lse=torch.zeros(1, 2, 3, device=META)),
    ),
]


def _adamw_args(**overrides):
    p = torch.randn(4)
    args = {
        "params": [p],
        "grads": [torch.randn(4)],
        "exp_avgs": [torch.zeros(4)],
        "exp_avg_sqs": [torch.zeros(4)],
        "max_exp_avg_sqs": [],
        "steps": [1.0],
        "lr": 1e-3,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
        "maximize": False,
    }
    args.update(overrides)
    return list(args.values())


ADAMW_CASES = [
    ("grads_count", ValueError, "'grads'", {"grads": []}),
    ("grads_shape", ValueError, "'grads[0]'", {"grads": [torch.randn(5)]}),
    ("grads_dtype", TypeError, "'grads[0]'", {"grads": [torch.randn(4, dtype=torch.float64)]}),
    ("grads_meta", ValueError, "'grads[0]'", {"grads": [torch.randn(4, device=META)]}),
    (
        "exp_avgs_dtype",
        TypeError,
        "'exp_avgs[0]'",
        {"exp_avgs": [torch.zeros(4, dtype=torch.float64)]},
    ),
    ("exp_avg_sqs_shape", ValueError, "'exp_avg_sqs[0]'", {"exp_avg_sqs": [torch.zeros(2, 2)]}),
    ("exp_avgs_non_contiguous", ValueError, "'exp_avgs[0]'", {"exp_avgs": [torch.zeros(8)[::2]]}),
    ("params_int", TypeError, "'params[0]'", {"params": [torch.ones(4, dtype=torch.int32)]}),
    ("params_non_contiguous", ValueError, "'params[0]'", {"params": [torch.randn(8)[::2]]}),
    (
        "max_sqs_without_amsgrad",
        ValueError,
        "'max_exp_avg_sqs'",
        {"max_exp_avg_sqs": [torch.zeros(4)]},
    ),
    ("max_sqs_missing_with_amsgrad", ValueError, "'max_exp_avg_sqs'", {"amsgrad": True}),
    ("steps_count", ValueError, "'steps'", {"steps": [1.0, 2.0]}),
    ("steps_zero", ValueError, "steps", {"steps": [0.0]}),
    ("lr_negative", ValueError, "'lr'", {"lr": -1.0}),
    ("beta1_one", ValueError, "'beta1'", {"beta1": 1.0}),
    ("beta2_negative", ValueError, "'beta2'", {"beta2": -0.1}),
    ("eps_negative", ValueError, "'eps'", {"eps": -1e-8}),
    ("weight_decay_negative", ValueError, "'weight_decay'", {"weight_decay": -0.1}),
]

EXT_CASES += [
    (f"adamw_{name}", exc, arg, lambda e, o=o: e.adamw_step(*_adamw_args(**o)))
    for name, exc, arg, o in ADAMW_CASES
]


@needs_ext
@pytest.mark.parametrize(
    ("exc", "argument", "call"), [c[1:] for c in EXT_CASES], ids=[c[0] for c in EXT_CASES]
)
def test_extension_entry_point_bad_input(call, argument, exc):
    # fusedlm._C is internal: a wrong Python type there gets pybind11's own message (the
    # signature, then the arguments' reprs), which names the argument but spans lines.
    _raises(exc, argument, call, _ext(), one_line=False)


@needs_ext
def test_extension_bad_input_leaves_tensors_untouched():
    """A rejected AdamW call updates nothing (checks run before any kernel)."""
    args = _adamw_args(exp_avg_sqs=[torch.zeros(5)])
    before = args[0][0].clone()
    with pytest.raises(ValueError):
        _ext().adamw_step(*args)
    assert torch.equal(args[0][0], before)


# ---- the public functions' quick checks agree with their full ones ------------------------------

def _qkv_variants():
    """(id, q, k, v): valid calls in several layouts and one bad call per check."""
    def qkv(Hq=4, Hkv=2, D=8, B=1):
        return [torch.randn(B, H, T, D) for H, T in ((Hq, 3), (Hkv, 5), (Hkv, 5))]

    def replace(index, tensor, base=None):
        tensors = base or qkv()
        tensors[index] = tensor
        return tensors

    return [
        ("valid", *qkv()),
        ("valid_mqa_d256", *qkv(Hkv=1, D=256)),
        ("valid_transposed", *(t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv())),
        ("valid_parameter", torch.nn.Parameter(torch.randn(1, 4, 3, 8)), *qkv()[1:]),
        ("valid_no_heads", *qkv(Hq=0, Hkv=0)),
        ("k_on_meta", *replace(1, torch.randn(1, 2, 5, 8, device=META))),
        ("v_on_meta", *replace(2, torch.randn(1, 2, 5, 8, device=META))),
        ("v_float64", *replace(2, torch.randn(1, 2, 5, 8, dtype=torch.float64))),
        ("int_q", *replace(0, torch.ones(1, 4, 3, 8, dtype=torch.int64))),
        ("sparse_k", *replace(1, torch.randn(1, 2, 5, 8).to_sparse())),
        ("q_3d", *replace(0, torch.randn(4, 3, 8))),
        ("k_5d", *replace(1, torch.randn(1, 2, 5, 8, 1))),
        ("v_shape", *replace(2, torch.randn(1, 2, 6, 8))),
        ("batch", *replace(0, torch.randn(2, 4, 3, 8))),
        ("head_dim_mismatch", *replace(0, torch.randn(1, 4, 3, 9))),
        ("head_dim_257", *qkv(D=257)),
        ("heads_3_on_2", *qkv(Hq=3)),
        ("no_kv_heads", *qkv(Hkv=0)),
    ]


def _outcome(check, *args):
    try:
        check(*args)
    except (TypeError, ValueError) as error:
        return type(error).__name__, str(error)
    return None


@pytest.mark.parametrize("case", _qkv_variants(), ids=lambda c: c[0])
def test_attention_quick_check_agrees_with_full_check(case):
    """fusedlm.attention's ~1 us check of the usual call passes exactly what the full checks
    pass (so no bad input gets by it to the kernels), and a bad call gets the full message."""
    ops = importlib.import_module("fusedlm.ops.attention")  # (the package exports a function)
    name, q, k, v = case
    full = _outcome(ops._check_qkv_in_full, q, k, v)
    assert _outcome(ops._check_qkv, q, k, v) == full
    assert (full is None) == name.startswith("valid")


def _norm_variants():
    """(id, x, normalized_shape, weight, bias): valid calls and one bad call per check."""
    x, w = torch.randn(3, 8), torch.randn(8)
    return [
        ("valid", x, 8, w, w.clone()),
        ("valid_tuple", x, (8,), None, None),
        ("valid_float32_params", x.double(), 8, w, w.clone()),
        ("valid_parameters", x, [8], torch.nn.Parameter(w), None),
        ("valid_2d_shape", x.view(3, 2, 4), (2, 4), w.view(2, 4), None),
        ("weight_on_meta", x, 8, w.to(META), None),
        ("bias_on_meta", x, 8, None, w.to(META)),
        ("weight_shape", x, 8, torch.randn(7), None),
        ("weight_2d", x, 8, w.view(1, 8), None),
        ("weight_float16", x, 8, w.half(), None),
        ("weight_int", x, 8, torch.ones(8, dtype=torch.int64), None),
        ("bias_dtype_differs", x.half(), 8, w, w.half()),
        ("sparse_weight", x, 8, w.to_sparse(), None),
        ("shape_mismatch", x, 7, None, None),
        ("shape_bool", x, True, None, None),
        ("shape_negative", x, -8, None, None),
        ("x_int", torch.ones(3, 8, dtype=torch.int64), 8, None, None),
        ("x_scalar", torch.tensor(1.0), 1, None, None),
    ]


@pytest.mark.parametrize("case", _norm_variants(), ids=lambda c: c[0])
def test_norm_quick_check_agrees_with_full_check(case):
    """The norms' quick check of the usual call passes exactly what the full checks pass."""
    ops = importlib.import_module("fusedlm.ops.norm")
    name, x, shape, weight, bias = case
    full = _outcome(ops._check_norm_args_in_full, x, shape, weight, bias)
    assert _outcome(ops._check_norm_args, x, shape, weight, bias) == full
    assert (full is None) == name.startswith("valid")
