"""fusedlm.optim.AdamW is a drop-in for torch.optim.AdamW: same signature and defaults, same
training trajectory, interchangeable state_dicts."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import fusedlm
from fusedlm.backends import OpDispatch
from tests.helpers import available_backends, device_of

BACKENDS = available_backends()


def _mlp(device, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.GELU(),
        torch.nn.Linear(16, 4),
    ).to(device, dtype)


def _batches(n, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(32, 8, generator=g).to(device, dtype),
            torch.randn(32, 4, generator=g).to(device, dtype),
        )
        for _ in range(n)
    ]


def _train(model, opt, batches, lr_schedule=None):
    for i, (x, y) in enumerate(batches):
        if lr_schedule is not None:
            for group in opt.param_groups:
                group["lr"] = lr_schedule(i, group["lr"])
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step()


def _assert_same_params(ours, theirs, rtol=1e-6, atol=1e-7):
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        torch.testing.assert_close(
            p, q, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


def _state_tensors(opt):
    return [(key, value) for state in opt.state.values() for key, value in sorted(state.items())]


# ---- signature ---------------------------------------------------------------------------------


def test_signature_and_defaults_are_torchs():
    ours = inspect.signature(fusedlm.optim.AdamW.__init__).parameters
    theirs = inspect.signature(torch.optim.AdamW.__init__).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    assert list(ours)[len(theirs) :] == ["backend"]
    for name, param in theirs.items():
        assert ours[name].default == param.default, name
        assert ours[name].kind == param.kind, name
    assert (
        ours["backend"].kind == inspect.Parameter.KEYWORD_ONLY and ours["backend"].default == "auto"
    )


def test_is_a_torch_adamw_with_torchs_defaults():
    model = _mlp("cpu")
    ours = fusedlm.optim.AdamW(model.parameters())
    theirs = torch.optim.AdamW(model.parameters())
    assert isinstance(ours, torch.optim.AdamW)
    assert {k: v for k, v in ours.defaults.items() if k != "backend"} == theirs.defaults


def test_bad_backend_name_raises():
    with pytest.raises(ValueError, match="backend"):
        fusedlm.optim.AdamW(_mlp("cpu").parameters(), backend="nope")


# ---- trajectory parity -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_training_matches_torch(weight_decay, maximize, amsgrad, backend):
    device = device_of(backend)
    ours_model, theirs_model = _mlp(device), _mlp(device)
    kwargs = {
        "lr": 1e-2,
        "betas": (0.8, 0.95),
        "weight_decay": weight_decay,
        "amsgrad": amsgrad,
        "maximize": maximize,
    }
    ours = fusedlm.optim.AdamW(ours_model.parameters(), backend=backend, **kwargs)
    theirs = torch.optim.AdamW(theirs_model.parameters(), **kwargs)
    batches = _batches(6, device)
    OpDispatch.last_choice.pop("adamw_step", None)
    _train(ours_model, ours, batches)
    assert OpDispatch.last_choice.get("adamw_step") == backend
    _train(theirs_model, theirs, batches)
    _assert_same_params(ours_model, theirs_model)
    for (key, a), (key_t, b) in zip(_state_tensors(ours), _state_tensors(theirs), strict=True):
        assert key == key_t
        torch.testing.assert_close(
            a, b, rtol=1e-5, atol=1e-9, msg=lambda m, key=key: f"state {key}: {m}"
        )
    # the trajectory actually moved the parameters
    assert not torch.equal(ours_model[0].weight, _mlp(device)[0].weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_frozen_param_and_lr_schedule(backend):
    """Two groups with their own lr / weight_decay / amsgrad, a parameter that never gets a grad
    (skipped, no state, unchanged, as in torch), and lr changed between steps."""
    device = device_of(backend)
    models = [_mlp(device), _mlp(device)]
    initial = torch.randn(3, device=device)
    extra = [torch.nn.Parameter(initial.clone()) for _ in models]

    def groups(model, unused):
        return [
            {"params": [model[0].weight, model[0].bias, unused], "lr": 3e-3},
            {
                "params": list(model[2].parameters()) + list(model[4].parameters()),
                "weight_decay": 0.3,
                "amsgrad": True,
            },
        ]

    ours = fusedlm.optim.AdamW(groups(models[0], extra[0]), lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW(groups(models[1], extra[1]), lr=1e-2)
    schedule = lambda step, lr: lr * (0.5 if step % 2 else 1.5)  # noqa: E731
    batches = _batches(5, device)
    _train(models[0], ours, batches, schedule)
    _train(models[1], theirs, batches, schedule)
    _assert_same_params(*models)
    assert torch.equal(extra[0], initial) and torch.equal(extra[1], initial)
    assert extra[0] not in ours.state or len(ours.state[extra[0]]) == 0
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in theirs.param_groups]


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_as_one_element_tensor(backend):
    device = device_of(backend)
    models = [_mlp(device), _mlp(device)]
    ours = fusedlm.optim.AdamW(models[0].parameters(), lr=torch.tensor(5e-3), backend=backend)
    theirs = torch.optim.AdamW(models[1].parameters(), lr=torch.tensor(5e-3))
    batches = _batches(4, device)
    _train(models[0], ours, batches)
    _train(models[1], theirs, batches)
    _assert_same_params(*models)


@pytest.mark.parametrize("backend", BACKENDS)
def test_closure_returns_loss(backend):
    device = device_of(backend)
    models = [_mlp(device), _mlp(device)]
    x, y = _batches(1, device)[0]
    losses = []
    for model, cls, kw in (
        (models[0], fusedlm.optim.AdamW, {"backend": backend}),
        (models[1], torch.optim.AdamW, {}),
    ):
        opt = cls(model.parameters(), lr=1e-2, **kw)

        def closure(model=model, opt=opt):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        losses.append(opt.step(closure))
    torch.testing.assert_close(losses[0], losses[1])
    _assert_same_params(*models)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_params_keep_float32_states(dtype, backend):
    """bf16/fp16 params: states in float32; the trajectory follows torch's float32 run within
    the params' precision."""
    device = device_of(backend)
    ours_model = _mlp(device, dtype)
    theirs_model = _mlp(device, torch.float32)
    with torch.no_grad():  # same starting point: the low-precision values
        for p, q in zip(ours_model.parameters(), theirs_model.parameters(), strict=True):
            q.copy_(p.float())
    ours = fusedlm.optim.AdamW(ours_model.parameters(), lr=1e-2, weight_decay=0.1, backend=backend)
    theirs = torch.optim.AdamW(theirs_model.parameters(), lr=1e-2, weight_decay=0.1)
    batches = _batches(5, device)
    _train(ours_model, ours, [(x.to(dtype), y) for x, y in batches])
    _train(theirs_model, theirs, batches)
    for p in ours_model.parameters():
        assert p.dtype == dtype
        state = ours.state[p]
        assert (
            state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
        )
    start = _mlp(device, dtype)
    for p, q, p0 in zip(
        ours_model.parameters(), theirs_model.parameters(), start.parameters(), strict=True
    ):
        moved = (q - p0.float()).abs().max()
        # each step moves a param by about lr; the runs may drift apart by a few of the params'
        # ulps (the gradients themselves come from a bf16/fp16 forward pass)
        torch.testing.assert_close(p.float(), q, rtol=2e-2, atol=0.5 * moved.item())


