"""fusedlm.linear_cross_entropy and the custom ops behind it, against torch's
F.cross_entropy(F.linear(...)) (truth: float64; baseline: what eager training code computes at
the input's dtype, the logits upcast for the loss). The chunking is checked directly: no op
ever makes a tensor the size of the (N, V) logits."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fusedlm
from fusedlm.backends import BackendNotSupportedError
from tests.helpers import DTYPES, assert_close_rule, device_of, kernel_backends
from tests.ops.test_cross_entropy import torch_cross_entropy

lce_ops = importlib.import_module("fusedlm.ops.linear_cross_entropy")

BACKENDS = [*kernel_backends(), pytest.param("triton", marks=pytest.mark.gpu, id="triton"),
            "torch"]
REDUCTIONS = ["mean", "sum", "none"]
# (N, C, V, chunk_size, bias): one row and one class, chunks of one row, a ragged last chunk,
# chunks that divide N, a vocabulary past one 4096-column kernel chunk, the default chunking.
SHAPES = [
    (1, 1, 1, None, False),
    (17, 8, 127, 5, True),
    (37, 72, 300, 1, False),
    (113, 40, 64, None, True),
    (64, 16, 4099, 16, False),
]


def stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_head(N, C, V, dtype, device, bias=False, ignore_every=0, ignore_index=-100,
              leading=None):
    """input (N, C) ~ N(0, 1), weight (V, C) ~ N(0, 9 / C) (logits ~ N(0, 9)), bias (V) or
    None, as leaves in ``dtype``; target (N) in [0, V) with every ``ignore_every``-th one set
    to ignore_index. ``leading`` reshapes input and target to leading + (C,) / leading."""
    input = torch.randn(N, C, dtype=torch.float64).to(device, dtype)
    weight = (3 * torch.randn(V, C, dtype=torch.float64) / max(C, 1) ** 0.5).to(device, dtype)
    b = torch.randn(V, dtype=torch.float64).to(device, dtype) if bias else None
    target = torch.randint(0, V, (N,), device=device)
    if ignore_every:
        target[::ignore_every] = ignore_index
    if leading is not None:
        input, target = input.reshape(*leading, C), target.reshape(leading)
    leaves = [t.requires_grad_(True) if t is not None else None for t in (input, weight, b)]
    return (*leaves, target)


def soft_capped(logits, softcap):
    """Gemma 2's final soft-capping as its code writes it (each op rounded in the logits'
    dtype); the logits themselves when ``softcap`` is None."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def check_linear_cross_entropy(input, weight, bias, target, backend, reduction="mean",
                               label_smoothing=0.0, ignore_index=-100, chunk_size=None,
                               softcap=None, z_loss=0.0):
    """Loss and the gradients of input, weight, bias against torch's, by the rule. The loss's
    gradient is 0.37 for a reduced loss (a grad-accumulation scale), random per row for
    "none". ``softcap``: the logits soft-capped first, in all three; ``z_loss``: the z-loss
    added to each row's loss."""
    kwargs = dict(ignore_index=ignore_index, reduction=reduction,
                  label_smoothing=label_smoothing)
    params = [t for t in (input, weight, bias) if t is not None]

    def leaves(dtype=None):
        copies = [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in params]
        return copies + [None] * (3 - len(copies))

    x, w, b = leaves()
    loss = fusedlm.linear_cross_entropy(x, w, target, b, chunk_size=chunk_size,
                                        backend=backend, softcap=softcap, z_loss=z_loss, **kwargs)
    x64, w64, b64 = leaves(torch.float64)
    truth = torch_cross_entropy(soft_capped(F.linear(x64, w64, b64), softcap), target, **kwargs,
                            z_loss=z_loss)
    xt, wt, bt = leaves()
    baseline = torch_cross_entropy(
        soft_capped(F.linear(xt, wt, bt), softcap).to(stat_dtype(input.dtype)), target, **kwargs,
        z_loss=z_loss)
    assert loss.dtype == stat_dtype(input.dtype) and loss.shape == truth.shape
    assert_close_rule(loss, baseline, truth, name="loss")
    grad = (torch.randn_like(truth) if reduction == "none"
            else torch.full_like(truth, 0.37))
    grads = torch.autograd.grad(loss, [t for t in (x, w, b) if t is not None],
                                grad.to(loss.dtype))
    grads64 = torch.autograd.grad(truth, [t for t in (x64, w64, b64) if t is not None], grad)
    grads_torch = torch.autograd.grad(baseline, [t for t in (xt, wt, bt) if t is not None],
                                      grad.to(baseline.dtype))
    for name, ours, exact, eager, param in zip(("dinput", "dweight", "dbias"), grads, grads64,
                                               grads_torch, params, strict=False):
        assert ours.dtype == param.dtype and ours.shape == param.shape, name
        assert_close_rule(ours, eager, exact, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("N", "C", "V", "chunk_size", "bias"), SHAPES,
                         ids=[f"{n}x{c}x{v}-chunk{k}-{'bias' if b else 'nobias'}"
                              for n, c, v, k, b in SHAPES])
