"""fusedlm.cross_entropy and the custom ops behind it, against torch's F.cross_entropy (truth:
float64; baseline: torch at the input's dtype). The Triton kernels' own cases (chunked rows,
odd vocabularies, interpreter runs) are in tests/triton/test_cross_entropy.py."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
import torch.nn.functional as F

import fusedlm
from fusedlm.backends import BackendNotSupportedError, OpDispatch
from tests.helpers import DTYPES, assert_close_rule, device_of, kernel_backends

ce_ops = importlib.import_module("fusedlm.ops.cross_entropy")  # (fusedlm.ops.cross_entropy is
# also the function's name)
# The C++ kernels take CPU tensors, the Triton ones CUDA tensors (there is no CUDA C++ kernel).
BACKENDS = [*kernel_backends(), pytest.param("triton", marks=pytest.mark.gpu, id="triton"),
            "torch"]
REDUCTIONS = ["mean", "sum", "none"]
# (N, V): one row, one class, odd sizes, a vocabulary past one 4096-column chunk.
SHAPES = [(1, 1), (1, 7), (17, 127), (113, 64), (5, 4099)]


def make_inputs(N, V, dtype, device, ignore_every=0, ignore_index=-100, scale=3.0):
    """logits (N, V) ~ scale * N(0, 1) as a leaf in ``dtype``, targets (N) in [0, V) with every
    ``ignore_every``-th one (from the first) set to ignore_index."""
    logits = (scale * torch.randn(N, V, dtype=torch.float64)).to(device, dtype)
    target = torch.randint(0, V, (N,), device=device)
    if ignore_every:
        target[::ignore_every] = ignore_index
    return logits.requires_grad_(True), target


def torch_cross_entropy(x, target, reduction="mean", label_smoothing=0.0, ignore_index=-100,
                        z_loss=0.0):
    """torch's cross_entropy of x, plus ``z_loss * logsumexp**2`` on each row not ignored (in
    x's dtype, reduced as the loss), written out in torch ops: the z-loss tests' truth."""
    loss = F.cross_entropy(x, target, reduction=reduction, label_smoothing=label_smoothing,
                           ignore_index=ignore_index)
    if not z_loss:
        return loss
    valid = target != ignore_index
    part = torch.where(valid, z_loss * torch.logsumexp(x, dim=1).square(), 0.0)
    if reduction == "none":
        return loss + part
    return loss + (part.sum() if reduction == "sum" else part.sum() / valid.sum())


def check_cross_entropy(logits, target, backend, reduction="mean", label_smoothing=0.0,
                        ignore_index=-100, backward=True, z_loss=0.0):
    """Loss and (optionally) dlogits of fusedlm.cross_entropy vs torch's, by the rule."""
    kwargs = dict(reduction=reduction, label_smoothing=label_smoothing,
                  ignore_index=ignore_index)
    x = logits.detach().clone().requires_grad_(True)
    extra = {"z_loss": z_loss} if z_loss else {}
    loss = fusedlm.cross_entropy(x, target, backend=backend, **kwargs, **extra)
    x64 = logits.detach().double().requires_grad_(True)
    truth = torch_cross_entropy(x64, target, **kwargs, z_loss=z_loss)
    xt = logits.detach().clone().requires_grad_(True)
    baseline = torch_cross_entropy(xt, target, **kwargs, z_loss=z_loss)
    assert loss.dtype == baseline.dtype and loss.shape == baseline.shape
    assert_close_rule(loss, baseline, truth, name="loss")
    if not backward:
        return
    grad = torch.randn_like(truth) if reduction == "none" else torch.ones_like(truth)
    (dx,) = torch.autograd.grad(loss, x, grad.to(loss.dtype))
    (dx64,) = torch.autograd.grad(truth, x64, grad)
    (dxt,) = torch.autograd.grad(baseline, xt, grad.to(baseline.dtype))
    assert dx.dtype == logits.dtype and dx.shape == logits.shape
    assert_close_rule(dx, dxt, dx64, name="dlogits")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("N", "V"), SHAPES, ids=[f"{n}x{v}" for n, v in SHAPES])
