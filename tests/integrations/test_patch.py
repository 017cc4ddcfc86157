"""fusedlm.patch / fusedlm.unpatch on a plain torch.nn.Module (no transformers needed)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import fusedlm
from fusedlm.backends import OpDispatch
from tests.helpers import assert_close_rule
from tests.helpers import needs_cpu_backend as needs_cpu


class ScaleNorm(torch.nn.Module):
    """Has the shape of an RMSNorm (1-D weight, eps) but is not one: the probe must refuse it."""

    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return x * self.weight / (x.abs().amax(-1, keepdim=True) + self.eps)


class Net(torch.nn.Module):
    def __init__(self, n=24):
        super().__init__()
        self.inp = torch.nn.Linear(n, n)
        self.ln = torch.nn.LayerNorm(n)
        self.ln_nobias = torch.nn.LayerNorm(n, bias=False)
        self.rms = torch.nn.RMSNorm(n, eps=1e-6)
        self.shared = torch.nn.RMSNorm(n)
        self.blocks = torch.nn.ModuleList([self.shared, torch.nn.Linear(n, n), self.shared])
        self.group = torch.nn.GroupNorm(4, n)
        self.scale = ScaleNorm(n)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() == 1:
                    p.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.ln_nobias(self.ln(self.inp(x)))
        x = self.rms(x)
        for block in self.blocks:
            x = block(x)
        x = self.group(x.transpose(1, 2)).transpose(1, 2)
        return self.scale(x)


@needs_cpu
def test_patch_unpatch_round_trip():
    model = Net()
    truth, same = copy.deepcopy(model).double(), copy.deepcopy(model)
    params_before = dict(model.named_parameters())
    keys_before = list(model.state_dict())

    report = fusedlm.patch(model)
    swapped = {s.name for s in report.swapped}
    assert swapped == {"ln", "ln_nobias", "rms", "shared"}, report
    left = {m.name: m.reason for m in report.left}
    assert set(left) == {"group", "scale"}  # reported as norm-like, not swapped
    assert type(model.ln) is fusedlm.nn.LayerNorm and type(model.ln_nobias) is fusedlm.nn.LayerNorm
    assert type(model.rms) is fusedlm.nn.RMSNorm
    assert model.blocks[0] is model.blocks[2] is model.shared  # sharing is kept
    assert type(model.group) is torch.nn.GroupNorm
    for name, p in model.named_parameters():
        assert p is params_before[name], name
    assert list(model.state_dict()) == keys_before
    assert "fusedlm" in str(report)

    x = torch.randn(3, 7, 24)
    xt, xs = x.double().requires_grad_(), x.clone().requires_grad_()
    x.requires_grad_()
    OpDispatch.last_choice.clear()
    out, out_same, out_truth = model(x), same(xs), truth(xt)
    assert OpDispatch.last_choice["layer_norm_fwd"] == "cpu"
    assert OpDispatch.last_choice["rms_norm_fwd"] == "cpu"
    assert_close_rule(out, out_same, out_truth)
    grad = torch.randn_like(out)
    for y in (out, out_same, out_truth):
        y.backward(grad.to(y.dtype))
    assert_close_rule(x.grad, xs.grad, xt.grad, name="dx")
    params_same, params_truth = dict(same.named_parameters()), dict(truth.named_parameters())
    for name, p in model.named_parameters():
        assert_close_rule(p.grad, params_same[name].grad, params_truth[name].grad, name=name)

    assert fusedlm.patch(model).swapped == []  # patching twice is a no-op
    restored = fusedlm.unpatch(model)
    assert len(restored.swapped) == 4
    assert type(model.ln) is torch.nn.LayerNorm and type(model.rms) is torch.nn.RMSNorm
    assert model.blocks[0] is model.blocks[2] is model.shared
    assert type(model.shared) is torch.nn.RMSNorm
    for name, p in model.named_parameters():
        assert p is params_before[name], name
    assert not any("fusedlm" in k or "backend" in vars(m) for m in model.modules() for k in vars(m))
    with torch.no_grad():
        torch.testing.assert_close(model(x), same(x), rtol=0, atol=0)


@needs_cpu
def test_patch_swaps_in_place():
    """The module objects themselves change class: references held outside ``_modules`` (a
    plain list, the caller's variable) see fusedlm's modules, and unpatch turns them back."""

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(8)
            self.by_hand = [self.ln]  # a plain list: not registered, still the same object

        def forward(self, x):
            return self.by_hand[0](x)

    model = Holder()
    ln = model.ln
    report = fusedlm.patch(model)
    assert [s.name for s in report.swapped] == ["ln"]
    assert model.ln is ln and model.by_hand[0] is ln and type(ln) is fusedlm.nn.LayerNorm
    OpDispatch.last_choice.clear()
    model(torch.randn(2, 8))
    assert OpDispatch.last_choice["layer_norm_fwd"] == "cpu"
    fusedlm.unpatch(model)
    assert model.ln is ln and type(ln) is torch.nn.LayerNorm
    assert not any("fusedlm" in k or k == "backend" for k in vars(ln))

    root = torch.nn.LayerNorm(8)  # the root module is swapped too
    report = fusedlm.patch(root)
    assert [s.name for s in report.swapped] == [""] and type(root) is fusedlm.nn.LayerNorm
    fusedlm.unpatch(root)
    assert type(root) is torch.nn.LayerNorm


def test_patch_leaves_a_class_with_another_layout():
    class SlottedLayerNorm(torch.nn.LayerNorm):  # __slots__: its class cannot change in place
        __slots__ = ("tag",)

    model = torch.nn.Sequential(SlottedLayerNorm(8))
    report = fusedlm.patch(model)
    assert not report.swapped and type(model[0]) is SlottedLayerNorm
    assert "cannot change in place" in report.left[0].reason, report
    assert "_fusedlm_restore" not in vars(model[0]) and "backend" not in vars(model[0])


@needs_cpu
def test_patch_custom_rmsnorm_probe():
    class MyRMSNorm(torch.nn.Module):
        def __init__(self, n, eps=1e-5):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(n) + 0.5)
            self.variance_epsilon = eps

        def forward(self, x):
            var = x.float().pow(2).mean(-1, keepdim=True)
            return self.weight * (x.float() * torch.rsqrt(var + self.variance_epsilon)).to(x.dtype)

    class WrongEps(MyRMSNorm):
        def forward(self, x):  # ignores its eps: the small-scale probe must notice
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-2)

    model = torch.nn.Sequential(MyRMSNorm(16), WrongEps(16), ScaleNorm(16))
    same = copy.deepcopy(model)
    report = fusedlm.patch(model, custom_rmsnorm=True)
    assert [s.name for s in report.swapped] == ["0"]
    assert {m.name for m in report.left} == {"1", "2"}
    assert "probe" in str(report)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), same(x))
    assert list(model.state_dict()) == list(same.state_dict())
    fusedlm.unpatch(model)
    assert type(model[0]) is MyRMSNorm


@needs_cpu
def test_patch_custom_layernorm_probe():
    class WeightOnlyLayerNorm(torch.nn.Module):  # as CohereLayerNorm: mean removed, no bias
        def __init__(self, n, eps=1e-5):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(n) + 0.5)
            self.variance_epsilon = eps

        def forward(self, x):
            x32 = x.float()
            centered = x32 - x32.mean(-1, keepdim=True)
            var = centered.pow(2).mean(-1, keepdim=True)
            return (self.weight * centered * torch.rsqrt(var + self.variance_epsilon)).to(x.dtype)

    class AffineLayerNorm(torch.nn.Module):  # as DebertaLayerNorm: weight and bias
        def __init__(self, n, eps=1e-6):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(n) + 0.5)
            self.bias = torch.nn.Parameter(torch.randn(n))
            self.eps = eps

        def forward(self, x):
            mean = x.mean(-1, keepdim=True)
            var = (x - mean).pow(2).mean(-1, keepdim=True)
            return self.weight * (x - mean) / torch.sqrt(var + self.eps) + self.bias

    class NoMeanNorm(AffineLayerNorm):  # an RMSNorm with a bias: neither kind
        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) \
                + self.bias

    model = torch.nn.Sequential(WeightOnlyLayerNorm(16), AffineLayerNorm(16), NoMeanNorm(16),
                                ScaleNorm(16))
    same = copy.deepcopy(model)
    assert not fusedlm.patch(copy.deepcopy(model), custom_rmsnorm=True).swapped
    report = fusedlm.patch(model, custom_layernorm=True)
    assert [s.name for s in report.swapped] == ["0", "1"]
    assert {m.name for m in report.left} == {"2", "3"}
    assert "layer_norm(x) * weight + bias" in str(report)
    assert all(type(m).__name__ == "ModelLayerNorm" for m in model[:2])
    x = torch.randn(4, 16) * 3 + 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), same(x))
    assert list(model.state_dict()) == list(same.state_dict())
    fusedlm.unpatch(model)
    assert [type(m) for m in model[:2]] == [WeightOnlyLayerNorm, AffineLayerNorm]


@needs_cpu
def test_patch_probes_torch_norm_subclasses_with_their_own_forward():
    class LayerNorm1P(torch.nn.LayerNorm):  # as Nemotron's: (1 + weight), computed in float32
        def forward(self, x):
            return F.layer_norm(x.float(), self.normalized_shape, self.weight.float() + 1,
                                self.bias.float(), self.eps).to(x.dtype)

    class HalfEpsRMSNorm(torch.nn.RMSNorm):  # its own forward, and not an RMSNorm of its eps
        def forward(self, x):
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps * 100)

    class Fp32LayerNorm(torch.nn.LayerNorm):  # as fairseq's: computes in float32, no offset
        def forward(self, x):
            return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                                self.bias.float(), self.eps).to(x.dtype)

    model = torch.nn.Sequential(LayerNorm1P(16), HalfEpsRMSNorm(16, eps=1e-3),
                                Fp32LayerNorm(16))
    _randomize(model)
    same = copy.deepcopy(model)
    plain = fusedlm.patch(copy.deepcopy(model))  # torch's classes only: all three left alone
    assert not plain.swapped
    assert all("with its own forward" in left.reason for left in plain.left), plain
    report = fusedlm.patch(model, custom_rmsnorm=True, custom_layernorm=True)
    assert [s.name for s in report.swapped] == ["0", "2"], report
    assert "Nemotron-style" in report.swapped[0].note
    assert [m.name for m in report.left] == ["1"] and "eps=0.001" in report.left[0].reason
    assert (model[0].offset, model[2].offset) == (1.0, 0.0)
    x = torch.randn(4, 16) * 2 + 1
    OpDispatch.last_choice.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(x), same(x))
    assert OpDispatch.last_choice["layer_norm_fwd"] == "cpu"
    fusedlm.unpatch(model)
    assert [type(m) for m in model] == [LayerNorm1P, HalfEpsRMSNorm, Fp32LayerNorm]


@needs_cpu
def test_patch_probes_norms_without_parameters():
    class OlmoLikeLayerNorm(torch.nn.Module):  # no parameters, no eps attribute
        def __init__(self, n):
            super().__init__()
            self.normalized_shape = (n,)

        def forward(self, x):
            return F.layer_norm(x.float(), self.normalized_shape, None, None, 1e-5).to(x.dtype)

    class PlainRMSNorm(torch.nn.Module):  # an int width and an eps attribute
        def __init__(self, n, eps=1e-6):
            super().__init__()
            self.normalized_shape, self.eps = n, eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    class OddEpsNorm(OlmoLikeLayerNorm):  # an eps that is none of the probe's candidates
        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, None, None, 1e-3)

    model = torch.nn.Sequential(OlmoLikeLayerNorm(16), PlainRMSNorm(16), OddEpsNorm(16))
    same = copy.deepcopy(model)
    report = fusedlm.patch(model, custom_rmsnorm=True, custom_layernorm=True)
    assert [s.name for s in report.swapped] == ["0", "1"], report
    assert "eps 1e-05 found by the probe" in report.swapped[0].note
    assert "found by the probe" not in report.swapped[1].note  # its own eps attribute
    assert [m.name for m in report.left] == ["2"] and "none of eps" in report.left[0].reason
    assert type(model[0]).__name__ == "ModelLayerNorm"
    assert type(model[1]).__name__ == "ModelRMSNorm"
    assert model[0].probed_dtypes == (torch.float32, torch.bfloat16, torch.float16)
    assert list(model.state_dict()) == []
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(3, 5, 16) * 2 + 1).to(dtype)
        OpDispatch.last_choice.clear()
        with torch.no_grad():
            out, want = model[:2](x), same[:2](x)
        assert OpDispatch.last_choice["layer_norm_fwd"] == "cpu"
        assert OpDispatch.last_choice["rms_norm_fwd"] == "cpu"
        tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    x64 = torch.randn(2, 16, dtype=torch.float64)  # a dtype the probe did not check
    OpDispatch.last_choice.clear()
    torch.testing.assert_close(model[0](x64), same[0](x64), rtol=0, atol=0)
    assert "layer_norm_fwd" not in OpDispatch.last_choice
    fusedlm.unpatch(model)
    assert [type(m) for m in model] == [OlmoLikeLayerNorm, PlainRMSNorm, OddEpsNorm]
    assert model[0].normalized_shape == (16,) and model[1].normalized_shape == 16


def _randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5)


def test_patch_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        fusedlm.patch(object())
    with pytest.raises(ValueError, match="backend"):
        fusedlm.patch(torch.nn.Sequential(torch.nn.LayerNorm(4)), backend="gpu")


def test_import_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, fusedlm; fusedlm.patch; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- gated MLPs -----------------------------------------------------------------------------


class _GatedMLP(torch.nn.Module):
    """A model's own gated MLP, as Llama's (and with a gelu ``act``, Gemma's) is written (``act``
    swappable, extra children)."""

    def __init__(self, hidden=24, width=40, bias=False, act=None, extra=None):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, width, bias=bias)
        self.up_proj = torch.nn.Linear(hidden, width, bias=bias)
        self.down_proj = torch.nn.Linear(width, hidden, bias=bias)
        self.act_fn = torch.nn.SiLU() if act is None else act
        if extra is not None:
            self.extra = extra

    def forward(self, x):
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        if hasattr(self, "extra"):
            h = self.extra(h)
        return self.down_proj(h)


class _UpFirstMLP(_GatedMLP):
    """The activation on the wrong projection: not a GLU as fusedlm computes it."""

    def forward(self, x):
        return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))


class _Lambda(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _GemmaGeluTanh(torch.nn.Module):
    """Hugging Face's ``gelu_pytorch_tanh`` written out (its python fallback): the tanh
    approximation computed another way, which the probe matches to float64 rounding."""

    def forward(self, x):
        return x * 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi)
                                           * (x + 0.044715 * torch.pow(x, 3.0))))


# act module -> (op dispatched, replacement class, report note)
GATED_ACTIVATIONS = {
    "silu": (torch.nn.SiLU, "ModelSwiGLUMLP", "silu(gate) * up on fusedlm.swiglu"),
    "gelu": (torch.nn.GELU, "ModelGeGLUMLP", "gelu(gate) * up on fusedlm.geglu"),
    "gelu_tanh": (lambda: torch.nn.GELU(approximate="tanh"), "ModelGeGLUMLP",
                  "gelu(gate, approximate='tanh') * up on fusedlm.geglu"),
    "gelu_tanh_written_out": (_GemmaGeluTanh, "ModelGeGLUMLP",
                              "gelu(gate, approximate='tanh') * up on fusedlm.geglu"),
}


@needs_cpu
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", list(GATED_ACTIVATIONS))
def test_patch_mlp_swaps_glu_mlps_and_matches(act, bias):
    make_act, replacement, note = GATED_ACTIVATIONS[act]
    torch.manual_seed(0)
    model = torch.nn.Sequential(_GatedMLP(bias=bias, act=make_act()), torch.nn.ReLU(),
                                _GatedMLP(bias=bias, act=make_act()))
    same, truth = copy.deepcopy(model), copy.deepcopy(model).double()
    keys = list(model.state_dict())
    assert not fusedlm.patch(model).swapped  # opt-in for plain models
    report = fusedlm.patch(model, mlp=True)
    assert [(s.name, s.note) for s in report.swapped] == [("0", note), ("2", note)]
    assert type(model[0]).__name__ == replacement
    cls = fusedlm.nn.SwiGLUMLP if act == "silu" else fusedlm.nn.GeGLUMLP
    assert isinstance(model[0], cls)
    if act != "silu":
        assert model[0].approximate == ("none" if act == "gelu" else "tanh")
    assert list(model.state_dict()) == keys
    x = 2 * torch.randn(3, 5, 24, dtype=torch.float64)
    OpDispatch.last_choice.clear()
    outs = [m(x.to(dtype)) for m, dtype in ((model, torch.float32), (same, torch.float32),
                                            (truth, torch.float64))]
    assert OpDispatch.last_choice["glu_fwd"] == "cpu"
    assert_close_rule(outs[0], outs[1], outs[2], name="output")
    for out in outs:
        out.square().sum().backward()
    assert OpDispatch.last_choice["glu_bwd"] == "cpu"
    truth_params, same_params = dict(truth.named_parameters()), dict(same.named_parameters())
    for name, p in model.named_parameters():
        assert_close_rule(p.grad, same_params[name].grad, truth_params[name].grad, name=name)
    fusedlm.unpatch(model)
    assert type(model[0]) is _GatedMLP and not fusedlm.patch(model).swapped
    assert not any("approximate" in m.__dict__ or "_fusedlm" in "".join(m.__dict__)
                   for m in model if isinstance(m, _GatedMLP))


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


@pytest.mark.parametrize(
    "module, reason",
    [
        (_GatedMLP(act=_Lambda(_quick_gelu)), "not down_proj(act(gate) * up) with act silu, gelu"),
        (_GatedMLP(act=_Lambda(lambda x: F.relu(x).square())), "with act silu, gelu or gelu("),
        (_GatedMLP(act=torch.nn.GELU(approximate="tanh")).double(), None),
        (_GatedMLP(act=torch.nn.Tanh()), "probe relative errors silu "),
        (_UpFirstMLP(), "its forward is not down_proj(act(gate) * up)"),
        (_UpFirstMLP(act=torch.nn.GELU()), "its forward is not down_proj(act(gate) * up)"),
        (_GatedMLP(extra=torch.nn.Dropout(0.1)), "submodules besides its projections"),
        (_GatedMLP(extra=torch.nn.LayerNorm(40)), "submodules besides its projections"),
        (_GatedMLP(extra=torch.nn.Identity()), "submodules besides its projections"),
    ],
    ids=["quick-gelu", "relu-squared", "float64-gelu-tanh-is-taken", "tanh", "activation-on-up",
         "gelu-on-up", "dropout", "norm-inside", "two-extra-children"],
)
def test_patch_mlp_leaves_other_mlps_alone(module, reason):
    """Activations other than silu, gelu and tanh-gelu (quick-gelu x sigmoid(1.702 x), relu^2,
    tanh), the activation on the other projection, or more children: left alone with a
    reason. (A float64 module is probed and swapped all the same.)"""
    original = type(module)
    report = fusedlm.patch(module, mlp=True)
    if reason is None:
        assert [s.name for s in report.swapped] == [""], report
        assert type(module).__name__ == "ModelGeGLUMLP"
        return
    assert not [s for s in report.swapped if s.name == ""]
    left = [m for m in report.left if m.name == ""]
    assert len(left) == 1 and reason in left[0].reason, report
    assert type(module) is original


def test_patch_mlp_shapes_parameters_and_meta_device():
    mismatched = _GatedMLP()
    mismatched.down_proj = torch.nn.Linear(24, 24)
    own_parameter = _GatedMLP()
    own_parameter.scale = torch.nn.Parameter(torch.ones(1))
    with torch.device("meta"):
        on_meta = _GatedMLP()
    for module, reason in ((mismatched, "shapes do not chain"),
                           (own_parameter, "parameters of its own"),
                           (on_meta, "meta device")):
        report = fusedlm.patch(module, mlp=True)
        assert [m.reason for m in report.left if m.name == ""][0].count(reason) == 1, report
        assert not report.swapped
    for already in (fusedlm.nn.SwiGLUMLP(8, 12), fusedlm.nn.GeGLUMLP(8, 12)):
        assert [m.reason for m in fusedlm.patch(already, mlp=True).left] == [
            "already a fusedlm module"]
    with pytest.raises(TypeError, match="argument 'mlp' must be a bool"):
        fusedlm.patch(torch.nn.Linear(2, 2), mlp=1)
