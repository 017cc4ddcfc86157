"""``fusedlm.optim.AdamW``: torch.optim.AdamW with its step done by one multi-tensor kernel call
per parameter group and device.

It subclasses ``torch.optim.AdamW``, so the constructor, defaults, ``param_groups`` and
``state_dict`` format are torch's own (a state_dict saved by one loads into the other); it adds
two arguments, ``backend`` and ``master_weights``. States of bfloat16/float16 parameters are kept
in float32 (torch keeps them in the parameter's dtype; loading either way converts them).

Like torch's ``fused=True`` AdamW it works with ``torch.amp.GradScaler`` without the separate
unscale pass (``_step_supports_amp_scaling``): GradScaler hands ``grad_scale`` and ``found_inf``
to ``step()``, the kernel divides the grads by the scale (storing them back unscaled) and changes
nothing when ``found_inf`` is set, and a skipped step does not count (the step counts are
incremented, then ``found_inf != 0`` is subtracted). ``lr`` may be a tensor; neither it nor the
GradScaler tensors are read on the host. Step counts kept on the parameters' device
(``fused=True``, as torch keeps them) go to the kernel as a device tensor; the default CPU step
counts are read on the host, so with GradScaler on a GPU and ``fused`` unset, the step reads
``found_inf`` on the host once (torch's non-fused AdamW with GradScaler synchronizes there too).

What the kernels do not cover runs torch's own implementation for that group: complex
parameters, ``differentiable=True``, ``capturable=True`` (with GradScaler, that path unscales
the grads and checks ``found_inf`` on the host first, as its single-tensor code takes neither).
"""

from __future__ import annotations

import itertools
import numbers
import sys

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam  # torch.optim does not expose the module

from .. import _ext
from ..backends import check_backend_name
from ..ops._common import describe
from ..ops.adamw import adamw_step

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _check_hyperparameters(params, lr, betas, eps, weight_decay) -> None:
    """Named errors for what torch's constructor rejects with its own words or a bare
    TypeError ("'<=' not supported between instances of 'float' and 'NoneType'"). Tensors are
    range-checked only on the CPU (no device sync); torch's own checks follow."""
    if isinstance(params, Tensor) or not hasattr(params, "__iter__"):
        raise TypeError("argument 'params' must be an iterable of parameters or of parameter "
                        f"groups (dicts), got {type(params).__name__}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"argument 'betas' must be a pair (beta1, beta2), got {describe(betas)}")
    for name, value, upper in (("lr", lr, None), ("betas[0]", betas[0], 1.0),
                               ("betas[1]", betas[1], 1.0), ("eps", eps, None),
                               ("weight_decay", weight_decay, None)):
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"argument '{name}' must be a number or a one-element tensor, "
                                 f"got shape {list(value.shape)}")
            if value.device.type != "cpu":
                continue
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"argument '{name}' must be a number, got {type(value).__name__}")
        if not (0.0 <= value and (upper is None or value < upper)):  # (NaN fails too)
            bounds = "in [0, 1)" if upper is not None else ">= 0"
            raise ValueError(f"argument '{name}' must be {bounds}, got {value}")