def test_cross_entropy(N, V, reduction, dtype, backend):
    logits, target = make_inputs(N, V, dtype, device_of(backend), ignore_every=3)
    check_cross_entropy(logits, target, backend, reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.1, 1.0])
def test_label_smoothing(label_smoothing, reduction, dtype, backend):
    logits, target = make_inputs(29, 300, dtype, device_of(backend), ignore_every=4)
    check_cross_entropy(logits, target, backend, reduction, label_smoothing)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("z_loss", [1e-4, 0.25])
@pytest.mark.parametrize(("N", "V"), [(29, 300), (5, 4099)], ids=["29x300", "5x4099"])
def test_z_loss(N, V, z_loss, label_smoothing, reduction, dtype, backend):
    """PaLM's z-loss inside the kernels: the usual weight, and one large enough that a wrong
    gradient scale cannot hide under the tolerance; logits offset so logsumexp is far from 0."""
    logits, target = make_inputs(N, V, dtype, device_of(backend), ignore_every=4)
    logits = (logits.detach() + 4.0).requires_grad_(True)
    check_cross_entropy(logits, target, backend, reduction, label_smoothing, z_loss=z_loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_return_z_loss_gives_the_term_the_loss_holds(reduction, backend):
    logits, target = make_inputs(23, 50, torch.float32, device_of(backend), ignore_every=3)
    loss, part = fusedlm.cross_entropy(logits, target, reduction=reduction, backend=backend,
                                       z_loss=0.01, return_z_loss=True)
    assert loss.requires_grad and not part.requires_grad and part.shape == loss.shape
    plain = fusedlm.cross_entropy(logits, target, reduction=reduction, backend=backend)
    torch.testing.assert_close(loss - part, plain)
    expected = torch_cross_entropy(logits.detach().double(), target, reduction, z_loss=0.01)
    torch.testing.assert_close(part.double(), expected - torch_cross_entropy(
        logits.detach().double(), target, reduction))
    if reduction == "none":
        assert torch.equal(part[::3], torch.zeros_like(part[::3]))  # ignored rows
    loss, part = fusedlm.cross_entropy(logits, target, reduction=reduction, backend=backend,
                                       return_z_loss=True)  # (z_loss 0: the part is 0)
    assert torch.equal(loss, plain) and torch.equal(part, torch.zeros_like(part))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [5.0, -11.3, 0.0], ids=["positive", "negative", "zero"])
def test_label_smoothing_over_a_wide_row_of_equal_logits(offset, backend):
    """The smoothing term's mean logit over 32768 (near-)equal logits: a float32 running sum
    of them drifted 4.4e-4 in the loss, 860x torch's error (found by test_fuzz's long run)."""
    logits = torch.full((2, 32768), offset, dtype=torch.float64)
    logits[1] += 1e-3 * torch.randn(32768, dtype=torch.float64)  # near-equal
    logits = logits.float().to(device_of(backend)).requires_grad_(True)
    target = torch.tensor([1, 32767], device=logits.device)
    for label_smoothing in (1.0, 0.1):
        check_cross_entropy(logits, target, backend, "none", label_smoothing)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-1, 0, 5])
