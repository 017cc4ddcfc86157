"""Swap the norm layers of any ``torch.nn.Module`` for fusedlm's, in place, and back.

``patch(model)`` turns every ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` (and subclasses
that keep torch's ``forward``) into a ``fusedlm.nn.LayerNorm`` / ``fusedlm.nn.RMSNorm``: the
module object itself changes class, in place, so every reference to it, its parameter
tensors, ``state_dict`` keys, hooks, optimizer state and weight tying are untouched.
``unpatch(model)`` turns the objects back into their original classes.

With ``custom_rmsnorm=True`` (what ``fusedlm.integrations.transformers.apply`` uses) it also
swaps a model's own RMSNorm classes (``LlamaRMSNorm``, ``GemmaRMSNorm``, ...): modules with one
1-D ``weight`` parameter, no bias, no children and an ``eps`` / ``variance_epsilon`` attribute,
whose ``forward`` a numeric probe shows to be ``rms_norm(x) * weight`` or, Gemma-style,
``rms_norm(x) * (1 + weight)``. ``custom_layernorm=True`` (also used by ``apply``) does the same
for a model's own LayerNorm classes (``CohereLayerNorm``, ``DebertaLayerNorm``, ...): a 1-D
``weight`` and optionally a 1-D ``bias``, probed to be ``layer_norm(x) * weight (+ bias)`` or,
Nemotron-style, ``layer_norm(x) * (1 + weight) (+ bias)``. With these flags, subclasses of
torch's classes that have their own ``forward`` (``NemotronLayerNorm1P``) go through the same
probe, and so do norms without parameters that hold a one-dimensional ``normalized_shape``
(``OlmoLayerNorm``; without an ``eps`` attribute the probe tries 1e-5, 1e-6, 1e-8 and 1e-12).
Anything else is left alone, and the report says why. ``attention=True`` also routes the
model's attention (``fusedlm.integrations.sdpa_mode``). ``mlp=True`` (also used by ``apply``)
swaps gated MLPs whose children are ``gate_proj``, ``up_proj`` and ``down_proj`` linears (or
Phi-3's fused ``gate_up_proj`` and ``down_proj``) and at most one parameter-free activation,
when a numeric probe shows their ``forward`` to be ``down_proj(act(gate) * up)`` with act silu
(SwiGLU: Llama, Qwen, Mistral, ...), exact gelu or tanh-approximated gelu (GeGLU: Gemma 1, 2 and
3's ``gelu_pytorch_tanh``): their activation then runs on ``fusedlm.swiglu`` /
``fusedlm.geglu``. Other activations (relu^2, quick-gelu's ``x * sigmoid(1.702 x)``, ...) are
left alone, and the report says why. ``mlp=True`` also swaps a mixture of experts' experts
modules (classes with transformers' ``_apply_gate`` hook: 3-D ``gate_up_proj`` weights, gate
and up concatenated) whose ``_apply_gate`` a probe shows to be ``act(gate) * up``: the hook,
which transformers' ``grouped_mm`` and ``batched_mm`` experts implementations call, then runs
on ``fusedlm.swiglu`` / ``fusedlm.geglu``.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import check_backend_name
from ..nn.mlp import GeGLUMLP, SwiGLUMLP
from ..nn.multihead_attention import MultiheadAttention
from ..nn.norm import LayerNorm, RMSNorm
from ..ops.glu import geglu, swiglu
from ..ops.norm import layer_norm, rms_norm
from .sdpa_mode import route_attention, unroute_attention

# The __dict__ key under which a swapped module remembers how to undo the swap:
# (original class, keys the swap added, {key: original value} for keys it overwrote).
_RESTORE_KEY = "_fusedlm_restore"
# Set on a transformers model by apply(): the attention implementation it had before.
ATTN_PREVIOUS_KEY = "_fusedlm_attn_previous"
# A transformers model's own ``_loss_function`` (None: it had none) before ``apply``'s swap.
LOSS_PREVIOUS_KEY = "_fusedlm_loss_previous"


@dataclass
class Swap:
    name: str
    original: str
    replacement: str
    note: str = ""


@dataclass
class LeftAlone:
    name: str
    cls: str
    reason: str


@dataclass
class PatchReport:
    """What ``patch`` / ``apply`` did: ``swapped`` modules, modules ``left`` alone and why, and
    free-form ``notes`` (e.g. which attention implementation a model now uses)."""

    swapped: list[Swap] = field(default_factory=list)
    left: list[LeftAlone] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fusedlm: swapped {len(self.swapped)} module(s), left {len(self.left)} alone"]
        lines += [f"  swapped {s.name}: {s.original} -> {s.replacement}"
                  + (f" ({s.note})" if s.note else "") for s in self.swapped]
        lines += [f"  left    {m.name}: {m.cls}: {m.reason}" for m in self.left]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---- replacement modules --------------------------------------------------------------------


class ModelRMSNorm(RMSNorm):
    """Stands in for a model's own RMSNorm class (found by :func:`patch`'s probe): same
    parameter objects, same ``state_dict`` keys, and the original module's attributes.

    ``offset`` is 0 for ``x_hat * weight`` and 1 for Gemma's ``x_hat * (1 + weight)`` (computed
    in float32 on the fly; the stored parameter is unchanged). Inputs whose dtype differs from
    the weight's (for a norm without weight: a dtype the probe did not check) run the original
    class's ``forward``."""

    offset: float = 0.0
    probed_dtypes: tuple = ()  # a norm without weight: the input dtypes the probe passed

    def forward(self, x: Tensor) -> Tensor:
        probed, weight = _probed_weight(self, x)
        if not probed:
            return self.__dict__[_RESTORE_KEY][0].forward(self, x)
        return rms_norm(x, self.normalized_shape, weight, self.eps, self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", offset={self.offset}" if self.offset else "")