class AdamW(torch.optim.AdamW):
    """Drop-in for ``torch.optim.AdamW`` (same arguments and defaults) plus
    ``backend`` ("auto", "cpu", "cuda", "triton", "torch") and ``master_weights``.

    ``master_weights=True`` (default False; also a per-group option): every bfloat16/float16
    parameter gets a float32 master copy, ``state["master"]``, made from the parameter when its
    state is created. The step updates the master in float32 and writes its rounding into the
    parameter, so updates smaller than the parameter's resolution (e.g. lr 1e-5 on bfloat16
    values near 1) accumulate instead of being rounded away; the float32 master follows a float32
    run of torch.optim.AdamW. Parameters of other dtypes get no master. The master is in
    ``state_dict()``, so a resumed run continues exactly; loading a state_dict without masters
    (e.g. one of torch.optim.AdamW, or one saved with ``master_weights=False``) creates them from
    the parameters. The master is the value the optimizer trusts: a change made to such a
    parameter outside the optimizer is overwritten at the next step (load weights before
    creating the optimizer state, or load the optimizer state after). Not available with
    ``capturable=True`` / ``differentiable=True`` (torch's own implementation runs those) nor
    with ``backend="triton"`` (raises ``BackendNotSupportedError``; "auto" uses another kernel).
    Costs 4 bytes per parameter element of the 16-bit parameters.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        master_weights: bool = False,
    ) -> None:
        check_backend_name(backend)
        _check_hyperparameters(params, lr, betas, eps, weight_decay)
        if master_weights and (capturable or differentiable):
            raise ValueError("argument 'master_weights' is not supported with capturable=True or "
                             "differentiable=True (torch's own AdamW runs those)")
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
            capturable=capturable, differentiable=differentiable, fused=fused,
        )
        self.defaults["backend"] = backend
        self.defaults["master_weights"] = bool(master_weights)
        for group in self.param_groups:
            group.setdefault("backend", backend)
            group.setdefault("master_weights", bool(master_weights))
        # GradScaler passes grad_scale / found_inf to step() instead of unscaling the grads itself
        # (torch sets this for fused=True only; every path here handles them).
        self._step_supports_amp_scaling = True
        self.register_load_state_dict_pre_hook(_keep_float32_states_pre_hook)
        self.register_load_state_dict_post_hook(_keep_float32_states_post_hook)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("backend", self.defaults.get("backend", "auto"))
            group.setdefault("master_weights", self.defaults.get("master_weights", False))

    @staticmethod
    def _uses_torch_implementation(group: dict, has_complex: bool) -> bool:
        return has_complex or group["differentiable"] or group["capturable"]

    def _init_state(self, group: dict, param: Tensor) -> dict:
        state = self.state[param]
        if len(state) == 0:
            on_device = group["capturable"] or group["fused"]
            # Where torch keeps 'step' (see torch.optim.Adam._init_group), for identical
            # state_dicts.
            state["step"] = (
                torch.zeros((), dtype=torch.float32, device=param.device)
                if on_device
                else torch.tensor(0.0, dtype=torch.float32)
            )
            state_dtype = torch.float32 if param.dtype in _LOW_PRECISION else param.dtype
            keys = _STATE_KEYS if group["amsgrad"] else _STATE_KEYS[:2]
            for key in keys:
                state[key] = torch.zeros_like(
                    param, dtype=state_dtype, memory_format=torch.contiguous_format
                )
        _sync_master(group, param, state)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            has_complex = any(p.dtype.is_complex for p in params)
            if self._uses_torch_implementation(group, has_complex):
                if group.get("master_weights") and any(p.dtype in _LOW_PRECISION for p in params):
                    raise RuntimeError(
                        "fusedlm.optim.AdamW: master_weights=True is not supported for a group "
                        "that runs torch's own AdamW (capturable, differentiable or complex "
                        "parameters)"
                    )
                self._torch_step(group)
                continue
            if any(p.grad.is_sparse for p in params):
                p = next(p for p in params if p.grad.is_sparse)
                raise RuntimeError(
                    "fusedlm.optim.AdamW does not support sparse gradients (parameter of "
                    f"shape {list(p.shape)}); use torch.optim.SparseAdam"
                )
            self._fused_step(group, params)
        return loss

    def _fused_step(self, group: dict, params: list[Tensor]) -> None:
        # Every line here runs once per parameter per step: a GPT-2 list has ~150 of them, and
        # each microsecond spent per parameter is ~0.15 ms of host time a step, against ~1 ms
        # for the whole update on an H100 (benchmarks/NOTES.md). Hence plain loops, no per-tensor
        # torch calls, and the step counts kept on the CPU updated by one extension call.
        state_of = self.state
        masters_possible = group.get("master_weights", False)
        states = []
        for p in params:
            state = state_of[p]
            if not state or masters_possible or "master" in state:
                state = self._init_state(group, p)
            states.append(state)
        dtensor = _dtensor_class()
        if dtensor is None or not any(isinstance(p, dtensor) for p in params):
            grads = [p.grad for p in params]
            local_states = states
        else:
            # DTensor parameters (FSDP2, tensor parallelism): their states are DTensors laid
            # out alike (as torch.optim.AdamW makes them, so state_dict() gathers them); the
            # update is elementwise, so the kernel runs on the local shards, in place.
            grads = [_local_grad(p) for p in params]
            local_states = [{k: _local(v) for k, v in s.items()} for s in states]
            params = [_local(p) for p in params]
        steps = [s["step"] for s in states]
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Group by device and by whether the params have float32 masters: one kernel call each.
        by_device: dict[tuple[torch.device, bool], list[int]] = {}
        for i, p in enumerate(params):
            by_device.setdefault((p.device, "master" in local_states[i]), []).append(i)
        # Step counts on the CPU outside a fused=True group (torch.optim's default) are
        # incremented and read on the host and reach the kernel as numbers; the counts of a
        # fused=True group live on the params' device (torch's layout) and reach the kernel as a
        # tensor, never read on the host, on a CPU device too (so CI tests that path).
        cpu_steps = [] if group["fused"] else [i for i, s in enumerate(steps) if s.is_cpu]
        host_step_values: dict[int, float] = {}
        if cpu_steps:
            values = _increment_steps([steps[i] for i in cpu_steps], 1.0)
            host_step_values = dict(zip(cpu_steps, values, strict=True))
        if len(cpu_steps) != len(steps):
            torch._foreach_add_([s for i, s in enumerate(steps) if i not in host_step_values], 1)
        beta1, beta2 = (float(b) for b in group["betas"])
        lr = group["lr"]
        for (device, has_master), indices in by_device.items():
            def pick(xs, indices=indices):
                return [xs[i] for i in indices]

            device_states = pick(local_states)
            extensions = {}
            if isinstance(lr, Tensor):
                # A CPU lr is read on the host (no device sync); a device one in the kernel, as
                # float32.
                lr_tensor = lr if lr.device.type == "cpu" else _on(lr, device)
                if lr_tensor.device.type != "cpu":
                    lr_tensor = lr_tensor.to(torch.float32)
                extensions["lr_tensor"] = lr_tensor
            if grad_scale is not None:
                extensions["grad_scale"] = _on(grad_scale, device)
            if found_inf is not None:
                extensions["found_inf"] = _on(found_inf, device)
            if all(i in host_step_values for i in indices):
                host_steps = [host_step_values[i] for i in indices]
            else:
                # Counts on the params' device (a CPU count among them is moved there).
                host_steps = []
                extensions["step_tensor"] = torch.stack(
                    [_on(steps[i], device).reshape(()) for i in indices]
                ).to(torch.float32)
            device_grads = pick(grads)
            contiguous_grads = [g if g.is_contiguous() else g.contiguous() for g in device_grads]
            adamw_step(
                pick(params),
                contiguous_grads,
                [s["exp_avg"] for s in device_states],
                [s["exp_avg_sq"] for s in device_states],
                [s["max_exp_avg_sq"] for s in device_states] if group["amsgrad"] else [],
                host_steps,
                0.0 if isinstance(lr, Tensor) else float(lr), beta1, beta2, float(group["eps"]),
                float(group["weight_decay"]), bool(group["amsgrad"]), bool(group["maximize"]),
                group["backend"],
                [s["master"] for s in device_states] if has_master else [],
                **extensions,
            )
            if grad_scale is not None:  # the unscaled grads are stored back, as torch does
                for g, c in zip(device_grads, contiguous_grads, strict=True):
                    if g is not c:
                        g.copy_(c)
        if found_inf is not None:
            # A skipped step does not count: subtract found_inf != 0 where the counts live.
            # (ShardedGradScaler's found_inf has shape (1,), GradScaler's (): either must
            # subtract from the 0-dim counts)
            skipped = (found_inf != 0).to(torch.float32).reshape(())
            if cpu_steps and bool(_on(skipped, torch.device("cpu"))):  # host read: CPU counts
                _increment_steps([steps[i] for i in cpu_steps], -1.0)
            by_step_device: dict[torch.device, list[Tensor]] = {}
            for i, s in enumerate(steps):
                if i not in host_step_values:
                    by_step_device.setdefault(s.device, []).append(s)
            for step_device, device_steps in by_step_device.items():
                flag = _on(skipped, step_device)
                torch._foreach_sub_(device_steps, [flag] * len(device_steps))

    def _torch_step(self, group: dict) -> None:
        """torch's own AdamW for this group (cases the kernels do not cover)."""
        lists = ([], [], [], [], [], [])
        has_complex = self._init_group(group, *lists)
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = lists
        # torch's single-tensor AdamW takes no grad_scale / found_inf (only its fused one does):
        # do what the fused one does with them, reading found_inf on the host.
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.item()):
            return
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None:
            for g in grads:
                g.div_(_on(grad_scale, g.device))
        beta1, beta2 = group["betas"]
        torch_adam(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
            amsgrad=group["amsgrad"], has_complex=has_complex, beta1=beta1, beta2=beta2,
            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=group["maximize"], foreach=False, capturable=group["capturable"],
            differentiable=group["differentiable"], fused=False, grad_scale=None,
            found_inf=None, decoupled_weight_decay=True,
        )