def test_ignore_index_is_any_value(ignore_index, backend):
    """GPT's -1, and ignore_index values that are also class indices (their rows are ignored)."""
    logits, target = make_inputs(40, 9, torch.float32, device_of(backend))
    target[::2] = ignore_index
    check_cross_entropy(logits, target, backend, ignore_index=ignore_index)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_target_ignored_gives_torchs_nan_mean_and_zero_grads(backend):
    logits, target = make_inputs(6, 11, torch.float32, device_of(backend))
    target.fill_(-100)
    loss = fusedlm.cross_entropy(logits, target, backend=backend)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits, target))
    total = fusedlm.cross_entropy(logits, target, reduction="sum", backend=backend)
    assert total.item() == 0.0
    (dx,) = torch.autograd.grad(total, logits)
    assert torch.equal(dx, torch.zeros_like(dx))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_into_out_and_over_the_logits(dtype, backend):
    """The backward's ``out``: a separate buffer, or the logits themselves (what
    fusedlm.linear_cross_entropy does with each chunk), gives the same gradient as a fresh
    one; a V past one 4096-column kernel chunk, ignored rows, an expanded scalar gradient."""
    logits, target = make_inputs(37, 4099, dtype, device_of(backend), ignore_every=3)
    logits = logits.detach()
    _, row_max, log_sum = ce_ops._cross_entropy_fwd(logits, target, -100, 0.1, backend)
    grad = torch.tensor(0.25, device=logits.device).expand(37)
    expected = ce_ops._cross_entropy_bwd(grad, logits, target, row_max, log_sum, -100, 0.1,
                                         backend)
    out = torch.full_like(logits, float("nan"))
    assert ce_ops._cross_entropy_bwd(grad, logits, target, row_max, log_sum, -100, 0.1, backend,
                                     out=out) is out
    assert torch.equal(out, expected)
    in_place = logits.clone()
    result = ce_ops._cross_entropy_bwd(grad, in_place, target, row_max, log_sum, -100, 0.1,
                                       backend, out=in_place)
    assert result.data_ptr() == in_place.data_ptr() and torch.equal(in_place, expected)


def test_reference_backward_checks_out():
    logits, target = make_inputs(3, 8, torch.float32, "cpu")
    logits = logits.detach()
    stats = fusedlm.reference.cross_entropy_fwd(logits, target, -100, 0.0)[1:]
    call = fusedlm.reference.cross_entropy_bwd
    for out, message in [(torch.empty(3, 9), "argument 'out' must be a contiguous"),
                         (torch.empty(8, 3).t(), "argument 'out' must be a contiguous"),
                         (logits.double(), "argument 'out' must be a contiguous")]:
        with pytest.raises(ValueError, match=message):
            call(torch.ones(3), logits, target, *stats, -100, 0.0, out=out)
    base = torch.randn(4, 8)
    with pytest.raises(ValueError, match="'out' must be the logits themselves or not overlap"):
        call(torch.ones(3), base[:3], target, *stats, -100, 0.0, out=base[1:])
    # apart (other rows of the same buffer), and no rows at all: accepted
    rows = torch.randn(6, 8)
    out = call(torch.ones(3), rows[:3], target, *stats, -100, 0.0, out=rows[3:])
    assert torch.equal(out, call(torch.ones(3), rows[:3], target, *stats, -100, 0.0))
    empty = torch.empty(0, 8)
    assert call(torch.ones(0), empty, target[:0], stats[0][:0], stats[1][:0], -100, 0.0,
                out=torch.empty(0, 8)).shape == (0, 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "row_stride", "column_stride"])