class ModelLayerNorm(LayerNorm):
    """Stands in for a model's own LayerNorm class (found by :func:`patch`'s probe):
    ``layer_norm(x) * (offset + weight) (+ bias)``, or no affine part at all (OLMo's), with the
    same parameter objects, ``state_dict`` keys and attributes. ``offset`` is 0, or 1 for
    Nemotron's ``LayerNorm1P``. Inputs whose dtype differs from the weight's (for a norm without
    weight: a dtype the probe did not check) run the original class's ``forward``."""

    offset: float = 0.0
    probed_dtypes: tuple = ()

    def forward(self, x: Tensor) -> Tensor:
        probed, weight = _probed_weight(self, x)
        if not probed:
            return self.__dict__[_RESTORE_KEY][0].forward(self, x)
        bias = self._parameters.get("bias")  # absent, not None, on e.g. CohereLayerNorm
        return layer_norm(x, self.normalized_shape, weight, bias, self.eps, self.backend)

    def extra_repr(self) -> str:
        bias = self._parameters.get("bias") is not None
        return (f"{self.normalized_shape}, eps={self.eps}, bias={bias}"
                + (f", offset={self.offset}" if self.offset else ""))


class _ModelGatedMLP:
    """The forward of a model's own gated MLP class found by :func:`patch`'s probe: the same
    submodules, ``state_dict`` keys and attributes, with the activation on the fusedlm class's
    ``_activate``. ``gate_up`` is True for Phi-3's fused ``gate_up_proj`` (gate first, then up,
    along its output; read in place)."""

    gate_up: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self._activate(gate, up))


class ModelSwiGLUMLP(_ModelGatedMLP, SwiGLUMLP):
    """Stands in for a model's own SwiGLU MLP class (``LlamaMLP``, ``Qwen3MLP``, ``Phi3MLP``,
    ...): its activation on ``fusedlm.swiglu``."""


class ModelGeGLUMLP(_ModelGatedMLP, GeGLUMLP):
    """Stands in for a model's own GeGLU MLP class (``GemmaMLP``, ``Gemma2MLP``, ...): its
    activation on ``fusedlm.geglu`` with the ``approximate`` the probe found."""


class _ModelExpertsGate:
    """Mixed into a mixture of experts' own experts class (transformers' ``MixtralExperts``,
    ``Qwen3MoeExperts``, ...: 3-D ``gate_up_proj`` weights run by an experts implementation):
    its ``_apply_gate``, which the ``grouped_mm`` and ``batched_mm`` implementations call on
    the (S, 2 I) gate-and-up projections of the S routed tokens, on ``fusedlm.swiglu`` /
    ``fusedlm.geglu``. Its weights, forward and ``state_dict`` are untouched."""

    activation: str = "silu"
    approximate: str = "none"

    def _apply_gate(self, gate_up_out: Tensor) -> Tensor:
        gate, up = gate_up_out.chunk(2, dim=-1)  # (S, I) each: gate first, as concatenated
        if self.activation == "silu":
            return swiglu(gate, up, self.backend)
        return geglu(gate, up, self.approximate, self.backend)

    def __reduce_ex__(self, protocol):
        # The class is made per experts class (below), so pickle cannot find it by name:
        # rebuild it from the experts class, which it can (torch.save(model), deepcopy).
        return _new_experts_object, (type(self).__bases__[1],), self.__dict__