# ---- state_dict interchange --------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_state_dict_interchange(amsgrad, direction, backend):
    device = device_of(backend)
    kwargs = {"lr": 1e-2, "weight_decay": 0.05, "amsgrad": amsgrad}
    make = {
        "ours": lambda params: fusedlm.optim.AdamW(params, backend=backend, **kwargs),
        "torch": lambda params: torch.optim.AdamW(params, **kwargs),
    }
    src_name, dst_name = ("ours", "torch") if direction == "ours_to_torch" else ("torch", "ours")
    batches = _batches(6, device)

    # Reference trajectory: the source optimizer for all 6 steps.
    ref_model = _mlp(device)
    ref_opt = make[src_name](ref_model.parameters())
    _train(ref_model, ref_opt, batches)

    # 3 steps with the source, then save, load into the other kind, 3 more steps.
    model = _mlp(device)
    src = make[src_name](model.parameters())
    _train(model, src, batches[:3])
    saved = copy.deepcopy(src.state_dict())
    model2 = copy.deepcopy(model)
    dst = make[dst_name](model2.parameters())
    dst.load_state_dict(saved)
    assert len(dst.state) == len(src.state)
    _train(model2, dst, batches[3:])
    _assert_same_params(model2, ref_model)
    if dst_name == "ours":
        assert all(g["backend"] == backend for g in dst.param_groups)
        OpDispatch.last_choice.pop("adamw_step", None)
        _train(model2, dst, batches[:1])
        assert OpDispatch.last_choice.get("adamw_step") == backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_format_matches_torch(backend):
    device = device_of(backend)
    models = [_mlp(device), _mlp(device)]
    ours = fusedlm.optim.AdamW(models[0].parameters(), amsgrad=True, backend=backend)
    theirs = torch.optim.AdamW(models[1].parameters(), amsgrad=True)
    batches = _batches(2, device)
    _train(models[0], ours, batches)
    _train(models[1], theirs, batches)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sd_ours["state"].keys() == sd_theirs["state"].keys()
    for key in sd_theirs["state"]:
        a, b = sd_ours["state"][key], sd_theirs["state"][key]
        assert a.keys() == b.keys()
        for name in b:
            assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
            assert a[name].device == b[name].device, name
    group_ours = {k: v for k, v in sd_ours["param_groups"][0].items() if k != "backend"}
    assert group_ours == sd_theirs["param_groups"][0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_state_dict_round_trip_keeps_float32_states(backend):
    device = device_of(backend)
    model = _mlp(device, torch.bfloat16)
    opt = fusedlm.optim.AdamW(model.parameters(), lr=1e-2, backend=backend)
    _train(model, opt, [(x.bfloat16(), y) for x, y in _batches(2, device)])
    saved = copy.deepcopy(opt.state_dict())
    opt2 = fusedlm.optim.AdamW(model.parameters(), lr=1e-2, backend=backend)
    opt2.load_state_dict(saved)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt2.state[p][key].dtype == torch.float32
            assert torch.equal(opt2.state[p][key], opt.state[p][key])
    # torch's own optimizer accepts it too (casting the states to the params' dtype)
    theirs = torch.optim.AdamW(model.parameters(), lr=1e-2)
    theirs.load_state_dict(saved)
    for p in model.parameters():
        torch.testing.assert_close(
            theirs.state[p]["exp_avg"].float(), opt.state[p]["exp_avg"], rtol=1e-2, atol=1e-6
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_with_fused_matches_torch(backend):
    """fused=True makes GradScaler hand the optimizer grad_scale/found_inf (as with torch's fused
    AdamW): grads are unscaled in the step, and a step with inf/NaN grads is skipped entirely."""
    device = device_of(backend)
    ours_model, theirs_model = _mlp(device), _mlp(device)
    ours = fusedlm.optim.AdamW(ours_model.parameters(), lr=1e-2, fused=True, backend=backend)
    theirs = torch.optim.AdamW(theirs_model.parameters(), lr=1e-2, fused=True)
    scalers = [torch.amp.GradScaler(device, init_scale=1024.0) for _ in range(2)]
    for step, (x, y) in enumerate(_batches(5, device)):
        for model, opt, scaler in zip((ours_model, theirs_model), (ours, theirs), scalers):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            if step == 2:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    _assert_same_params(ours_model, theirs_model)
    assert scalers[0].get_scale() == scalers[1].get_scale() == 512.0  # halved once, at the inf
    assert float(ours.state[ours_model[0].weight]["step"]) == 4.0  # the inf step did not count