def test_non_contiguous_logits(layout, backend):
    device = device_of(backend)
    base = 3 * torch.randn(130, 70, device=device)
    views = {"transposed": base.t(), "row_stride": base[::2], "column_stride": base[:, ::2]}
    logits = views[layout]
    target = torch.randint(0, logits.shape[1], (logits.shape[0],), device=device)
    assert not logits.is_contiguous()
    check_cross_entropy(logits.requires_grad_(True), target, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_infinite_and_nan_logits_like_torch(dtype, backend):
    """-inf logits (a masked vocabulary) keep finite losses where torch's are; +inf and NaN
    give NaN where torch's do; an ignored row stays 0 and its gradient exactly 0."""
    device = device_of(backend)
    logits = 2 * torch.randn(5, 16, dtype=torch.float64)
    logits[0, 3:] = float("-inf")  # target 1 among the finite ones
    logits[1, 5] = float("inf")
    logits[2, 7] = float("nan")
    logits[3, :] = float("-inf")
    logits = logits.to(device, dtype).requires_grad_(True)
    target = torch.tensor([1, 2, 3, 4, 0], device=device)
    target_ignoring_bad = target.clone()
    target_ignoring_bad[1:4] = -100
    for t in (target, target_ignoring_bad):
        loss = fusedlm.cross_entropy(logits, t, reduction="none", backend=backend)
        expected = F.cross_entropy(logits.detach().double(), t, reduction="none")
        assert torch.equal(loss.isnan(), expected.isnan()), (loss, expected)
        finite = torch.isfinite(expected)
        torch.testing.assert_close(loss[finite].double(), expected[finite], atol=2e-3, rtol=2e-3)
    loss = fusedlm.cross_entropy(logits, target_ignoring_bad, reduction="sum", backend=backend)
    (dx,) = torch.autograd.grad(loss, logits)
    assert torch.equal(dx[1:4], torch.zeros_like(dx[1:4]))
    assert torch.isfinite(dx).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_out_of_range_raises(backend):
    logits, target = make_inputs(4, 10, torch.float32, device_of(backend))
    for bad in (10, -2):
        target[1] = bad
        # (IndexError from the C++ CPU kernel, as torch's own; RuntimeError from the assert)
        with pytest.raises((IndexError, RuntimeError),
                           match="argument 'target' holds a class index outside"):
            fusedlm.cross_entropy(logits, target, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_rows_with_out_of_range_targets_are_nan(backend):
    """The ops themselves (no public check) never read out of bounds for such a target: the
    C++ CPU kernel raises, the Triton kernels and the reference mark the row NaN (the
    guarantee where a GPU's device-side assert is compiled out)."""
    device = device_of(backend)
    logits = torch.randn(3, 8, device=device)
    target = torch.tensor([2, 8, -100], device=device)
    if backend == "cpu":
        with pytest.raises(IndexError, match="8 at row 1"):
            torch.ops.fusedlm.cross_entropy_fwd(logits, target, -100, 0.0, backend)
        return
    loss, row_max, log_sum = torch.ops.fusedlm.cross_entropy_fwd(logits, target, -100, 0.0,
                                                                 backend)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1]) and loss[2].item() == 0.0
    dx = torch.ops.fusedlm.cross_entropy_bwd(torch.ones(3, device=device), logits, target,
                                             row_max, log_sum, -100, 0.0, backend)
    assert torch.isfinite(dx[0]).all() and torch.isnan(dx[1]).all()
    assert torch.equal(dx[2], torch.zeros_like(dx[2]))


# ---- what goes to torch's function ------------------------------------------------------------

