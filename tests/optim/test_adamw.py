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


# ---- GradScaler (no separate unscale pass) and a tensor lr ---------------------------------------


def _scaled_steps(model, opt, scaler, batches, bad_steps=(), unscale_first=False, record=None):
    """Train with scaler over batches; the loss of the steps in bad_steps is inf (step 2k) or NaN
    (odd). ``record`` gets, per step, (scale, grads before the step, grads after it)."""
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if step in bad_steps:
            loss = loss * (float("inf") if step % 2 == 0 else float("nan"))
        scaler.scale(loss).backward()
        if unscale_first:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = [p.grad.clone() for p in model.parameters()]
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if record is not None:
            record.append((scale, before, [p.grad.clone() for p in model.parameters()]))


def _tols(dtype):
    return {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-6,
                                                                           "atol": 1e-7}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("fused", [None, True], ids=["steps_on_host", "steps_on_device"])
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize(("amsgrad", "maximize"), [(False, False), (True, True)],
                         ids=["adam-min", "amsgrad-max"])
def test_grad_scaler_matches_torch_non_fused(maximize, amsgrad, lr_kind, fused, dtype, backend):
    """GradScaler + fusedlm.optim.AdamW (the scale and found_inf handed to the kernel) equals
    GradScaler + torch.optim.AdamW(fused=False) (GradScaler unscales, then steps or skips) over
    steps where the scale grows and backs off at an inf and a NaN step: params, moments, step
    counts and scale; the grads left after each step are those torch's fused AdamW leaves."""
    device = device_of(backend)
    # (a float32 lr tensor would put torch's non-fused float64 arithmetic through float32)
    lr = torch.tensor(1e-2, dtype=dtype) if lr_kind == "tensor" else 1e-2
    # eps = 1e-3, not 1e-8: Adam's update is then not invariant to the grads' scale, so a grad
    # left scaled shows in the params
    kwargs = {"lr": lr, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.1,
              "amsgrad": amsgrad, "maximize": maximize}
    models = [_mlp(device, dtype) for _ in range(3)]
    opts = [
        fusedlm.optim.AdamW(models[0].parameters(), fused=fused, backend=backend, **kwargs),
        torch.optim.AdamW(models[1].parameters(), foreach=False, fused=False, **kwargs),
        torch.optim.AdamW(models[2].parameters(), fused=True, **kwargs),
    ]
    scalers = [torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)
               for _ in range(3)]
    batches = _batches(7, device, dtype)
    records = [[], [], []]
    for model, opt, scaler, record in zip(models, opts, scalers, records, strict=True):
        _scaled_steps(model, opt, scaler, batches, bad_steps=(2, 5), record=record)
    _assert_same_params(models[0], models[1], **_tols(dtype))
    for (key, a), (key_t, b) in zip(_state_tensors(opts[0]), _state_tensors(opts[1]),
                                    strict=True):
        assert key == key_t
        if key == "step":
            assert float(a) == float(b) == 5.0, "the two skipped steps must not count"
        else:
            torch.testing.assert_close(a, b, **_tols(dtype), msg=lambda m, k=key: f"{k}: {m}")
    assert [r[0] for r in records[0]] == [r[0] for r in records[1]]
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**10  # grew twice, halved twice
    # torch's fused AdamW leaves grad / scale in the grads, or the scaled grads of a skipped step.
    for name, record in (("fusedlm", records[0]), ("torch fused", records[2])):
        for step, (scale, before, after) in enumerate(record):
            for g0, g1 in zip(before, after, strict=True):
                expected = g0 if step in (2, 5) else g0 / scale
                torch.testing.assert_close(
                    g1, expected, rtol=0, atol=0, equal_nan=True,
                    msg=lambda m, step=step, name=name: f"{name}: grads after step {step}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_hands_scale_and_found_inf_to_step(backend, monkeypatch):
    """GradScaler does not unscale the grads before our step (the kernel does): step() sees the
    scaled grads and GradScaler's grad_scale / found_inf, and the op gets them as tensors."""
    device = device_of(backend)
    model = _mlp(device)
    opt = fusedlm.optim.AdamW(model.parameters(), lr=1e-2, backend=backend)
    scaler = torch.amp.GradScaler(device, init_scale=256.0)
    x, y = _batches(1, device)[0]
    reference_model = _mlp(device)
    torch.nn.functional.mse_loss(reference_model(x), y).backward()
    seen = {}
    real_step = opt.step

    def step(*args, **kwargs):
        seen["grad_scale"] = getattr(opt, "grad_scale", None)
        seen["found_inf"] = getattr(opt, "found_inf", None)
        seen["grad"] = model[0].weight.grad.clone()
        return real_step(*args, **kwargs)

    calls = []
    real_op = fusedlm.optim.adamw.adamw_step

    def op(*args, **kwargs):
        calls.append(kwargs)
        return real_op(*args, **kwargs)

    monkeypatch.setattr(opt, "step", step)
    monkeypatch.setattr(fusedlm.optim.adamw, "adamw_step", op)
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    scaler.step(opt)
    assert float(seen["grad_scale"]) == 256.0 and float(seen["found_inf"]) == 0.0
    torch.testing.assert_close(seen["grad"], 256.0 * reference_model[0].weight.grad)
    assert len(calls) == 1
    assert calls[0]["grad_scale"] is not None and calls[0]["found_inf"] is not None
    torch.testing.assert_close(model[0].weight.grad, reference_model[0].weight.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [None, True], ids=["steps_on_host", "steps_on_device"])
def test_grad_scaler_inf_on_the_first_step(fused, backend):
    """An inf at the very first step: states exist with step 0 (as with torch's fused AdamW),
    params are unchanged, and the run then follows torch's non-fused one."""
    device = device_of(backend)
    models = [_mlp(device) for _ in range(3)]
    opts = [
        fusedlm.optim.AdamW(models[0].parameters(), lr=1e-2, eps=1e-3, fused=fused,
                            backend=backend),
        torch.optim.AdamW(models[1].parameters(), lr=1e-2, eps=1e-3, foreach=False, fused=False),
        torch.optim.AdamW(models[2].parameters(), lr=1e-2, eps=1e-3, fused=True),
    ]
    scalers = [torch.amp.GradScaler(device, init_scale=2.0**12) for _ in range(3)]
    batches = _batches(3, device)
    _scaled_steps(models[0], opts[0], scalers[0], batches[:1], bad_steps=(0,))
    _scaled_steps(models[2], opts[2], scalers[2], batches[:1], bad_steps=(0,))
    _assert_same_params(models[0], _mlp(device), rtol=0, atol=0)
    for p, q in zip(models[0].parameters(), models[2].parameters(), strict=True):
        assert float(opts[0].state[p]["step"]) == float(opts[2].state[q]["step"]) == 0.0
    _scaled_steps(models[0], opts[0], scalers[0], batches[1:])
    _scaled_steps(models[1], opts[1], scalers[1], batches, bad_steps=(0,))
    _assert_same_params(models[0], models[1])
    assert float(opts[0].state[models[0][0].weight]["step"]) == 2.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_after_unscale_and_clipping(backend):
    """scaler.unscale_(opt) + clipping before scaler.step: the step gets found_inf but no
    grad_scale (the grads are unscaled already), as torch.optim.AdamW(fused=True) does."""
    device = device_of(backend)
    models = [_mlp(device), _mlp(device)]
    opts = [fusedlm.optim.AdamW(models[0].parameters(), lr=1e-2, eps=1e-3, backend=backend),
            torch.optim.AdamW(models[1].parameters(), lr=1e-2, eps=1e-3, foreach=False,
                              fused=False)]
    scalers = [torch.amp.GradScaler(device, init_scale=2.0**8, growth_interval=1)
               for _ in range(2)]
    batches = _batches(5, device)
    for model, opt, scaler in zip(models, opts, scalers, strict=True):
        _scaled_steps(model, opt, scaler, batches, bad_steps=(3,), unscale_first=True)
    _assert_same_params(*models)
    assert float(opts[0].state[models[0][0].weight]["step"]) == 4.0
    assert scalers[0].get_scale() == scalers[1].get_scale()


def test_grad_scaler_with_the_torch_fallback_path():
    """differentiable=True runs torch's own single-tensor AdamW, which takes no grad_scale /
    found_inf: the grads are unscaled and the inf step skipped before it."""
    models = [_mlp("cpu"), _mlp("cpu")]
    # (torch's differentiable=True cannot step leaf parameters, hence torch's default here, whose
    # arithmetic differs by a few ulps; eps = 1e-3 makes a grad left scaled show)
    opts = [fusedlm.optim.AdamW(models[0].parameters(), lr=1e-2, eps=1e-3, differentiable=True),
            torch.optim.AdamW(models[1].parameters(), lr=1e-2, eps=1e-3, foreach=False)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in range(2)]
    batches = _batches(4, "cpu")
    for model, opt, scaler in zip(models, opts, scalers, strict=True):
        _scaled_steps(model, opt, scaler, batches, bad_steps=(1,))
    _assert_same_params(*models, rtol=1e-5, atol=1e-6)
    assert float(opts[0].state[models[0][0].weight]["step"]) == 3.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [None, True], ids=["steps_on_host", "steps_on_device"])