def test_linear_cross_entropy(N, C, V, chunk_size, bias, reduction, dtype, backend):
    input, weight, b, target = make_head(N, C, V, dtype, device_of(backend), bias,
                                         ignore_every=3)
    check_linear_cross_entropy(input, weight, b, target, backend, reduction,
                               chunk_size=chunk_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.1, 1.0])
def test_label_smoothing(label_smoothing, reduction, backend):
    input, weight, bias, target = make_head(29, 12, 300, torch.float32, device_of(backend),
                                            bias=True, ignore_every=4)
    check_linear_cross_entropy(input, weight, bias, target, backend, reduction,
                               label_smoothing, chunk_size=8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("softcap", [3.0, 30.0])
def test_softcap(softcap, reduction, dtype, backend):
    """Gemma 2's final soft-capping (30 in its configs; 3 here saturates the tanh for logits
    ~ N(0, 9)), the backward through 1 - tanh^2, with a ragged last chunk."""
    input, weight, bias, target = make_head(29, 12, 300, dtype, device_of(backend), bias=True,
                                            ignore_every=4)
    check_linear_cross_entropy(input, weight, bias, target, backend, reduction, chunk_size=8,
                               softcap=softcap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("z_loss", "softcap"), [(1e-4, None), (0.25, None), (0.25, 3.0)])
def test_z_loss(z_loss, softcap, reduction, dtype, backend):
    """PaLM's z-loss through the chunks (ragged last chunk, bias, label smoothing), alone and
    with the soft-cap; the bias offsets the logits so logsumexp is far from 0."""
    input, weight, bias, target = make_head(29, 12, 300, dtype, device_of(backend), bias=True,
                                            ignore_every=4)
    bias = (bias.detach() + 2.0).requires_grad_(True)
    check_linear_cross_entropy(input, weight, bias, target, backend, reduction, 0.1,
                               chunk_size=8, softcap=softcap, z_loss=z_loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_return_z_loss(reduction, backend):
    input, weight, _, target = make_head(21, 6, 40, torch.float32, device_of(backend),
                                         ignore_every=3)
    call = dict(reduction=reduction, chunk_size=4, backend=backend)
    loss, part = fusedlm.linear_cross_entropy(input, weight, target, **call, z_loss=0.01,
                                              return_z_loss=True)
    assert loss.requires_grad and not part.requires_grad and part.shape == loss.shape
    plain = fusedlm.linear_cross_entropy(input, weight, target, **call)
    torch.testing.assert_close(loss - part, plain)
    logits = F.linear(input.detach(), weight.detach()).double()
    expected = (torch_cross_entropy(logits, target, reduction=reduction, z_loss=0.01)
                - torch_cross_entropy(logits, target, reduction=reduction))
    torch.testing.assert_close(part.double(), expected)
    with torch.no_grad():  # (the op without autograd returns the same pair)
        again = fusedlm.linear_cross_entropy(input, weight, target, **call, z_loss=0.01,
                                             return_z_loss=True)
    for a, b in zip(again, (loss, part), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-1, 0, 5])
def test_ignore_index_is_any_value(ignore_index, backend):
    """GPT's -1, and ignore_index values that are also class indices (their rows are ignored)."""
    input, weight, _, target = make_head(40, 6, 9, torch.float32, device_of(backend))
    target[::2] = ignore_index
    check_linear_cross_entropy(input, weight, None, target, backend, ignore_index=ignore_index,
                               chunk_size=7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_target_ignored_gives_torchs_nan_mean_and_zero_grads(backend):
    input, weight, bias, target = make_head(6, 4, 11, torch.float32, device_of(backend), True)
    target.fill_(-100)
    loss = fusedlm.linear_cross_entropy(input, weight, target, bias, chunk_size=4,
                                        backend=backend)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(F.linear(input, weight), target))
    total = fusedlm.linear_cross_entropy(input, weight, target, bias, reduction="sum",
                                         chunk_size=4, backend=backend)
    assert total.item() == 0.0
    for grad in torch.autograd.grad(total, (input, weight, bias)):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows(backend):
    """N = 0: torch's NaN mean and 0 sum, zero gradients of the right shapes."""
    input, weight, bias, target = make_head(0, 5, 7, torch.float32, device_of(backend), True)
    assert torch.isnan(fusedlm.linear_cross_entropy(input, weight, target, bias,
                                                    backend=backend))
    total = fusedlm.linear_cross_entropy(input, weight, target, bias, reduction="sum",
                                         backend=backend)
    grads = torch.autograd.grad(total, (input, weight, bias))
    assert [g.shape for g in grads] == [input.shape, weight.shape, bias.shape]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert fusedlm.linear_cross_entropy(input, weight, target, reduction="none",
                                        backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_size_does_not_change_the_result(backend):
    """In float64 every chunking gives the same loss and gradients (to rounding): the chunks
    partition the rows, and only the weight's and bias's sums change order."""
    input, weight, bias, target = make_head(23, 6, 31, torch.float64, device_of(backend), True,
                                            ignore_every=5)
    results = []
    for chunk_size in (1, 2, 7, 23, 100, None):
        loss = fusedlm.linear_cross_entropy(input, weight, target, bias, chunk_size=chunk_size,
                                            backend=backend)
        results.append((loss, *torch.autograd.grad(loss, (input, weight, bias))))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", [*kernel_backends(), "torch"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_never_makes_the_logits(reduction, backend, monkeypatch):
    """Forward and backward never make a tensor past max(chunk x V, V x C, N x C): the (N, V)
    logits and their gradient exist one chunk at a time. With the default chunking too (its
    budget lowered here to 4096 elements: 4 rows of V = 1000)."""
    N, C, V = 256, 16, 1000
    input, weight, bias, target = make_head(N, C, V, torch.float32, "cpu", True, ignore_every=7)
    monkeypatch.setattr(lce_ops, "DEFAULT_CHUNK_ELEMENTS", 4096)
    for chunk_size, rows in ((8, 8), (None, 4)):
        mode = LargestTensor()
        with mode:
            loss = fusedlm.linear_cross_entropy(input, weight, target, bias, reduction=reduction,
                                                chunk_size=chunk_size, backend=backend)
            loss.backward(torch.ones_like(loss))
        assert mode.largest == max(rows * V, V * C, N * C), (chunk_size, mode.largest)
        assert mode.largest < N * V // 10
    # The unfused computation does make them (the check can fail).
    mode = LargestTensor()
    with mode:
        F.cross_entropy(F.linear(input, weight, bias), target).backward()
    assert mode.largest == N * V


def test_default_chunk_size():
    assert lce_ops.default_chunk_size(16384, 50304) == 4096  # GPT-2: 2**28 / 50304 = 5336
    assert lce_ops.default_chunk_size(16384, 128256) == 2048  # Llama 3
    assert lce_ops.default_chunk_size(100, 50304) == 100  # never more rows than there are
    assert lce_ops.default_chunk_size(10**6, 2**28) == 1  # at least one row
    assert lce_ops.default_chunk_size(0, 10) == 1


@pytest.mark.parametrize("backend", [*kernel_backends(), "torch"])
def test_gradients_only_where_asked(backend, monkeypatch):
    """A frozen head (weight without grad) gets no weight gradient and the input's is right;
    without grad mode nothing computes a gradient at all."""
    input, weight, _, target = make_head(30, 8, 50, torch.float64, "cpu", ignore_every=4)
    expected = torch.autograd.grad(F.cross_entropy(F.linear(input, weight), target),
                                   (input, weight))
    frozen = weight.detach()
    loss = fusedlm.linear_cross_entropy(input, frozen, target, chunk_size=8, backend=backend)
    (dinput,) = torch.autograd.grad(loss, input)
    torch.testing.assert_close(dinput, expected[0])
    detached = input.detach()
    loss = fusedlm.linear_cross_entropy(detached, weight, target, chunk_size=8, backend=backend)
    (dweight,) = torch.autograd.grad(loss, weight)
    torch.testing.assert_close(dweight, expected[1])

    def no_backward(*args):
        raise AssertionError("computed a gradient nobody asked for")

    monkeypatch.setattr(lce_ops, "_cross_entropy_bwd", no_backward)
    with torch.no_grad():
        loss = fusedlm.linear_cross_entropy(input, weight, target, chunk_size=8, backend=backend)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(input, weight), target))