@functools.cache
def _experts_class(original: type) -> type:
    """The swapped class of one experts class (made once, so repeated swaps share it)."""
    return type(original.__name__, (_ModelExpertsGate, original),
                {"__module__": __name__, "__qualname__": f"ModelExpertsGate[{original.__name__}]"})


def _new_experts_object(original: type) -> torch.nn.Module:
    """An empty object of _experts_class(original), for pickle to fill with its state."""
    cls = _experts_class(original)
    return cls.__new__(cls)


def _probed_weight(module: torch.nn.Module, x: Tensor) -> tuple[bool, Tensor | None]:
    """(whether ``x`` is an input the probe vouched for, the weight with the module's offset
    added). The probe checked inputs of the weight's dtype, or for a norm without weight the
    dtypes in ``probed_dtypes``."""
    weight = module._parameters.get("weight")
    if not isinstance(x, Tensor) or x.dim() == 0:
        return False, weight
    if weight is None:
        return x.dtype in module.probed_dtypes, None
    if x.dtype != weight.dtype:
        return False, weight
    return True, (weight.float() + module.offset) if module.offset else weight


class _LayoutError(TypeError):
    """A module whose class cannot be changed in place (``__slots__``, a C layout)."""


def _swap_object(module: torch.nn.Module, new_cls: type, attrs: dict) -> torch.nn.Module:
    """Turn ``module`` itself into a ``new_cls`` object, with ``attrs`` (which hold ``backend``)
    set on top, remembering how to turn back. In place: the object keeps its identity, so every
    reference to it (parents, lists of modules outside ``_modules``, the caller's variables,
    hooks, optimizers) sees the swap. Raises _LayoutError if the class layouts differ."""
    original_cls = type(module)
    try:
        module.__class__ = new_cls  # first: a layout error leaves the module untouched
    except TypeError as exc:
        raise _LayoutError(str(exc)) from exc
    state = module.__dict__
    added = tuple(k for k in attrs if k not in state)
    overwritten = {k: state[k] for k in attrs if k in state}
    state.update(attrs)
    state[_RESTORE_KEY] = (original_cls, added, overwritten)
    return module


def _restore_object(module: torch.nn.Module) -> torch.nn.Module:
    """Undo _swap_object on ``module``, in place."""
    original_cls, added, overwritten = module.__dict__.pop(_RESTORE_KEY)
    for key in added:
        module.__dict__.pop(key, None)
    module.__dict__.update(overwritten)
    module.__class__ = original_cls
    return module


# ---- recognising norms ----------------------------------------------------------------------