FALLBACKS = {
    "class weights": lambda x, t: dict(input=x, target=t, weight=torch.rand(x.shape[1])),
    "probability targets": lambda x, t: dict(input=x, target=torch.softmax(torch.randn_like(x), 1)),
    "(N, C, d) input": lambda x, t: dict(input=x.view(3, 5, 4), target=t.view(3, 4).remainder(5)),
    "(C) input": lambda x, t: dict(input=x[0], target=t[0].remainder(x.shape[1])),
    "int32 targets": lambda x, t: dict(input=x, target=t.int()),
    "deprecated reduce": lambda x, t: dict(input=x, target=t, reduce=False),
    "label_smoothing > 1": lambda x, t: dict(input=x, target=t, label_smoothing=1.5),
    "empty input": lambda x, t: dict(input=x[:0], target=t[:0]),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_calls_the_kernels_cannot_take_are_torchs_own(case):
    """Outputs, gradients and errors are exactly F.cross_entropy's, whatever the backend."""
    x = torch.randn(12, 5, requires_grad=True)
    t = torch.randint(0, 5, (12,))
    kwargs = FALLBACKS[case](x, t)
    try:
        expected = F.cross_entropy(**kwargs)
    except Exception as error:
        with pytest.raises(type(error)):
            fusedlm.cross_entropy(**kwargs, backend="torch")
        return
    for backend in ("auto", "torch"):
        out = fusedlm.cross_entropy(**kwargs, backend=backend)
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


def test_auto_on_cpu_takes_the_cpu_kernels(caplog):
    logits, target = make_inputs(8, 10, torch.float32, "cpu")
    OpDispatch.last_choice.pop("cross_entropy_fwd", None)
    loss = fusedlm.cross_entropy(logits, target)
    loss.backward()
    expected = "cpu" if fusedlm.backends()["cpu"].available else None
    assert OpDispatch.last_choice.get("cross_entropy_fwd") == expected


def test_calls_the_auto_choice_gives_the_reference_are_torchs_own(monkeypatch, caplog):
    """Where "auto" finds no kernel (no extension here), F.cross_entropy itself serves: faster
    than the reference, and exactly torch's."""
    monkeypatch.setattr(ce_ops.CROSS_ENTROPY_FWD, "auto_choice", lambda *args: "torch")
    logits, target = make_inputs(8, 10, torch.float32, "cpu")
    ce_ops._fallback_logged.clear()
    OpDispatch.last_choice.pop("cross_entropy_fwd", None)
    with caplog.at_level(logging.INFO, logger="fusedlm"):
        out = fusedlm.cross_entropy(logits, target)
    assert torch.equal(out, F.cross_entropy(logits, target))
    assert "cross_entropy_fwd" not in OpDispatch.last_choice
    assert "no fusedlm kernel backend" in caplog.text


def test_named_backend_that_cannot_serve_raises():
    logits, target = make_inputs(4, 10, torch.float32, "cpu")
    with pytest.raises(BackendNotSupportedError,
                       match="asks for backend 'cuda', which cannot serve this call"):
        fusedlm.cross_entropy(logits, target, backend="cuda")
    with pytest.raises(ValueError, match="argument 'backend'"):
        fusedlm.cross_entropy(logits, target, backend="fast")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_gives_a_float32_loss_like_torch(dtype):
    logits, target = make_inputs(9, 33, dtype, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fusedlm.cross_entropy(logits, target, backend="torch")
        expected = F.cross_entropy(logits, target)
    assert loss.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    (dx,) = torch.autograd.grad(loss, logits)
    assert dx.dtype == dtype


@pytest.mark.parametrize("backend", [*kernel_backends(), "torch"])
def test_gradcheck_float64(backend):
    logits, target = make_inputs(7, 6, torch.float64, "cpu", ignore_every=3)
    for reduction in REDUCTIONS:
        for smoothing, z_loss in ((0.0, 0.0), (0.3, 0.0), (0.0, 0.2), (0.3, 0.2)):
            torch.autograd.gradcheck(
                lambda x, r=reduction, s=smoothing, z=z_loss: fusedlm.cross_entropy(
                    x, target, reduction=r, label_smoothing=s, backend=backend, z_loss=z),
                (logits,))


@pytest.mark.parametrize("backend", [*kernel_backends(), "torch"])
def test_opcheck(backend):
    logits, target = make_inputs(7, 13, torch.float32, "cpu", ignore_every=3)
    logits = logits.detach().requires_grad_(True)
    torch.library.opcheck(torch.ops.fusedlm.cross_entropy_fwd,
                          (logits, target, -100, 0.1, backend))
    _, row_max, log_sum = torch.ops.fusedlm.cross_entropy_fwd(logits.detach(), target, -100, 0.1,
                                                              backend)
    torch.library.opcheck(torch.ops.fusedlm.cross_entropy_bwd,
                          (torch.ones(7), logits.detach(), target, row_max, log_sum, -100, 0.1,
                           backend))
    torch.library.opcheck(torch.ops.fusedlm.cross_entropy_fwd,
                          (logits, target, -100, 0.1, backend, 1e-3))
    torch.library.opcheck(torch.ops.fusedlm.cross_entropy_bwd,
                          (torch.ones(7), logits.detach(), target, row_max, log_sum, -100, 0.1,
                           backend, 1e-3))


@pytest.mark.parametrize("z_loss", [0.0, 0.05])
def test_torch_compile_fullgraph(z_loss):
    logits, target = make_inputs(10, 17, torch.float32, "cpu", ignore_every=4)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(x, t):
        return fusedlm.cross_entropy(x, t, label_smoothing=0.1, backend="torch", z_loss=z_loss,
                                     return_z_loss=True)

    x = logits.detach().clone().requires_grad_(True)
    loss, part = loss_fn(x, target)
    loss.backward()
    xr = logits.detach().clone().requires_grad_(True)
    expected = torch_cross_entropy(xr, target, label_smoothing=0.1, z_loss=z_loss)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(part, expected.detach() - F.cross_entropy(
        logits.detach(), target, label_smoothing=0.1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_language_model_loss_is_float32_from_bf16_logits(backend, reduction):
    """The training loss (GPT, the transformers losses): float32 whatever the logits' width,
    torch's on a float32 copy where no kernel serves ("auto" on CPU), else the op's."""
    logits, target = make_inputs(40, 77, torch.bfloat16, "cpu", ignore_every=5)
    loss = ce_ops.language_model_loss(logits, target, reduction=reduction, backend=backend)
    expected = F.cross_entropy(logits.float(), target, reduction=reduction)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)
    if backend == "auto":
        assert torch.equal(loss, expected)
    with pytest.raises(ValueError, match="argument 'reduction'"):
        ce_ops.language_model_loss(logits, target, reduction="none")


def test_torch_func_transforms_run_the_reference():
    """vmap/grad run the reference (the kernels have no batching rule); there a target outside
    [0, V) gives its row NaN (vmap has no batching rule for the device-side assert either)."""
    logits, target = make_inputs(6, 9, torch.float64, "cpu", ignore_every=4)
    per_row = torch.func.vmap(
        lambda x, t: fusedlm.cross_entropy(x[None], t[None], reduction="sum"))(logits, target)
    expected = F.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(per_row, expected)
    grad = torch.func.grad(lambda x: fusedlm.cross_entropy(x, target))(logits.detach())
    torch.testing.assert_close(
        grad, torch.autograd.grad(F.cross_entropy(logits, target), logits)[0])
    bad = target.clone()
    bad[1] = 9
    rows = torch.func.vmap(  # (named: "auto" without the extension would run torch's own)
        lambda x, t: fusedlm.cross_entropy(x[None], t[None], reduction="sum", backend="torch"))(
            logits, bad)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2, 3, 5]]).all()


