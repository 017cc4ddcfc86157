"""``fusedlm.optim.AdamW``: torch.optim.AdamW with its step done by one multi-tensor kernel call
per parameter group.

It subclasses ``torch.optim.AdamW``, so the constructor, defaults, ``param_groups`` and
``state_dict`` format are torch's own (a state_dict saved by one loads into the other); it adds
one argument, ``backend``. States of bfloat16/float16 parameters are kept in float32 (torch keeps
them in the parameter's dtype; loading either way converts them).

What the kernels do not cover runs torch's own implementation for that group: complex
parameters, ``differentiable=True``, ``capturable=True``.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from ..backends import check_backend_name
from ..ops.adamw import adamw_step

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class AdamW(torch.optim.AdamW):
    """Drop-in for ``torch.optim.AdamW`` (same arguments and defaults) plus
    ``backend`` ("auto", "cpu", "cuda", "triton", "torch")."""

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
    ) -> None:
        check_backend_name(backend)
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
            capturable=capturable, differentiable=differentiable, fused=fused,
        )
        self.defaults["backend"] = backend
        for group in self.param_groups:
            group.setdefault("backend", backend)
        self.register_load_state_dict_pre_hook(_keep_float32_states_pre_hook)
        self.register_load_state_dict_post_hook(_keep_float32_states_post_hook)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("backend", self.defaults.get("backend", "auto"))

    @staticmethod
    def _uses_torch_implementation(group: dict, has_complex: bool) -> bool:
        return has_complex or group["differentiable"] or group["capturable"]

    def _init_state(self, group: dict, param: Tensor) -> dict:
        state = self.state[param]
        if len(state) == 0:
            on_device = group["capturable"] or group["fused"]
            # Where torch keeps 'step' (see torch.optim.Adam._init_group), for identical state_dicts.
            state["step"] = (
                torch.zeros((), dtype=torch.float32, device=param.device)
                if on_device
                else torch.tensor(0.0, dtype=torch.float32)
            )
            state_dtype = torch.float32 if param.dtype in _LOW_PRECISION else param.dtype
            keys = _STATE_KEYS if group["amsgrad"] else _STATE_KEYS[:2]
            for key in keys:
                state[key] = torch.zeros_like(param, dtype=state_dtype, memory_format=torch.contiguous_format)
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
            has_complex = any(torch.is_complex(p) for p in params)
            if self._uses_torch_implementation(group, has_complex):
                self._torch_step(group)
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "fusedlm.optim.AdamW does not support sparse gradients (parameter of "
                        f"shape {list(p.shape)}); use torch.optim.SparseAdam"
                    )
            self._fused_step(group, params)
        return loss

    def _fused_step(self, group: dict, params: list[Tensor]) -> None:
        grads = [p.grad for p in params]
        states = [self._init_state(group, p) for p in params]
        steps = [s["step"] for s in states]
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.item()):
            return  # GradScaler found inf/NaN: skip the step, as torch's fused AdamW does
        if grad_scale is not None:
            grads = torch._foreach_div(grads, grad_scale.to(grads[0].device))
        # Group by device: one kernel call per device and parameter group.
        by_device: dict[torch.device, list[int]] = {}
        for i, p in enumerate(params):
            by_device.setdefault(p.device, []).append(i)
        torch._foreach_add_(steps, 1)
        beta1, beta2 = (float(b) for b in group["betas"])
        for indices in by_device.values():
            pick = lambda xs: [xs[i] for i in indices]  # noqa: E731
            adamw_step(
                pick(params),
                [g if g.is_contiguous() else g.contiguous() for g in pick(grads)],
                [s["exp_avg"] for s in pick(states)],
                [s["exp_avg_sq"] for s in pick(states)],
                [s["max_exp_avg_sq"] for s in pick(states)] if group["amsgrad"] else [],
                [float(s) for s in pick(steps)],
                float(group["lr"]), beta1, beta2, float(group["eps"]),
                float(group["weight_decay"]), bool(group["amsgrad"]), bool(group["maximize"]),
                group["backend"],
            )

    def _torch_step(self, group: dict) -> None:
        """torch's own AdamW for this group (cases the kernels do not cover)."""
        lists = ([], [], [], [], [], [])
        has_complex = self._init_group(group, *lists)
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = lists
        beta1, beta2 = group["betas"]
        torch.optim.adam.adam(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
            amsgrad=group["amsgrad"], has_complex=has_complex, beta1=beta1, beta2=beta2,
            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=group["maximize"], foreach=False, capturable=group["capturable"],
            differentiable=group["differentiable"], fused=False,
            grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None),
            decoupled_weight_decay=True,
        )


# torch's load_state_dict casts every state tensor to its parameter's dtype; for bfloat16/float16
# parameters that would round our float32 moments. Keep the saved float32 values instead.
def _keep_float32_states_pre_hook(optimizer: AdamW, state_dict: dict) -> None:
    optimizer._float32_states_being_loaded = {
        param_id: {k: v for k, v in s.items() if k in _STATE_KEYS and isinstance(v, Tensor)
                   and v.dtype == torch.float32}
        for param_id, s in state_dict["state"].items()
    }
    optimizer._saved_param_ids = [i for g in state_dict["param_groups"] for i in g["params"]]


def _keep_float32_states_post_hook(optimizer: AdamW) -> None:
    saved = optimizer.__dict__.pop("_float32_states_being_loaded", {})
    saved_ids = optimizer.__dict__.pop("_saved_param_ids", [])
    params = itertools.chain.from_iterable(g["params"] for g in optimizer.param_groups)
    for param_id, param in zip(saved_ids, params):
        state = optimizer.state.get(param)
        if not state or param.dtype not in _LOW_PRECISION:
            continue
        for key in _STATE_KEYS:
            if key in state:
                value = saved.get(param_id, {}).get(key)
                state[key] = (value if value is not None else state[key]).to(
                    device=param.device, dtype=torch.float32
                ).contiguous()