def _qualname(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _own_forward(module: torch.nn.Module, base: type) -> bool:
    return type(module).forward is not base.forward


def _eps_of(module: torch.nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps"):
        value = module.__dict__.get(attr)
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


_PROBE_TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 4e-2}
# A norm without an eps attribute (OLMo's LayerNorm hard-codes 1e-5): the values the probe tries.
_EPS_CANDIDATES = (1e-5, 1e-6, 1e-8, 1e-12)
_KIND_FORMULAS = {"rms": "rms_norm(x) * weight", "rms+1": "rms_norm(x) * (1 + weight)",
                  "layer": "layer_norm(x) * weight", "layer+1": "layer_norm(x) * (1 + weight)"}


def _probe_norm(module: torch.nn.Module, weight: Tensor | None, bias: Tensor | None, eps: float,
                kinds: tuple[str, ...], n: int | None = None,
                dtype: torch.dtype | None = None) -> tuple[str | None, str]:
    """(kind, detail): the first of ``kinds`` that ``module(x)`` equals on random inputs and
    random parameters (put in with ``functional_call``, so the real ones are not touched):
    "rms" ``rms_norm(x) * weight``, "rms+1" ``rms_norm(x) * (1 + weight)`` (Gemma), "layer"
    ``layer_norm(x) * weight + bias`` (no bias term where the module has none), "layer+1"
    ``layer_norm(x) * (1 + weight) + bias`` (Nemotron); else (None, why not). A module without
    weight (``weight`` None) is probed on CPU inputs of width ``n`` and ``dtype``, without the
    weight term."""
    device = torch.device("cpu") if weight is None else weight.device
    dtype = weight.dtype if weight is not None else dtype
    n = weight.shape[0] if weight is not None else n
    if device.type == "meta":
        return None, "its parameters are on the meta device (cannot probe)"
    if dtype not in _PROBE_TOL:
        return None, f"weight dtype {dtype} is not a floating type fusedlm supports"
    gen = torch.Generator().manual_seed(0)
    probe = {}
    if weight is not None:
        probe["weight"] = (torch.rand(n, generator=gen) + 0.5).to(device, dtype)
    if bias is not None:
        probe["bias"] = torch.randn(n, generator=gen).to(bias.device, bias.dtype)
    tol = _PROBE_TOL[dtype]
    errors = dict.fromkeys(kinds, 0.0)
    try:
        with torch.no_grad():
            # A unit-scale input with an offset (a LayerNorm must remove the mean, an RMSNorm
            # must not), and one at the scale of eps, so a wrong eps shows.
            for scale in (1.0, math.sqrt(eps) if eps > 0 else 1e-3):
                x = torch.randn(2, 3, n, generator=gen, dtype=torch.float64) + 0.5
                x = (x * scale).to(device, dtype)
                y = torch.func.functional_call(module, probe, (x,))
                if not isinstance(y, Tensor) or y.shape != x.shape:
                    return None, "its forward does not return a tensor of the input's shape"
                y, x64 = y.double(), x.double()
                w64 = probe["weight"].double() if weight is not None else None
                b64 = probe["bias"].double() if bias is not None else None
                for kind in kinds:
                    w = w64 + 1.0 if kind.endswith("+1") else w64
                    if kind.startswith("layer"):
                        want = F.layer_norm(x64, (n,), w, b64, eps)
                    else:
                        want = F.rms_norm(x64, (n,), w, eps)
                    err = ((y - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
                    errors[kind] = max(errors[kind], err)
    except Exception as exc:  # a module whose forward needs more than one tensor, etc.
        return None, f"probing its forward raised {type(exc).__name__}: {exc}"
    for kind, err in errors.items():
        if err <= tol:
            return kind, f"probe error {err:.1e}"
    bias_term = " + bias" if bias is not None else ""
    formulas = [_KIND_FORMULAS[k] + (bias_term if k.startswith("layer") else "") for k in kinds]
    if weight is None:
        formulas = [f.split(" * ")[0] for f in formulas]
    return None, (f"its forward is not {' nor '.join(formulas)} with eps={eps:g} "
                  f"(probe relative errors {', '.join(f'{errors[k]:.1e}' for k in kinds)})")


def _probe_weightless(module: torch.nn.Module, n: int, eps: float | None,
                      kinds: tuple[str, ...]) -> tuple[str | None, str, float, tuple]:
    """A norm without parameters: (kind, detail, eps, input dtypes it matches). Its eps is the
    module's, or the first of _EPS_CANDIDATES the probe accepts."""
    detail = ""
    for candidate in (eps,) if eps is not None else _EPS_CANDIDATES:
        kind, detail = _probe_norm(module, None, None, candidate, kinds, n, torch.float32)
        if kind is None:
            continue
        dtypes = [torch.float32]
        for dtype in (torch.bfloat16, torch.float16):
            if _probe_norm(module, None, None, candidate, (kind,), n, dtype)[0] == kind:
                dtypes.append(dtype)
        found = "" if eps is not None else f"eps {candidate:g} found by the probe, "
        return kind, found + detail, candidate, tuple(dtypes)
    if eps is None:
        detail = ("no 'eps' attribute, and the probe matched none of eps = "
                  + ", ".join(f"{e:g}" for e in _EPS_CANDIDATES))
    return None, detail, 0.0, ()


def _looks_like_norm(module: torch.nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _normalized_width(module: torch.nn.Module) -> int | None:
    """The width of a parameter-free norm's ``normalized_shape`` attribute (an int or a 1-tuple),
    or None."""
    shape = module.__dict__.get("normalized_shape")
    if isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 1:
        shape = shape[0]
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool) and shape > 0:
        return int(shape)
    return None


def _replacement(module: torch.nn.Module, backend: str, custom_rmsnorm: bool,
                 custom_layernorm: bool = False):
    """(new module, note) or (None, reason it is left alone) or (None, None) if not a norm."""
    if _RESTORE_KEY in module.__dict__ or isinstance(module, (LayerNorm, RMSNorm)):
        return None, "already a fusedlm module"
    # torch's classes, and subclasses that keep their forward, are swapped without a probe;
    # subclasses with their own forward go to the probe when custom classes are asked for.
    kinds: tuple[str, ...]
    if isinstance(module, torch.nn.LayerNorm):
        if not _own_forward(module, torch.nn.LayerNorm):
            return _swap_object(module, LayerNorm, {"backend": backend}), ""
        if not custom_layernorm:
            return None, "subclass of torch.nn.LayerNorm with its own forward"
        kinds = ("layer", "layer+1")
    elif isinstance(module, torch.nn.RMSNorm):
        if not _own_forward(module, torch.nn.RMSNorm):
            return _swap_object(module, RMSNorm, {"backend": backend}), ""
        if not custom_rmsnorm:
            return None, "subclass of torch.nn.RMSNorm with its own forward"
        kinds = ("rms", "rms+1")
    elif not (custom_rmsnorm or custom_layernorm):
        if _looks_like_norm(module):
            return None, "not torch.nn.LayerNorm / torch.nn.RMSNorm"
        return None, None
    else:
        kinds = ((("rms", "rms+1") if custom_rmsnorm else ())
                 + (("layer", "layer+1") if custom_layernorm else ()))
    params = dict(module.named_parameters(recurse=False))
    eps = _eps_of(module)
    weight, bias = params.get("weight"), params.get("bias")
    if bias is not None:
        kinds = tuple(k for k in kinds if k.startswith("layer"))
    if not params and not module._modules and _normalized_width(module) is not None:
        return _weightless_replacement(module, backend, eps, kinds)
    shaped_like_norm = (
        set(params) in ({"weight"}, {"weight", "bias"}) and weight is not None
        and weight.dim() == 1 and (bias is None or bias.shape == weight.shape)
        and eps is not None and not module._modules
    )
    if not shaped_like_norm or not kinds:
        if _looks_like_norm(module):
            wanted = " or ".join(w for w, on in (("an RMSNorm", custom_rmsnorm),
                                                 ("a LayerNorm", custom_layernorm)) if on)
            return None, (f"not {wanted} by its parameters (needs a 1-D 'weight'"
                          + (", a bias of the same shape or none" if custom_layernorm
                             else ", no bias")
                          + ", an 'eps' or 'variance_epsilon' attribute, no submodules; or no "
                          "parameters and a one-dimensional 'normalized_shape')")
        return None, None
    kind, detail = _probe_norm(module, weight, bias, eps, kinds)
    if kind is None:
        return None, detail
    attrs = {"normalized_shape": (weight.shape[0],), "eps": eps, "elementwise_affine": True,
             "backend": backend, "offset": 1.0 if kind.endswith("+1") else 0.0}
    new = _swap_object(module, ModelLayerNorm if kind.startswith("layer") else ModelRMSNorm,
                       attrs)
    offset = ("weight offset 1 (" + ("Gemma" if kind == "rms+1" else "Nemotron")
              + "-style), " if kind.endswith("+1") else "")
    return new, offset + detail


def _weightless_replacement(module: torch.nn.Module, backend: str, eps: float | None,
                            kinds: tuple[str, ...]):
    """A parameter-free norm (OLMo's LayerNorm): probed without weight, on CPU inputs."""
    kinds = tuple(k for k in kinds if not k.endswith("+1"))
    n = _normalized_width(module)
    kind, detail, eps, dtypes = _probe_weightless(module, n, eps, kinds)
    if kind is None:
        return None, detail
    attrs = {"normalized_shape": (n,), "eps": eps, "elementwise_affine": False,
             "backend": backend, "probed_dtypes": dtypes}
    new = _swap_object(module, ModelLayerNorm if kind == "layer" else ModelRMSNorm, attrs)
    names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
    return new, f"no weight, {detail}; runs fusedlm's kernel for {names} inputs"


def _module_names(model: torch.nn.Module) -> dict[int, str]:
    """id(module) -> its first qualified name in ``model`` ("" for the root)."""
    names: dict[int, str] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), name)
    return names


def _swap_modules(model: torch.nn.Module, replacement, report: PatchReport) -> None:
    """Apply ``replacement`` (which swaps a module in place and returns it with a note, or
    returns None with why not, or (None, None) for a module it does not concern) to ``model``
    and each module below it, once per module object; report each decision."""
    names = _module_names(model)
    for module in list(model.modules()):
        original = _qualname(module)  # before the swap: the class changes in place
        try:
            new, why = replacement(module)
        except _LayoutError as exc:
            new, why = None, f"its class cannot change in place ({exc})"
        name = names.get(id(module), "")
        if new is not None:
            report.swapped.append(Swap(name, original, _qualname(new), why))
        elif why is not None:
            report.left.append(LeftAlone(name, original, why))


def swap_norms(model: torch.nn.Module, backend: str = "auto", custom_rmsnorm: bool = False,
               report: PatchReport | None = None,
               custom_layernorm: bool = False) -> PatchReport:
    """Replace norm modules of ``model`` in place; returns (or extends) the report."""
    check_backend_name(backend)
    report = PatchReport() if report is None else report
    _swap_modules(model, lambda m: _replacement(m, backend, custom_rmsnorm, custom_layernorm),
                  report)
    return report


# ---- recognising gated MLPs ------------------------------------------------------------------

# The linear children of a gated MLP: separate gate and up projections, or Phi-3's fused one.
_MLP_LAYOUTS = {False: ("gate_proj", "up_proj", "down_proj"), True: ("gate_up_proj", "down_proj")}


def _mlp_layout(module: torch.nn.Module) -> tuple[bool | None, str | None]:
    """(gate_up, None) for a module shaped like a gated MLP, (None, why not) for one with the
    projections but something else too, (None, None) for any other module."""
    children = dict(module.named_children())
    found = [gate_up for gate_up, names in _MLP_LAYOUTS.items()
             if all(isinstance(children.get(n), torch.nn.Linear) for n in names)]
    if not found:
        return None, None
    gate_up = found[0]
    names = _MLP_LAYOUTS[gate_up]
    others = [n for n in children if n not in names]
    if len(others) > 1 or any(isinstance(children[n], torch.nn.modules.dropout._DropoutNd)
                              or any(True for _ in children[n].parameters())
                              or any(True for _ in children[n].children()) for n in others):
        return None, ("it has submodules besides its projections and one parameter-free "
                      f"activation ({', '.join(others)})")
    if module._parameters:
        return None, "it has parameters of its own"
    if gate_up:
        fused, down = children["gate_up_proj"], children["down_proj"]
        chained = fused.out_features == 2 * down.in_features
    else:
        gate, up, down = (children[n] for n in names)
        chained = (gate.out_features == up.out_features == down.in_features
                   and gate.in_features == up.in_features)
    if not chained:
        return None, "its projections' shapes do not chain as a gated MLP's"
    return gate_up, None


# The gate activations the MLP probe tries, in order: (op activation, formula, fusedlm function,
# swap attributes, float64 function).
_MLP_ACTIVATIONS = (
    ("silu", "silu(gate)", "fusedlm.swiglu", {}, F.silu),
    ("gelu", "gelu(gate)", "fusedlm.geglu", {"approximate": "none"}, F.gelu),
    ("gelu_tanh", "gelu(gate, approximate='tanh')", "fusedlm.geglu", {"approximate": "tanh"},
     functools.partial(F.gelu, approximate="tanh")),
)


def _probe_mlp(module: torch.nn.Module, gate_up: bool) -> tuple[tuple | None, str]:
    """(the entry of _MLP_ACTIVATIONS whose act makes ``module(x)`` equal
    ``down_proj(act(gate) * up)`` on random inputs and random parameters (put in with
    ``functional_call``, in float64 where the device has it), the probe's error), or (None,
    why not)."""
    device = module.down_proj.weight.device
    if device.type == "meta":
        return None, "its parameters are on the meta device (cannot probe)"
    dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
    gen = torch.Generator().manual_seed(0)
    probe = {name: (torch.randn(p.shape, generator=gen, dtype=torch.float64)
                    / math.sqrt(p.shape[-1])).to(device, dtype)
             for name, p in module.named_parameters()}
    first = module.gate_up_proj if gate_up else module.gate_proj
    # gates ~ N(0, 4): the tails where exact and tanh-approximated gelu part (by up to 5e-4)
    x = 2 * torch.randn(2, 3, first.in_features, generator=gen, dtype=torch.float64)
    x = x.to(device, dtype)

    def linear(name, t):
        return F.linear(t, probe[f"{name}.weight"], probe.get(f"{name}.bias"))

    errors = {}
    try:
        with torch.no_grad():
            y = torch.func.functional_call(module, probe, (x,))
            if gate_up:
                gate, up = linear("gate_up_proj", x).chunk(2, dim=-1)
            else:
                gate, up = linear("gate_proj", x), linear("up_proj", x)
            for i, entry in enumerate(_MLP_ACTIVATIONS):
                want = linear("down_proj", entry[4](gate) * up)
                if not isinstance(y, Tensor) or y.shape != want.shape:
                    return None, "its forward does not return a tensor of the input's shape"
                errors[i] = ((y - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    except Exception as exc:  # a forward that needs more arguments, etc.
        return None, f"probing its forward raised {type(exc).__name__}: {exc}"
    return _closest_activation(errors, dtype, "its forward is not down_proj(act(gate) * up)")


def _closest_activation(errors: dict, dtype: torch.dtype, mismatch: str) -> tuple:
    """(the _MLP_ACTIVATIONS entry with the smallest probe error, a note), or (None, why not:
    ``mismatch`` and the errors) when even that one is past the probe's tolerance."""
    best = min(errors, key=errors.get)
    if errors[best] > _PROBE_TOL[dtype]:
        return None, (f"{mismatch} with act silu, gelu or gelu(approximate='tanh') (probe "
                      "relative errors " + ", ".join(f"{_MLP_ACTIVATIONS[i][0]} {err:.1e}"
                                                     for i, err in errors.items()) + ")")
    return _MLP_ACTIVATIONS[best], f"probe error {errors[best]:.1e}"


def _probe_experts_gate(module: torch.nn.Module) -> tuple[tuple | None, str]:
    """(the entry of _MLP_ACTIVATIONS whose act makes ``module._apply_gate(x)`` equal
    ``act(gate) * up`` for x = [gate, up] drawn at random, the probe's error), or (None, why
    not)."""
    weight = module._parameters.get("gate_up_proj")
    if not isinstance(weight, Tensor) or weight.dim() != 3:
        return None, "it has no 3-D gate_up_proj weight"
    if weight.device.type == "meta":
        return None, "its parameters are on the meta device (cannot probe)"
    width = weight.shape[2 if getattr(module, "is_transposed", False) else 1]  # 2 I
    dtype = torch.float64 if weight.device.type in ("cpu", "cuda") else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(5, width, generator=gen, dtype=torch.float64)).to(weight.device, dtype)
    gate, up = x.chunk(2, dim=-1)
    errors = {}
    try:
        with torch.no_grad():
            y = module._apply_gate(x)
            for i, entry in enumerate(_MLP_ACTIVATIONS):
                want = entry[4](gate) * up
                if not isinstance(y, Tensor) or y.shape != want.shape:
                    return None, "its _apply_gate does not return (S, I) from (S, 2 I)"
                errors[i] = ((y - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    except Exception as exc:
        return None, f"probing its _apply_gate raised {type(exc).__name__}: {exc}"
    return _closest_activation(errors, dtype,
                               "its _apply_gate is not act(gate) * up over [gate, up]")


def _experts_replacement(module: torch.nn.Module, backend: str):
    """Like _mlp_replacement, for a mixture of experts' experts module (one with transformers'
    ``_apply_gate`` hook)."""
    if isinstance(module, _ModelExpertsGate):
        return None, None
    # transformers < 5.3 has neither flag: every experts class then has a gate and
    # concatenates [gate, up], except those with an _apply_gate of their own (gpt-oss), which
    # the probe turns away.
    if not getattr(module, "has_gate", True):
        return None, "its experts have no gate (act(up) only)"
    if getattr(module, "is_concatenated", True) is not True:
        return None, "its gate and up projections are interleaved, not [gate, up]"
    found, why = _probe_experts_gate(module)
    if found is None:
        return None, why
    activation, formula, function, attrs, _ = found
    note = (f"experts' {formula} * up on {function} (under the grouped_mm and batched_mm "
            "experts implementations, which call _apply_gate; 'eager' runs its own loop)")
    return _swap_object(module, _experts_class(type(module)),
                        {"backend": backend, "activation": activation, **attrs}), note


def _mlp_replacement(module: torch.nn.Module, backend: str):
    """(new module, note) for a gated MLP the probe recognises, (None, why) for one it does not,
    (None, None) for anything else."""
    if callable(getattr(type(module), "_apply_gate", None)):
        return _experts_replacement(module, backend)
    if isinstance(module, (SwiGLUMLP, GeGLUMLP)):
        return (None, None) if _RESTORE_KEY in module.__dict__ else (
            None, "already a fusedlm module")
    gate_up, why = _mlp_layout(module)
    if gate_up is None:
        return None, why
    found, why = _probe_mlp(module, gate_up)
    if found is None:
        return None, why
    activation, formula, function, attrs, _ = found
    note = f"{formula} * up on {function}" + (" (fused gate_up_proj)" if gate_up else "")
    cls = ModelSwiGLUMLP if activation == "silu" else ModelGeGLUMLP
    return _swap_object(module, cls, {"backend": backend, "gate_up": gate_up, **attrs}), note


def swap_mlps(model: torch.nn.Module, backend: str = "auto",
              report: PatchReport | None = None) -> PatchReport:
    """Replace the gated MLPs of ``model`` in place (see the module docstring); returns (or
    extends) the report."""
    check_backend_name(backend)
    report = PatchReport() if report is None else report
    _swap_modules(model, lambda m: _mlp_replacement(m, backend), report)
    return report


def _attention_replacement(module: torch.nn.Module, backend: str):
    """(new module, note) for a ``torch.nn.MultiheadAttention``, (None, why) for a subclass
    with its own forward, (None, None) for anything else."""
    if not isinstance(module, torch.nn.MultiheadAttention) or _RESTORE_KEY in module.__dict__:
        return None, None
    if isinstance(module, MultiheadAttention):
        return None, "already a fusedlm module"
    if _own_forward(module, torch.nn.MultiheadAttention):
        return None, "subclass of torch.nn.MultiheadAttention with its own forward"
    return _swap_object(module, MultiheadAttention, {"backend": backend}), (
        "calls with need_weights=False run fusedlm's attention")


def patch(
    model: torch.nn.Module, backend: str = "auto", custom_rmsnorm: bool = False,
    custom_layernorm: bool = False, attention: bool = False, mlp: bool = False,
) -> PatchReport:
    """Turn every ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` in ``model`` (``model`` itself
    included) into a ``fusedlm.nn.LayerNorm`` / ``fusedlm.nn.RMSNorm``, in place: the objects
    change class and keep their identity and parameters.

    ``custom_rmsnorm=True`` / ``custom_layernorm=True`` also swap model-specific RMSNorm /
    LayerNorm classes recognised by their parameters and a numeric probe. ``attention=True``
    also swaps ``torch.nn.MultiheadAttention`` modules for ``fusedlm.nn.MultiheadAttention``
    and sends the ``torch.nn.functional.scaled_dot_product_attention`` calls made during the
    model's forward to ``fusedlm.scaled_dot_product_attention`` (a ``TorchFunctionMode``
    activated by forward hooks; see ``fusedlm.integrations.sdpa_mode`` for what it costs).
    ``mlp=True`` also swaps gated MLPs (SwiGLU, GeGLU) recognised by their children and a
    numeric probe, and mixture-of-experts experts modules by their ``_apply_gate``, so their
    activation runs on ``fusedlm.swiglu`` / ``fusedlm.geglu``.
    Returns a :class:`PatchReport`; ``unpatch`` undoes it."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(attention, bool):
        raise TypeError(f"argument 'attention' must be a bool, got {type(attention).__name__}")
    if not isinstance(mlp, bool):
        raise TypeError(f"argument 'mlp' must be a bool, got {type(mlp).__name__}")
    report = swap_norms(model, backend, custom_rmsnorm, custom_layernorm=custom_layernorm)
    if mlp:
        swap_mlps(model, backend, report)
    if attention:  # after the swaps, so the new modules carry the hooks too
        _swap_modules(model, lambda m: _attention_replacement(m, backend), report)
        report.notes.append(route_attention(model, backend)[1])
    return report


def unpatch(model: torch.nn.Module) -> PatchReport:
    """Undo :func:`patch` (and ``fusedlm.integrations.transformers.apply``): turn the swapped
    module objects back into their original classes, in place; remove ``attention=True``'s hooks;
    restore a transformers model's previous attention implementation and loss function.
    Returns a report of what was restored."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    names = _module_names(model)
    for module in list(model.modules()):
        if _RESTORE_KEY in module.__dict__:
            patched = _qualname(module)
            _restore_object(module)
            report.swapped.append(Swap(names.get(id(module), ""), patched, _qualname(module)))
    note = unroute_attention(model)
    if note is not None:
        report.notes.append(note)
    previous = model.__dict__.pop(ATTN_PREVIOUS_KEY, None)
    if previous is not None:
        from .transformers import set_attention_implementation  # only reached for HF models

        set_attention_implementation(model, previous)
        report.notes.append(f"attention implementation restored to {previous!r}")
    if LOSS_PREVIOUS_KEY in model.__dict__:
        previous = model.__dict__.pop(LOSS_PREVIOUS_KEY)
        if previous is None:
            model.__dict__.pop("_loss_function", None)
        else:
            model.__dict__["_loss_function"] = previous
        report.notes.append("loss_function restored")
    return report