@pytest.mark.parametrize("backend", [*kernel_backends(), "torch"])
def test_leading_dimensions_and_non_contiguous_tensors(backend):
    """input (B, T, C) and target (B, T), as a model hands them over; a transposed weight and
    a strided input view."""
    B, T, C, V = 3, 11, 10, 37
    input, weight, bias, target = make_head(B * T, C, V, torch.float32, "cpu", True,
                                            ignore_every=4, leading=(B, T))
    loss = fusedlm.linear_cross_entropy(input, weight, target, bias, reduction="none",
                                        chunk_size=5, backend=backend)
    assert loss.shape == (B, T)
    expected = F.cross_entropy(F.linear(input, weight, bias).transpose(1, 2), target,
                               reduction="none")
    torch.testing.assert_close(loss, expected)
    weight_t = weight.detach().t().contiguous().t().requires_grad_(True)  # (V, C) column-major
    wide = torch.randn(B * T, 2 * C).requires_grad_(True)
    strided = wide[:, ::2]
    assert not weight_t.is_contiguous() and not strided.is_contiguous()
    flat = target.reshape(-1)
    check_linear_cross_entropy(strided, weight_t, None, flat, backend, chunk_size=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_casts_like_linear(dtype):
    """Under autocast input and weight cast to autocast's dtype as F.linear's do (float32
    parameters, the usual mixed-precision training); the loss is float32, the gradients come
    back in the parameters' dtype."""
    input, weight, bias, target = make_head(21, 12, 90, dtype, "cpu", True, ignore_every=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fusedlm.linear_cross_entropy(input, weight, target, bias, chunk_size=6,
                                            backend="torch")
        logits = F.linear(input, weight, bias)
        baseline = F.cross_entropy(logits.float(), target)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    truth = F.cross_entropy(F.linear(*(t.detach().double() for t in (input, weight, bias))),
                            target)
    assert_close_rule(loss, baseline, truth, name="loss")
    ours = torch.autograd.grad(loss, (input, weight, bias))
    eager = torch.autograd.grad(baseline, (input, weight, bias))
    for a, b, param in zip(ours, eager, (input, weight, bias), strict=True):
        assert a.dtype == b.dtype == param.dtype
        torch.testing.assert_close(a, b, rtol=2**-6, atol=2**-6 * b.abs().max().item())


def test_bad_arguments_name_the_argument():
    input, weight, bias, target = make_head(4, 3, 5, torch.float32, "cpu", True)
    call = fusedlm.linear_cross_entropy
    cases = [
        (dict(input=input.long()), TypeError, "argument 'input'"),
        (dict(weight=weight[0]), ValueError, "argument 'weight' must be 2-D"),
        (dict(weight=weight[:, :2]), ValueError, "argument 'weight' has 2 input features"),
        (dict(weight=weight[:0]), ValueError, "argument 'weight' must have at least one class"),
        (dict(weight=weight.double()), TypeError, "argument 'weight' must have the dtype"),
        (dict(bias=bias[:4]), ValueError, r"argument 'bias' must have shape \(5,\)"),
        (dict(bias=bias.half()), TypeError, "argument 'bias' must have the dtype"),
        (dict(target=target.int()), TypeError, "argument 'target' must be int64"),
        (dict(target=target[:3]), ValueError, "argument 'target' must have shape"),
        (dict(target=[0, 1, 2, 3]), TypeError, "argument 'target' must be a torch.Tensor"),
        (dict(reduction="avg"), ValueError, "argument 'reduction'"),
        (dict(label_smoothing=1.5), ValueError, "argument 'label_smoothing'"),
        (dict(chunk_size=0), ValueError, "argument 'chunk_size'"),
        (dict(chunk_size=2.0), ValueError, "argument 'chunk_size'"),
        (dict(softcap=0.0), ValueError, "argument 'softcap' must be a positive finite"),
        (dict(softcap=-30.0), ValueError, "argument 'softcap'"),
        (dict(softcap=float("inf")), ValueError, "argument 'softcap'"),
        (dict(softcap=True), ValueError, "argument 'softcap'"),
        (dict(z_loss=-0.1), ValueError, "argument 'z_loss' must be a finite number >= 0"),
        (dict(z_loss=float("nan")), ValueError, "argument 'z_loss'"),
        (dict(z_loss="0.1"), ValueError, "argument 'z_loss'"),
        (dict(return_z_loss=None), TypeError, "argument 'return_z_loss' must be a bool"),
        (dict(backend="fast"), ValueError, "argument 'backend'"),
    ]
    for change, error, message in cases:
        arguments = dict(input=input, weight=weight, target=target, bias=bias) | change
        with pytest.raises(error, match=message):
            call(**arguments)
    with pytest.raises(ValueError, match="argument 'input' must have at least 1 dimension"):
        call(torch.tensor(1.0), weight, target)


def test_target_out_of_range_raises():
    input, weight, _, target = make_head(5, 3, 7, torch.float32, "cpu")
    target[2] = 7
    with pytest.raises(RuntimeError, match=r"linear_cross_entropy: argument 'target' holds a "
                                           r"class index outside \[0, 7\)"):
        fusedlm.linear_cross_entropy(input, weight, target)


def test_named_backend_that_cannot_serve_raises():
    input, weight, _, target = make_head(4, 3, 10, torch.float32, "cpu")
    with pytest.raises(BackendNotSupportedError,
                       match="asks for backend 'cuda', which cannot serve this call"):
        fusedlm.linear_cross_entropy(input, weight, target, backend="cuda")


@pytest.mark.parametrize("backend", [*kernel_backends(), "torch"])
def test_gradcheck_float64(backend):
    input, weight, bias, target = make_head(7, 3, 6, torch.float64, "cpu", True, ignore_every=3)
    for reduction in REDUCTIONS:
        for smoothing, softcap, z_loss in ((0.0, None, 0.0), (0.3, None, 0.0), (0.0, 2.0, 0.0),
                                           (0.3, 2.0, 0.2)):
            torch.autograd.gradcheck(
                lambda x, w, b, r=reduction, s=smoothing, c=softcap, z=z_loss:
                    fusedlm.linear_cross_entropy(x, w, target, b, reduction=r, label_smoothing=s,
                                                 chunk_size=3, backend=backend, softcap=c,
                                                 z_loss=z),
                (input, weight, bias))


@pytest.mark.parametrize("backend", [*kernel_backends(), "torch"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck(reduction, backend):
    input, weight, bias, target = make_head(7, 5, 13, torch.float32, "cpu", True, ignore_every=3)
    torch.library.opcheck(torch.ops.fusedlm.linear_cross_entropy_fwd,
                          (input, weight, bias, target, -100, 0.1, reduction, 3, True, True,
                           True, backend))
    out = torch.ops.fusedlm.linear_cross_entropy_fwd(input.detach(), weight.detach(),
                                                     bias.detach(), target, -100, 0.1, "none",
                                                     3, False, False, False, backend)
    torch.library.opcheck(torch.ops.fusedlm.linear_cross_entropy_bwd,
                          (torch.randn(7), input.detach(), weight.detach(), bias.detach(),
                           target, out[1], out[2], -100, 0.1, 3, True, True, True, backend))
    torch.library.opcheck(torch.ops.fusedlm.linear_cross_entropy_fwd,  # soft-capped
                          (input, weight, bias, target, -100, 0.0, reduction, 3, True, True,
                           True, backend, 2.0))
    torch.library.opcheck(torch.ops.fusedlm.linear_cross_entropy_fwd,  # and the z-loss
                          (input, weight, bias, target, -100, 0.0, reduction, 3, True, True,
                           True, backend, 2.0, 0.1))
    torch.library.opcheck(torch.ops.fusedlm.linear_cross_entropy_bwd,
                          (torch.randn(7), input.detach(), weight.detach(), bias.detach(),
                           target, out[1], out[2], -100, 0.1, 3, True, True, True, backend, 0.0,
                           0.1))


@pytest.mark.parametrize(("softcap", "z_loss"), [(None, 0.0), (2.0, 0.0), (2.0, 0.1)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_compile_fullgraph(reduction, softcap, z_loss):
    input, weight, bias, target = make_head(10, 6, 17, torch.float32, "cpu", True,
                                            ignore_every=4)

    def loss_fn(x, w, b, t):
        return fusedlm.linear_cross_entropy(x, w, t, b, reduction=reduction,
                                            label_smoothing=0.1, chunk_size=4, backend="torch",
                                            softcap=softcap, z_loss=z_loss)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss_fn)(input, weight, bias, target)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    code = explanation.graphs[0].code  # the chunked op, never the logits' composition
    assert "fusedlm.linear_cross_entropy_fwd" in code and "linear(" not in code, code
    loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(input, weight, bias,
                                                                       target)
    grad = torch.randn_like(loss)
    ours = torch.autograd.grad(loss, (input, weight, bias), grad)
    expected = torch_cross_entropy(soft_capped(F.linear(input, weight, bias), softcap), target,
                               reduction=reduction, label_smoothing=0.1, z_loss=z_loss)
    torch.testing.assert_close(loss, expected)
    for a, b in zip(ours, torch.autograd.grad(expected, (input, weight, bias), grad),
                    strict=True):
        torch.testing.assert_close(a, b)


def test_torch_func_grad_runs_the_reference():
    input, weight, _, target = make_head(6, 4, 9, torch.float64, "cpu", ignore_every=4)
    for z_loss in (0.0, 0.3):
        grad = torch.func.grad(lambda w, z=z_loss: fusedlm.linear_cross_entropy(
            input.detach(), w, target, z_loss=z))(weight.detach())
        expected = torch.autograd.grad(
            torch_cross_entropy(F.linear(input, weight), target, z_loss=z_loss), weight)[0]
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_language_model_head_loss(backend):
    input, weight, _, target = make_head(40, 8, 77, torch.bfloat16, "cpu", ignore_every=5)
    loss = lce_ops.language_model_head_loss(input, weight, target, backend=backend)
    expected = F.cross_entropy(F.linear(input, weight).float(), target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)


def test_language_model_head_loss_takes_torchs_path_where_the_forced_backend_has_no_kernel(
        monkeypatch, caplog):
    """FUSEDLM_BACKEND=cuda (no CUDA C++ cross-entropy; here no GPU either) must not stop a
    model from training: the head makes the logits and the loss takes torch's float32 path."""
    input, weight, _, target = make_head(12, 4, 30, torch.bfloat16, "cpu", ignore_every=5)
    monkeypatch.setenv("FUSEDLM_BACKEND", "cuda")
    importlib.import_module("fusedlm.ops.cross_entropy")._fallback_logged.clear()
    with caplog.at_level(logging.INFO, logger="fusedlm"):
        loss = lce_ops.language_model_head_loss(input, weight, target)
    assert torch.equal(loss, F.cross_entropy(F.linear(input, weight).float(), target))
    assert "backend 'cuda' cannot serve it" in caplog.text
    with pytest.raises(BackendNotSupportedError):
        fusedlm.linear_cross_entropy(input, weight, target)
    loss, part = lce_ops.language_model_head_loss(input, weight, target, z_loss=0.01,
                                                  return_z_loss=True)
    logits = F.linear(input, weight).float()
    torch.testing.assert_close(loss, torch_cross_entropy(logits, target, z_loss=0.01))
    torch.testing.assert_close(loss - part, F.cross_entropy(logits, target))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpt2_head_on_gpu(dtype):
    """GPT-2's head at 4096 tokens on the GPU (Triton cross-entropy, cuBLAS matmuls with
    float32 sums): the rule holds, and the peak memory of forward+backward stays far below
    the unfused logits and their gradient (2 x 4096 x 50304 x 2 bytes = 824 MB)."""
    N, C, V = 4096, 768, 50304
    input, weight, _, target = make_head(N, C, V, dtype, "cuda", ignore_every=9)
    check_linear_cross_entropy(input, weight, None, target, "auto", chunk_size=1024)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = fusedlm.linear_cross_entropy(input, weight, target, chunk_size=512)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    logits_bytes = N * V * input.element_size()
    assert extra < logits_bytes / 2, f"peak {extra / 1e6:.0f} MB over the inputs"
