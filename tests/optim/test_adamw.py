"""fusedlm.optim.AdamW is a drop-in for torch.optim.AdamW: same signature and defaults, same
training trajectory, interchangeable state_dicts."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import fusedlm
from fusedlm.backends import OpDispatch
from tests.helpers import (
    assert_close_rule,
    available_backends,
    cpu_backend_available,
    cpu_unavailable_reason,
    device_of,
    refuse_host_reads,
)

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


def _assert_same_state(ours, theirs):
    """Optimizer states agree to 1e-5 relative, with an absolute floor of 1e-6 of the tensor's
    largest entry: the two runs' parameters differ in their last bits (different summation
    orders), so a gradient entry that is a cancellation of larger terms differs relatively by
    much more than its neighbours, by an amount that depends on the CPU's vector width."""
    for (key, a), (key_t, b) in zip(_state_tensors(ours), _state_tensors(theirs), strict=True):
        assert key == key_t
        scale = b.abs().max().item() if b.numel() and b.is_floating_point() else 0.0
        torch.testing.assert_close(
            a, b, rtol=1e-5, atol=max(1e-6 * scale, 1e-12),
            msg=lambda m, key=key: f"state {key}: {m}",
        )


# ---- signature ---------------------------------------------------------------------------------


def test_signature_and_defaults_are_torchs():
    ours = inspect.signature(fusedlm.optim.AdamW.__init__).parameters
    theirs = inspect.signature(torch.optim.AdamW.__init__).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    assert list(ours)[len(theirs) :] == ["backend", "master_weights"]
    for name, param in theirs.items():
        assert ours[name].default == param.default, name
        assert ours[name].kind == param.kind, name
    assert (
        ours["backend"].kind == inspect.Parameter.KEYWORD_ONLY and ours["backend"].default == "auto"
    )
    assert ours["master_weights"].kind == inspect.Parameter.KEYWORD_ONLY
    assert ours["master_weights"].default is False


def test_is_a_torch_adamw_with_torchs_defaults():
    model = _mlp("cpu")
    ours = fusedlm.optim.AdamW(model.parameters())
    theirs = torch.optim.AdamW(model.parameters())
    assert isinstance(ours, torch.optim.AdamW)
    assert {k: v for k, v in ours.defaults.items()
            if k not in ("backend", "master_weights")} == theirs.defaults


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
    _assert_same_state(ours, theirs)
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
    group_ours = {k: v for k, v in sd_ours["param_groups"][0].items()
                  if k not in ("backend", "master_weights")}
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_state_dict_round_trip_of_a_group_torch_runs(dtype):
    """differentiable=True groups run torch's own AdamW, whose states are in the param's dtype:
    loading a state_dict keeps them so (a float32 cast made the next step fail) and the run
    continues exactly as one never saved."""
    values = _mixed_params("cpu", dtype)
    grads_seq = _grad_seq(values, 4)
    ref, _ = _run(fusedlm.optim.AdamW, values, grads_seq, lr=1e-2, differentiable=True)
    params, opt = _run(fusedlm.optim.AdamW, values, grads_seq[:2], lr=1e-2, differentiable=True)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in params:
        assert opt.state[p]["exp_avg"].dtype == p.dtype
    _step_with(opt, params, grads_seq[2:])
    for p, q in zip(params, ref, strict=True):
        assert torch.equal(p, q)


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
        for model, opt, scaler in zip((ours_model, theirs_model), (ours, theirs), scalers,
                                      strict=True):
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

    monkeypatch.setattr(fusedlm.optim.adamw, "adamw_step", op)
    with monkeypatch.context() as m:
        refuse_host_reads(m)
        opt.step()
    (args, kwargs), = calls
    assert args[5] == [] and args[6] == 0.0  # no host steps, no host lr
    assert kwargs["lr_tensor"] is lr
    assert kwargs["step_tensor"].tolist() == [1.0] * len(list(model.parameters()))
    assert kwargs["grad_scale"] is opt.grad_scale and kwargs["found_inf"] is opt.found_inf
    assert float(opt.state[model[0].weight]["step"]) == 1.0



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [None, True], ids=["steps_on_host", "steps_on_device"])
@pytest.mark.parametrize("skip", [False, True], ids=["finite", "found-inf"])
def test_one_element_grad_scale_and_found_inf(skip, fused, backend):
    """grad_scale and found_inf of shape (1,) (as FSDP2's ShardedGradScaler makes them) act as
    the 0-dim ones GradScaler makes: the same params and step counts after the step, a skipped
    step leaving both as they were. (A (1,) found_inf against 0-dim step counts on the device
    once raised a broadcast error.)"""
    device = device_of(backend)
    models = [_mlp(device) for _ in range(2)]
    opts = [fusedlm.optim.AdamW(m.parameters(), lr=1e-2, fused=fused, backend=backend)
            for m in models]
    first = [p.detach().clone() for p in models[0].parameters()]
    x, y = _batches(1, device)[0]
    for opt, model, shape in zip(opts, models, [(), (1,)], strict=True):
        torch.nn.functional.mse_loss(model(x), y).mul(4.0).backward()
        opt.grad_scale = torch.full(shape, 4.0, device=device)
        opt.found_inf = torch.full(shape, float(skip), device=device)
        opt.step()
    _assert_same_params(*models, rtol=0, atol=0)
    steps = [float(opt.state[model[0].weight]["step"]) for opt, model in zip(opts, models,
                                                                              strict=True)]
    assert steps == [0.0 if skip else 1.0] * 2
    moved = any(not torch.equal(p, q) for p, q in zip(models[1].parameters(), first,
                                                       strict=True))
    assert moved is not skip