def test_language_model_loss_takes_torchs_path_where_the_forced_backend_has_no_kernel(
        monkeypatch, caplog):
    """FUSEDLM_BACKEND=cuda (no CUDA C++ cross-entropy; here: no GPU either) must not stop a
    model from training: the loss takes torch's float32 path and says so once; an explicit
    fusedlm.cross_entropy(backend="cuda") still raises."""
    logits, target = make_inputs(12, 30, torch.bfloat16, "cpu", ignore_every=5)
    monkeypatch.setenv("FUSEDLM_BACKEND", "cuda")
    ce_ops._fallback_logged.clear()
    with caplog.at_level(logging.INFO, logger="fusedlm"):
        loss = ce_ops.language_model_loss(logits, target)
    assert torch.equal(loss, F.cross_entropy(logits.float(), target))
    assert "backend 'cuda' cannot serve it" in caplog.text
    with pytest.raises(BackendNotSupportedError):
        fusedlm.cross_entropy(logits, target)


# ---- the z-loss's arguments and paths -----------------------------------------------------------


@pytest.mark.parametrize("z_loss", [-1e-4, float("nan"), float("inf"), True, "1e-4", None])
def test_bad_z_loss_raises_naming_it(z_loss):
    logits, target = make_inputs(4, 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="argument 'z_loss' must be a finite number >= 0"):
        fusedlm.cross_entropy(logits, target, z_loss=z_loss)
    with pytest.raises(ValueError, match="argument 'z_loss'"):
        ce_ops.language_model_loss(logits, target, z_loss=z_loss)