def test_lr_tensor_updated_in_place_between_steps(fused, backend):
    """A tensor lr that a scheduler changes in place is read at every step (as torch does)."""
    device = device_of(backend)
    models = [_mlp(device), _mlp(device)]
    lrs = [torch.tensor(1e-2), torch.tensor(1e-2)]
    opts = [fusedlm.optim.AdamW(models[0].parameters(), lr=lrs[0], fused=fused, backend=backend),
            torch.optim.AdamW(models[1].parameters(), lr=lrs[1], foreach=False)]
    for i, (x, y) in enumerate(_batches(4, device)):
        for model, opt, lr in zip(models, opts, lrs, strict=True):
            lr.fill_(1e-2 * (0.5 ** i))
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    _assert_same_params(*models)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_path_reads_no_tensor_on_the_host(backend, monkeypatch):
    """With a tensor lr, step counts on the device (fused=True) and GradScaler's tensors, the
    step never turns a tensor into a Python number (each such read of a GPU tensor is a sync);
    the op gets the lr, the step counts, grad_scale and found_inf as tensors."""
    device = device_of(backend)
    model = _mlp(device)
    lr = torch.tensor(1e-2)
    opt = fusedlm.optim.AdamW(model.parameters(), lr=lr, fused=True, backend=backend)
    x, y = _batches(1, device)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.grad_scale = torch.tensor(1.0, device=device)
    opt.found_inf = torch.tensor(0.0, device=device)
    calls = []
    real_op = fusedlm.optim.adamw.adamw_step

    def op(*args, **kwargs):
        calls.append((args, kwargs))
        return real_op(*args, **kwargs)

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor was read on the host during the step")

    monkeypatch.setattr(fusedlm.optim.adamw, "adamw_step", op)
    with monkeypatch.context() as m:
        for name in ("item", "__float__", "__bool__", "tolist", "__int__", "__index__"):
            m.setattr(torch.Tensor, name, refuse)
        opt.step()
    (args, kwargs), = calls
    assert args[5] == [] and args[6] == 0.0  # no host steps, no host lr
    assert kwargs["lr_tensor"] is lr
    assert kwargs["step_tensor"].tolist() == [1.0] * len(list(model.parameters()))
    assert kwargs["grad_scale"] is opt.grad_scale and kwargs["found_inf"] is opt.found_inf
    assert float(opt.state[model[0].weight]["step"]) == 1.0