# ---- step counts on the host: one extension call per step, not one torch op per count --------


def _counts(dtype):
    return [torch.tensor(float(v), dtype=dtype) for v in (0, 1, 41)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_extension", [True, False], ids=["extension", "torch_ops"])
def test_increment_steps_adds_in_place_and_returns_the_counts(with_extension, dtype,
                                                               monkeypatch):
    """fusedlm.optim.adamw._increment_steps (fusedlm._C.increment_steps, or torch ops without a
    build) matches torch._foreach_add_ followed by host reads, bumps each count's version
    (float32/float64 counts are written through their pointer, bfloat16 ones by add_)."""
    if with_extension and not cpu_backend_available():
        pytest.skip(cpu_unavailable_reason())
    if not with_extension:
        monkeypatch.setattr(fusedlm._ext, "load", lambda: None)
    counts, expected = _counts(dtype), _counts(dtype)
    versions = [c._version for c in counts]
    torch._foreach_add_(expected, 1.0)
    assert fusedlm.optim.adamw._increment_steps(counts, 1.0) == [float(e) for e in expected]
    torch.testing.assert_close(counts, expected, rtol=0, atol=0)
    assert all(c._version > v for c, v in zip(counts, versions, strict=True))
    assert fusedlm.optim.adamw._increment_steps(counts, -1.0) == [0.0, 1.0, 41.0]


def test_increment_steps_names_a_count_that_is_not_one_element():
    if not cpu_backend_available():
        pytest.skip(cpu_unavailable_reason())
    counts = [torch.tensor(1.0), torch.zeros(2)]
    with pytest.raises(ValueError, match=r"steps\[1\].*one-element"):
        fusedlm._ext.load().increment_steps(counts, 1.0)


def test_default_step_updates_host_counts_without_a_torch_op_per_count(monkeypatch):
    """The default (non-fused) group keeps its counts on the CPU: a step increments and reads
    them in one extension call (a foreach op and a host read per count cost ~3 us each, most of
    a small model's step), and hands the kernel numbers, not a tensor."""
    if not cpu_backend_available():
        pytest.skip(cpu_unavailable_reason())
    model = _mlp("cpu")
    opt = fusedlm.optim.AdamW(model.parameters(), lr=1e-2, backend="cpu")
    x, y = _batches(1, "cpu")[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    calls = []
    real_op = fusedlm.optim.adamw.adamw_step
    monkeypatch.setattr(fusedlm.optim.adamw, "adamw_step",
                        lambda *a, **k: calls.append((a, k)) or real_op(*a, **k))

    def refuse(*args, **kwargs):
        raise AssertionError("a torch op per step count ran")

    with monkeypatch.context() as m:
        for name in ("_foreach_add_", "stack"):
            m.setattr(torch, name, refuse)
        m.setattr(torch.Tensor, "item", refuse)
        m.setattr(torch.Tensor, "__float__", refuse)
        opt.step()
    (args, kwargs), = calls
    n_params = len(list(model.parameters()))
    assert args[5] == [1.0] * n_params and "step_tensor" not in kwargs
    assert [float(opt.state[p]["step"]) for p in model.parameters()] == [1.0] * n_params


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
            # atol as for the params: where exp_avg's lerp cancels (m_old + w * (g - m_old)
            # much smaller than m_old), torch's fused multiply-add and the portable path's
            # separate multiply and add (FUSEDLM_CPU_ISA=generic) differ by ~1e-8.
            torch.testing.assert_close(mine, value, rtol=1e-6, atol=1e-7)
    sd_ours, sd_theirs = ours_opt.state_dict(), theirs_opt.state_dict()
    assert sd_ours["state"].keys() == sd_theirs["state"].keys()


# ---- master_weights: float32 masters of bfloat16/float16 params ---------------------------------

# The Triton kernel has no master weights (tests/ops/test_adamw.py checks that it refuses them).
MASTER_BACKENDS = [b for b in BACKENDS if b.id != "triton"]
MASTER_DTYPES = [torch.bfloat16, torch.float16]


def _mixed_params(device, dtype, shift=0.0, seed=0):
    """Values for two 16-bit params and one float32 param (which gets no master)."""
    g = torch.Generator().manual_seed(seed)
    values = [shift + torch.randn(s, generator=g) for s in ((7, 5), (33,), (4,))]
    return [v.to(device, dtype if i < 2 else torch.float32) for i, v in enumerate(values)]


def _grad_seq(params, n_steps, seed=1, mean=0.0):
    """Per-step grads in each param's dtype."""
    g = torch.Generator().manual_seed(seed)
    return [[(mean + torch.randn(p.shape, generator=g)).to(p.device, p.dtype) for p in params]
            for _ in range(n_steps)]


def _step_with(opt, params, grads_seq):
    for grads in grads_seq:
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad.clone()
        opt.step()


def _run(cls, values, grads_seq, dtype=None, **kwargs):
    """An optimizer of ``cls`` over copies of ``values`` (cast to ``dtype``), stepped over the
    grads (cast alike); returns the params and the optimizer."""
    params = [torch.nn.Parameter(v.detach().to(dtype or v.dtype).clone()) for v in values]
    grads_seq = [[g.to(dtype or g.dtype) for g in grads] for grads in grads_seq]
    opt = cls(params, **kwargs)
    _step_with(opt, params, grads_seq)
    return params, opt


@pytest.mark.parametrize("backend", MASTER_BACKENDS)
@pytest.mark.parametrize("dtype", MASTER_DTYPES, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_master_weights_follow_torch_float32(amsgrad, dtype, backend, monkeypatch):
    """bf16/fp16 params with master_weights=True: the float32 masters are torch.optim.AdamW's
    float32 run on float32 copies of the params (same grads), within the rule of tests/helpers
    (truth: float64); each 16-bit param is its master rounded; a float32 param has no master
    and matches torch's. Each step makes one op call with masters and one without."""
    device = device_of(backend)
    values = _mixed_params(device, dtype)
    grads_seq = _grad_seq(values, 6)
    hyper = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": amsgrad, "betas": (0.9, 0.99)}
    calls = []
    real_op = fusedlm.optim.adamw.adamw_step

    def op(*args, **kwargs):
        calls.append(args[14])  # master_params
        return real_op(*args, **kwargs)

    monkeypatch.setattr(fusedlm.optim.adamw, "adamw_step", op)
    ours, opt = _run(fusedlm.optim.AdamW, values, grads_seq, master_weights=True,
                     backend=backend, **hyper)
    monkeypatch.undo()
    assert OpDispatch.last_choice["adamw_step"] == backend
    assert len(calls) == 2 * len(grads_seq)
    assert sorted(len(c) for c in calls[:2]) == [0, 2]
    base, _ = _run(torch.optim.AdamW, values, grads_seq, torch.float32, foreach=False, **hyper)
    truth, _ = _run(torch.optim.AdamW, values, grads_seq, torch.float64, foreach=False, **hyper)
    for i, (p, b, t) in enumerate(zip(ours, base, truth, strict=True)):
        state = opt.state[p]
        if i == 2:
            assert p.dtype == torch.float32 and "master" not in state
            torch.testing.assert_close(p, b, rtol=1e-6, atol=1e-7)
            continue
        master = state["master"]
        assert master.dtype == torch.float32 and master.shape == p.shape
        assert state["exp_avg"].dtype == torch.float32
        assert_close_rule(master, b, t, name=f"master of param {i}")
        assert torch.equal(p.detach(), master.to(dtype)), f"param {i} is not its master rounded"
        assert not torch.equal(master, values[i].float())  # it moved


@pytest.mark.parametrize("backend", MASTER_BACKENDS)
@pytest.mark.parametrize("dtype", MASTER_DTYPES, ids=str)
def test_master_weights_keep_updates_below_the_params_resolution(dtype, backend):
    """lr 1e-5 on values near 1 (bf16's spacing there is 2^-7, fp16's 2^-10): every update is
    below half a unit, so without masters the 16-bit params never move and drift away from
    torch's float32 run; with masters the masters follow it."""
    device = device_of(backend)
    values = _mixed_params(device, dtype, shift=0.0)
    values = [(1.0 + 0.01 * v.float()).to(v.dtype) for v in values]  # near 1
    grads_seq = _grad_seq(values, 20, mean=1.0)  # mostly positive: the params walk one way
    hyper = {"lr": 1e-5, "weight_decay": 0.0}
    base, _ = _run(torch.optim.AdamW, values, grads_seq, torch.float32, foreach=False, **hyper)
    plain, _ = _run(fusedlm.optim.AdamW, values, grads_seq, backend=backend, **hyper)
    ours, opt = _run(fusedlm.optim.AdamW, values, grads_seq, backend=backend,
                     master_weights=True, **hyper)
    for i in range(2):
        moved = (base[i] - values[i].float()).abs().max().item()
        assert moved > 1e-4  # torch's float32 run moved by ~20 * lr
        # without masters: stuck at the start, off torch's run by all of its movement
        assert torch.equal(plain[i].detach(), values[i])
        assert (plain[i].float() - base[i]).abs().max().item() > 0.9 * moved
        # with masters: the master follows torch's float32 run
        master = opt.state[ours[i]]["master"]
        assert (master - base[i]).abs().max().item() < 1e-3 * moved
        torch.testing.assert_close(master, base[i].detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(ours[i].detach(), master.to(dtype))


@pytest.mark.parametrize("backend", MASTER_BACKENDS)
@pytest.mark.parametrize("dtype", MASTER_DTYPES, ids=str)
@pytest.mark.parametrize("fused", [None, True], ids=["steps_on_host", "steps_on_device"])
def test_master_weights_state_dict_round_trip_continues_exactly(fused, dtype, backend):
    """Save after 3 steps, load into a fresh optimizer over copies of the params, 3 more steps:
    params, masters and states are bit-identical to an uninterrupted run; the saved masters are
    float32 (torch's load would round them to the params' dtype)."""
    device = device_of(backend)
    values = _mixed_params(device, dtype)
    grads_seq = _grad_seq(values, 6)
    kwargs = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True, "fused": fused,
              "backend": backend, "master_weights": True}
    ref, ref_opt = _run(fusedlm.optim.AdamW, values, grads_seq, **kwargs)
    params, opt = _run(fusedlm.optim.AdamW, values, grads_seq[:3], **kwargs)
    saved = copy.deepcopy(opt.state_dict())
    for i in range(2):
        assert saved["state"][i]["master"].dtype == torch.float32
        assert torch.equal(saved["state"][i]["master"], opt.state[params[i]]["master"])
    assert "master" not in saved["state"][2]
    assert all(g["master_weights"] is True for g in saved["param_groups"])
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = fusedlm.optim.AdamW(resumed, **kwargs)
    opt2.load_state_dict(saved)
    for p in resumed[:2]:
        assert opt2.state[p]["master"].dtype == torch.float32
    _step_with(opt2, resumed, grads_seq[3:])
    for p, q in zip(resumed, ref, strict=True):
        assert torch.equal(p, q)
        mine, theirs = opt2.state[p], ref_opt.state[q]
        assert mine.keys() == theirs.keys()
        for key in theirs:
            assert mine[key].dtype == theirs[key].dtype, key
            assert torch.equal(mine[key], theirs[key]), key


@pytest.mark.parametrize("backend", MASTER_BACKENDS)
def test_master_weights_from_a_state_dict_without_masters(backend):
    """A state_dict of torch.optim.AdamW (or of master_weights=False) has no masters: loading it
    with master_weights=True makes them from the params; the run then continues as a float32
    torch run from the params' values would (states float32)."""
    device = device_of(backend)
    values = _mixed_params(device, torch.bfloat16)
    grads_seq = _grad_seq(values, 4)
    theirs, theirs_opt = _run(torch.optim.AdamW, values, grads_seq[:2], lr=1e-2)
    params = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    opt = fusedlm.optim.AdamW(params, lr=1e-2, backend=backend, master_weights=True)
    opt.load_state_dict(copy.deepcopy(theirs_opt.state_dict()))
    for p in params[:2]:
        state = opt.state[p]
        assert state["master"].dtype == torch.float32
        assert torch.equal(state["master"], p.detach().float())
        assert state["exp_avg"].dtype == torch.float32
    assert "master" not in opt.state[params[2]]
    _step_with(opt, params, grads_seq[2:])
    for p in params[:2]:
        assert torch.equal(p.detach(), opt.state[p]["master"].bfloat16())
    # and the other way: a state_dict with masters loaded with master_weights=False groups drops
    # them (the saved groups say True: torch's load takes the hyperparameters from the saved
    # groups, so the flag is switched off after loading here)
    plain = fusedlm.optim.AdamW(params, lr=1e-2, backend=backend)
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        group["master_weights"] = False
    plain.load_state_dict(sd)
    assert all("master" not in plain.state[p] for p in params)


@pytest.mark.parametrize("backend", MASTER_BACKENDS)
@pytest.mark.parametrize("fused", [None, True], ids=["steps_on_host", "steps_on_device"])
def test_master_weights_with_grad_scaler(fused, backend):
    """GradScaler with bf16 params and masters: the step with found_inf leaves masters, params
    and states unchanged and does not count; the others match a run without the scaler (the
    scale is a power of two: unscaling is exact)."""
    device = device_of(backend)
    models = [_mlp(device, torch.bfloat16) for _ in range(2)]
    opts = [fusedlm.optim.AdamW(m.parameters(), lr=1e-2, fused=fused, backend=backend,
                                master_weights=True) for m in models]
    batches = [(x.bfloat16(), y.bfloat16()) for x, y in _batches(4, device)]
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    snapshots = []

    def snapshot():
        return [(p.detach().clone(), {k: v.clone() for k, v in opts[0].state[p].items()})
                for p in models[0].parameters()]

    for step, (x, y) in enumerate(batches):
        opts[0].zero_grad()
        loss = torch.nn.functional.mse_loss(models[0](x).float(), y.float())
        if step == 2:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        before = snapshot() if step == 2 else None
        scaler.step(opts[0])
        scaler.update()
        if step == 2:
            snapshots = (before, snapshot())
    (before, after) = snapshots
    for (p0, s0), (p1, s1) in zip(before, after, strict=True):
        assert torch.equal(p0, p1)
        assert s0.keys() == s1.keys() and "master" in s1
        for key in s0:
            assert torch.equal(s0[key], s1[key]), key
    weight = models[0][0].weight
    assert float(opts[0].state[weight]["step"]) == 3.0
    # the same steps without the scaler (and without the skipped batch)
    _train(models[1], opts[1], [b for i, b in enumerate(batches) if i != 2])
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(opts[0].state[p]["master"], opts[1].state[q]["master"],
                                   rtol=1e-6, atol=1e-7)
        assert torch.equal(p.detach(), opts[0].state[p]["master"].bfloat16())


def test_master_weights_refused_with_capturable_or_differentiable():
    model = _mlp("cpu", torch.bfloat16)
    for kwargs in ({"capturable": True}, {"differentiable": True}):
        with pytest.raises(ValueError, match="master_weights"):
            fusedlm.optim.AdamW(model.parameters(), master_weights=True, **kwargs)


@pytest.mark.parametrize("backend", MASTER_BACKENDS)
def test_master_weights_dtensor_params(backend, one_rank_mesh):
    """bf16 DTensor params: the masters are DTensors laid out like the params and follow torch's
    float32 run on float32 DTensors."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    device = device_of(backend)
    placements = [(Shard(0),), (Replicate(),)]
    values = [torch.randn(6, 5, device=device), torch.randn(7, device=device)]
    runs = []
    for cls, dtype, kwargs in ((fusedlm.optim.AdamW, torch.bfloat16,
                                {"backend": backend, "master_weights": True}),
                               (torch.optim.AdamW, torch.float32, {"foreach": False})):
        params = [torch.nn.Parameter(distribute_tensor(v.to(torch.bfloat16).to(dtype),
                                                       one_rank_mesh, pl))
                  for v, pl in zip(values, placements, strict=True)]
        opt = cls(params, lr=1e-2, weight_decay=0.1, **kwargs)
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            for p, v, pl in zip(params, values, placements, strict=True):
                grad = torch.randn(v.shape, generator=g).to(device, torch.bfloat16).to(dtype)
                p.grad = distribute_tensor(grad, one_rank_mesh, pl)
            opt.step()
        runs.append((params, opt))
    (ours, opt), (theirs, _) = runs
    for p, q in zip(ours, theirs, strict=True):
        master = opt.state[p]["master"]
        assert isinstance(master, DTensor) and master.placements == p.placements
        assert master.dtype == torch.float32
        torch.testing.assert_close(master.full_tensor(), q.full_tensor(), rtol=1e-6, atol=1e-7)
        assert torch.equal(p.full_tensor(), master.full_tensor().bfloat16())