def test_bad_return_z_loss_raises_naming_it():
    logits, target = make_inputs(4, 10, torch.float32, "cpu")
    with pytest.raises(TypeError, match="argument 'return_z_loss' must be a bool"):
        fusedlm.cross_entropy(logits, target, z_loss=0.1, return_z_loss=1)


@pytest.mark.parametrize("case", ["class weights", "probability targets", "(N, C, d) input",
                                  "deprecated reduce"])
def test_z_loss_where_the_kernels_cannot_take_the_call_raises(case):
    """torch's function has no z-loss: a call only it could serve says so rather than
    silently dropping the term."""
    x = torch.randn(12, 5, requires_grad=True)
    t = torch.randint(0, 5, (12,))
    with pytest.raises(ValueError, match=r"argument 'z_loss' .* this call has"):
        fusedlm.cross_entropy(**FALLBACKS[case](x, t), z_loss=1e-4)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_z_loss_of_an_empty_batch_is_torchs(reduction):
    """No rows: torch's function (the kernels take no empty call) and a z part of the same
    shape: NaN for "mean" (0/0, as torch), 0 for "sum", empty for "none"."""
    logits = torch.randn(0, 7, requires_grad=True)
    target = torch.zeros(0, dtype=torch.int64)
    loss, part = fusedlm.cross_entropy(logits, target, reduction=reduction, z_loss=0.1,
                                       return_z_loss=True)
    expected = F.cross_entropy(logits, target, reduction=reduction)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    assert part.shape == loss.shape and not part.requires_grad
    torch.testing.assert_close(part, expected.detach(), equal_nan=True)  # (0, NaN or empty)


def test_z_loss_where_auto_would_pick_torchs_function_runs_the_op(monkeypatch):
    """Where "auto" finds no kernel, a z-loss call runs the op on the torch reference (which
    has the term) instead of F.cross_entropy (which has not)."""
    monkeypatch.setattr(ce_ops.CROSS_ENTROPY_FWD, "auto_choice", lambda *args: "torch")
    logits, target = make_inputs(8, 10, torch.float64, "cpu", ignore_every=3)
    loss = fusedlm.cross_entropy(logits, target, z_loss=0.1)
    torch.testing.assert_close(loss, torch_cross_entropy(logits, target, z_loss=0.1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_language_model_loss_z_loss_on_both_paths(monkeypatch, reduction):
    """The kernels' path and torch's float32 path (a forced backend without a kernel) give the
    same loss, z part and gradient."""
    logits, target = make_inputs(30, 64, torch.bfloat16, "cpu", ignore_every=5)
    results = []
    for backend in ("torch", "cuda"):  # (cuda: no kernel for CPU tensors -> torch's path)
        monkeypatch.setenv("FUSEDLM_BACKEND", backend)
        x = logits.detach().clone().requires_grad_(True)
        loss, part = ce_ops.language_model_loss(x, target, reduction=reduction, z_loss=0.02,
                                                return_z_loss=True)
        assert loss.dtype == part.dtype == torch.float32 and not part.requires_grad
        (dx,) = torch.autograd.grad(loss, x)
        results.append((loss, part, dx.float()))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    expected = torch_cross_entropy(logits.detach().double(), target, reduction, z_loss=0.02)
    torch.testing.assert_close(results[0][0].double(), expected, rtol=1e-5, atol=1e-5)


def test_z_loss_modules():
    logits, target = make_inputs(9, 21, torch.float32, "cpu", ignore_every=4)
    module = fusedlm.nn.CrossEntropyLoss(z_loss=0.1, return_z_loss=True)
    loss, part = module(logits, target)
    torch.testing.assert_close(loss, torch_cross_entropy(logits, target, z_loss=0.1))
    torch.testing.assert_close(loss - part, F.cross_entropy(logits, target))