# ---- DTensor parameters (FSDP2, tensor parallelism) -------------------------------------------


@pytest.fixture
def one_rank_mesh():
    """A 1-rank gloo process group in this process and its CPU device mesh (sharding over
    several ranks is tested end to end by tests/train/test_distributed.py)."""
    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    from torch.distributed.device_mesh import init_device_mesh

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_dtensor_params_match_torch(amsgrad, backend, one_rank_mesh):
    """DTensor parameters and grads: the kernel updates their local shards; the states are
    DTensors laid out like the parameters (as torch.optim.AdamW makes them), and params,
    states and state_dict() equal torch's."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    device = device_of(backend)
    placements = [(Shard(0),), (Replicate(),), (Shard(1),)]
    shapes = [(6, 5), (7,), (3, 4)]
    values = [torch.randn(s, device=device) for s in shapes]
    runs = []
    for cls, kwargs in ((fusedlm.optim.AdamW, {"backend": backend}),
                        (torch.optim.AdamW, {"foreach": False})):
        params = [torch.nn.Parameter(distribute_tensor(v.clone(), one_rank_mesh, p))
                  for v, p in zip(values, placements, strict=True)]
        opt = cls(params, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, **kwargs)
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            for p, v, pl in zip(params, values, placements, strict=True):
                grad = torch.randn(v.shape, generator=g).to(device)
                p.grad = distribute_tensor(grad, one_rank_mesh, pl)
            opt.step()
        runs.append((params, opt))
    (ours, ours_opt), (theirs, theirs_opt) = runs
    for p, q in zip(ours, theirs, strict=True):
        assert isinstance(p, DTensor) and p.placements == q.placements
        torch.testing.assert_close(p.full_tensor(), q.full_tensor(), rtol=1e-6, atol=1e-7)
        for key, value in theirs_opt.state[q].items():
            mine = ours_opt.state[p][key]
            assert type(mine) is type(value), key
            if isinstance(value, DTensor):
                assert mine.placements == value.placements, key
                mine, value = mine.full_tensor(), value.full_tensor()
            torch.testing.assert_close(mine, value, rtol=1e-6, atol=1e-9)
    sd_ours, sd_theirs = ours_opt.state_dict(), theirs_opt.state_dict()
    assert sd_ours["state"].keys() == sd_theirs["state"].keys()