def _increment_steps(steps: list[Tensor], amount: float) -> list[float]:
    """Adds ``amount`` to each CPU step count in place; returns the new counts. One extension
    call when ``fusedlm._C`` is there, else torch ops (the same arithmetic)."""
    increment = getattr(_ext.load(), "increment_steps", None)  # None: no (or an older) build
    if increment is not None:
        return increment(steps, amount)
    torch._foreach_add_(steps, amount)
    return [float(s) for s in steps]


def _dtensor_class():
    """torch's DTensor class, or None while nothing has imported torch.distributed.tensor (then
    no DTensor exists; importing it here would slow down every step of a plain run)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: writing it writes the DTensor), else ``t``."""
    dtensor = _dtensor_class()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def _local_grad(param: Tensor) -> Tensor:
    """``param.grad``, as the local shard laid out like ``param``'s when they are DTensors."""
    grad = param.grad
    dtensor = _dtensor_class()
    if dtensor is None or not isinstance(grad, dtensor):
        return grad
    if isinstance(param, dtensor) and grad.placements != param.placements:
        grad = grad.redistribute(param.device_mesh, param.placements)
    return grad.to_local()


def _on(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device`` (itself when already there); a copy to an accelerator does not block
    the host, a copy to the CPU does (it must be complete before the host uses it)."""
    if t.device == device:
        return t
    return t.to(device, non_blocking=device.type != "cpu")


def _sync_master(group: dict, param: Tensor, state: dict) -> None:
    """Give a bfloat16/float16 param of a ``master_weights`` group its float32 master (a copy of
    the param) if it has none; drop the master of a param that should have none."""
    if group.get("master_weights") and param.dtype in _LOW_PRECISION:
        if "master" not in state:
            state["master"] = param.detach().to(
                torch.float32, memory_format=torch.contiguous_format, copy=True
            )
    elif "master" in state:
        del state["master"]


# torch's load_state_dict casts every state tensor to its parameter's dtype; for bfloat16/float16
# parameters that would round our float32 moments and masters. Keep the saved float32 values
# instead.
_FLOAT32_KEYS = (*_STATE_KEYS, "master")


def _keep_float32_states_pre_hook(optimizer: AdamW, state_dict: dict) -> None:
    optimizer._float32_states_being_loaded = {
        param_id: {k: v for k, v in s.items() if k in _FLOAT32_KEYS and isinstance(v, Tensor)
                   and v.dtype == torch.float32}
        for param_id, s in state_dict["state"].items()
    }
    optimizer._saved_param_ids = [i for g in state_dict["param_groups"] for i in g["params"]]


def _keep_float32_states_post_hook(optimizer: AdamW) -> None:
    saved = optimizer.__dict__.pop("_float32_states_being_loaded", {})
    saved_ids = optimizer.__dict__.pop("_saved_param_ids", [])
    params = itertools.chain.from_iterable(
        ((g, p) for p in g["params"]) for g in optimizer.param_groups
    )
    for param_id, (group, param) in zip(saved_ids, params, strict=False):
        state = optimizer.state.get(param)
        if not state or param.dtype not in _LOW_PRECISION:
            continue
        if optimizer._uses_torch_implementation(group, has_complex=False):
            # torch's own AdamW keeps its states in the param's dtype (and fails on float32
            # ones): torch's cast on load is right for these groups.
            continue
        for key in _FLOAT32_KEYS:
            if key in state:
                value = saved.get(param_id, {}).get(key)
                state[key] = (value if value is not None else state[key]).to(
                    device=param.device, dtype=torch.float32
                ).contiguous()
        # A state_dict without masters (torch's, or master_weights=False) gets them from the
        # params; one with masters loaded where none are wanted drops them.
        _sync_master(group, param, state)
