"""fusedlm.rotary_embedding and the custom op behind it (fusedlm::rotary_embedding), against
the eager rotation written out here (Hugging Face's ``rotate_half`` for pairs (i, i + R/2),
GPT-J's ``rotate_every_two`` for interleaved pairs) by DESIGN.md's rule: truth in float64,
baseline the same eager code in x's dtype with cos and sin cast to it. The Triton kernel's own
cases (interpreter runs, realistic sizes on a GPU) are in tests/triton/test_rotary.py."""

from __future__ import annotations

import sys

import pytest
import torch

import fusedlm
from fusedlm.backends import BackendNotSupportedError, OpDispatch
from tests.helpers import DTYPES, assert_close_rule, device_of, kernel_backends

rotary_ops = sys.modules["fusedlm.ops.rotary"]  # (fusedlm.ops.rotary_embedding is the function)

# The C++ kernel takes CPU tensors, the Triton one CUDA tensors (there is no CUDA C++ kernel).
BACKENDS = [*kernel_backends(), pytest.param("triton", marks=pytest.mark.gpu, id="triton"),
            "torch"]

# (B, H, T, D, R): one position and one pair, odd T, head dims 40/72/256, partial rotary
# (R < D: the rest passes through), an odd D, and enough positions for the CPU kernel to split
# them across threads (16384 elements a task).
SHAPES = [
    (1, 1, 1, 2, 2),
    (2, 3, 17, 40, 40),
    (1, 3, 113, 72, 72),
    (2, 1, 17, 256, 256),
    (2, 3, 17, 72, 32),
    (1, 2, 5, 7, 4),
    (4, 2, 130, 64, 64),
]
SHAPE_IDS = ["B{}-H{}-T{}-D{}-R{}".format(*s) for s in SHAPES]


def rope_angles(T, half, batch=None, dtype=torch.float32, device="cpu", base=10000.0):
    """(cos, sin) of RoPE's angles position * base^(-i / half): (T, half), or with ``batch``
    (batch, T, half) whose rows start at different positions (left padding, packed documents)."""
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64) / half)
    positions = torch.arange(T, dtype=torch.float64)
    if batch is not None:
        positions = positions + torch.randint(0, 1000, (batch, 1)).double()
    theta = positions[..., None] * inv_freq
    return theta.cos().to(device, dtype), theta.sin().to(device, dtype)


def eager_rotary(x, cos, sin, interleaved, conjugate=False):
    """Eager PyTorch's rotation in x's dtype (cos and sin cast to it, each multiply rounded):
    ``x * cos + rotate_half(x) * sin`` over the first R = 2 * cos.shape[-1] features (HF Llama,
    GPT-NeoX), or ``rotate_every_two`` (GPT-J) when interleaved; the rest of x concatenated
    back. ``conjugate`` rotates the other way. Autograd-able in every argument."""
    half = cos.shape[-1]
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    if conjugate:
        s = -s
    if c.dim() == 3:  # (B, T, R/2) -> (B, 1, T, R/2) against the heads
        c, s = c[:, None], s[:, None]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    if interleaved:
        c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
        turned = torch.stack((-rot[..., 1::2], rot[..., 0::2]), -1).flatten(-2)
    else:
        c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
        turned = torch.cat((-rot[..., half:], rot[..., :half]), -1)
    return torch.cat((rot * c + turned * s, rest), -1)


def randn(shape, dtype, device="cpu", scale=1.0):
    return (scale * torch.randn(shape, dtype=torch.float64)).to(device, dtype)


def check_rotary(x, cos, sin, interleaved, backend, backward=True):
    """fusedlm.rotary_embedding(x) and its dx against eager_rotary by the rule; the features
    past R must come through exactly (output and gradient). Returns the output."""
    leaf = x.detach().requires_grad_(backward)
    out = fusedlm.rotary_embedding(leaf, cos, sin, interleaved, backend=backend)
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    assert out.is_contiguous()
    x64 = x.detach().double().requires_grad_(backward)
    truth = eager_rotary(x64, cos.double(), sin.double(), interleaved)
    xt = x.detach().clone().requires_grad_(backward)
    baseline = eager_rotary(xt, cos, sin, interleaved)
    assert_close_rule(out, baseline, truth, name="out")
    R = 2 * cos.shape[-1]
    assert torch.equal(out[..., R:], x[..., R:]), "features past R must pass through"
    if not backward:
        return out
    grad = randn(x.shape, x.dtype, x.device)
    (dx,) = torch.autograd.grad(out, leaf, grad)
    (dx64,) = torch.autograd.grad(truth, x64, grad.double())
    (dxt,) = torch.autograd.grad(baseline, xt, grad)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert_close_rule(dx, dxt, dx64, name="dx")
    assert torch.equal(dx[..., R:], grad[..., R:]), "gradients past R must pass through"
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_rotary_embedding(shape, interleaved, dtype, backend):
    B, H, T, D, R = shape
    device = device_of(backend)
    cos, sin = rope_angles(T, R // 2, device=device)
    check_rotary(randn((B, H, T, D), dtype, device), cos, sin, interleaved, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("table_dtype", DTYPES, ids=lambda d: f"table-{d}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["(T,R/2)", "(B,T,R/2)"])
def test_angle_tables(per_row, dtype, table_dtype, backend):
    """One (T, R/2) table for every batch row, or (B, T, R/2) with each row's own positions;
    the tables in any float dtype, x's or another (the kernels read them in the compute
    dtype)."""
    device = device_of(backend)
    B, H, T, D = 3, 2, 17, 40
    for interleaved in (False, True):
        cos, sin = rope_angles(T, 16, B if per_row else None, table_dtype, device)
        check_rotary(randn((B, H, T, D), dtype, device), cos, sin, interleaved, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cos_and_sin_dtypes_may_differ(backend):
    device = device_of(backend)
    cos, sin = rope_angles(9, 4, 2, torch.float64, device)
    x = randn((2, 3, 9, 8), torch.bfloat16, device)
    check_rotary(x, cos, sin.half(), False, backend)
    check_rotary(x, cos.bfloat16(), sin.float(), True, backend)


# x as eager code hands it over: the (B, T, H, D) projection's transpose(1, 2) view, q of a
# fused (B, T, 3, H, D) qkv projection, every other feature, the heads of a GQA key expanded
# (stride 0), a view at a storage offset.
X_LAYOUTS = ["bthd_transpose", "fused_qkv", "feature_stride", "expanded_heads", "offset"]
# cos and sin: contiguous, the first half of a (T, R) cache (row stride R), a transposed
# (R/2, T) table, a (B, T, R/2) table expanded from one row (stride 0 across the batch).
TABLE_LAYOUTS = ["contiguous", "half_of_cache", "transposed", "expanded_batch"]


def _x_in_layout(layout, B, H, T, D, dtype, device):
    if layout == "bthd_transpose":
        return randn((B, T, H, D), dtype, device).transpose(1, 2)
    if layout == "fused_qkv":
        return randn((B, T, 3, H, D), dtype, device)[:, :, 0].transpose(1, 2)
    if layout == "feature_stride":
        return randn((B, H, T, 2 * D), dtype, device)[..., ::2]
    if layout == "expanded_heads":
        return randn((B, 1, T, D), dtype, device).expand(B, H, T, D)
    flat = randn((B * H * T * D + 5,), dtype, device)
    return flat[5:].view(B, H, T, D)


def _tables_in_layout(layout, B, T, half, device):
    cos, sin = rope_angles(T, half, device=device)
    if layout == "half_of_cache":
        return torch.cat((cos, cos), -1)[:, :half], torch.cat((sin, sin), -1)[:, :half]
    if layout == "transposed":
        return cos.t().contiguous().t(), sin.t().contiguous().t()
    if layout == "expanded_batch":
        return cos[None].expand(B, T, half), sin[None].expand(B, T, half)
    return cos, sin


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("table_layout", TABLE_LAYOUTS)
@pytest.mark.parametrize("x_layout", X_LAYOUTS)
def test_non_contiguous_inputs(x_layout, table_layout, backend):
    device = device_of(backend)
    B, H, T, D = 2, 3, 17, 24
    x = _x_in_layout(x_layout, B, H, T, D, torch.float32, device)
    cos, sin = _tables_in_layout(table_layout, B, T, 8, device)  # R = 16 < D
    assert not x.is_contiguous() or x_layout == "offset"
    assert not cos.is_contiguous() or table_layout == "contiguous"
    for interleaved in (False, True):
        check_rotary(x, cos, sin, interleaved, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduced_loss_gradient(backend):
    """A summed loss's gradient reaches the backward expanded (every stride 0)."""
    device = device_of(backend)
    cos, sin = rope_angles(11, 6, device=device)
    x = randn((2, 2, 11, 16), torch.float32, device).requires_grad_(True)
    fusedlm.rotary_embedding(x, cos, sin, backend=backend).sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    eager_rotary(x64, cos.double(), sin.double(), False).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_row", [False, True], ids=["(T,R/2)", "(B,T,R/2)"])
@pytest.mark.parametrize("shape", [(0, 2, 5, 8), (2, 0, 5, 8), (2, 3, 0, 8)],
                         ids=["B0", "H0", "T0"])
def test_empty_inputs(shape, per_row, backend):
    device = device_of(backend)
    B, H, T, D = shape
    cos, sin = rope_angles(T, 4, B if per_row else None, device=device)
    x = randn(shape, torch.float32, device).requires_grad_(True)
    out = fusedlm.rotary_embedding(x, cos, sin, backend=backend)
    assert out.shape == shape and out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.shape == shape


def test_rotation_by_zero_is_the_identity_and_conjugate_inverts():
    """cos = 1, sin = 0 leaves x as it is (bit for bit); the op with ``conjugate`` undoes the
    rotation (the backward's own transpose)."""
    x = randn((2, 3, 7, 12), torch.float64)
    ones, zeros = torch.ones(7, 6, dtype=torch.float64), torch.zeros(7, 6, dtype=torch.float64)
    cos, sin = rope_angles(7, 6, dtype=torch.float64)
    for backend in ("torch", *(["cpu"] if fusedlm.backends()["cpu"].available else [])):
        for interleaved in (False, True):
            same = torch.ops.fusedlm.rotary_embedding(x, ones, zeros, interleaved, False, backend)
            assert torch.equal(same, x)
            turned = torch.ops.fusedlm.rotary_embedding(x, cos, sin, interleaved, False, backend)
            assert not torch.allclose(turned, x)
            back = torch.ops.fusedlm.rotary_embedding(turned, cos, sin, interleaved, True,
                                                      backend)
            torch.testing.assert_close(back, x, rtol=0, atol=1e-12)


def test_interleaved_is_metas_complex_rotation():
    """interleaved=True is Meta's Llama: pairs (2i, 2i + 1) as complex numbers times
    e^(i theta) (``torch.view_as_complex`` times ``torch.polar``); the default is HF's."""
    x = randn((2, 4, 9, 16), torch.float64)
    cos, sin = rope_angles(9, 8, dtype=torch.float64)
    freqs = torch.complex(cos, sin)
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(2, 4, 9, 8, 2)) * freqs)
    out = fusedlm.rotary_embedding(x, cos, sin, interleaved=True)
    torch.testing.assert_close(out, expected.flatten(-2), rtol=0, atol=1e-12)
    halves = torch.view_as_complex(torch.stack((x[..., :8], x[..., 8:]), -1).contiguous())
    rotated = torch.view_as_real(halves * freqs)
    torch.testing.assert_close(fusedlm.rotary_embedding(x, cos, sin),
                               torch.cat((rotated[..., 0], rotated[..., 1]), -1), rtol=0,
                               atol=1e-12)


# ---- gradients: gradcheck, opcheck, cos and sin ---------------------------------------------

GRADCHECK_SHAPES = [(2, 2, 5, 8, 8), (1, 3, 4, 7, 4)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_row", [False, True], ids=["(T,R/2)", "(B,T,R/2)"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES, ids=["B{}-H{}-T{}-D{}-R{}".format(*s)
                                                         for s in GRADCHECK_SHAPES])
def test_gradcheck_float64(shape, interleaved, per_row, backend):
    B, H, T, D, R = shape
    device = device_of(backend)
    cos, sin = rope_angles(T, R // 2, B if per_row else None, torch.float64, device)
    x = randn((B, H, T, D), torch.float64, device).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: fusedlm.rotary_embedding(t, cos, sin, interleaved, backend=backend), (x,))


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
def test_gradcheck_angles_float64(interleaved, backend):
    """cos and sin that require grad (learned or position-interpolated tables) get their
    gradients (the torch reference serves such calls; kernel backends refuse them:
    test_angle_gradients)."""
    device = "cpu"
    cos, sin = (t.requires_grad_(True) for t in rope_angles(4, 3, 2, torch.float64, device))
    x = randn((2, 2, 4, 8), torch.float64, device).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, c, s: fusedlm.rotary_embedding(a, c, s, interleaved, backend=backend),
        (x, cos, sin))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(dtype, backend):
    device = device_of(backend)
    x = randn((2, 3, 7, 10), dtype, device).requires_grad_(True)
    for interleaved, conjugate, per_row in [(False, False, False), (True, True, True),
                                            (False, True, True)]:
        cos, sin = rope_angles(7, 4, 2 if per_row else None, torch.float32, device)
        torch.library.opcheck(torch.ops.fusedlm.rotary_embedding.default,
                              (x, cos, sin, interleaved, conjugate, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_angle_gradients(dtype, backend):
    """With cos and sin requiring grad the call takes the torch reference (no kernel runs;
    a kernel backend named for it raises): dx, dcos and dsin by the rule, dcos/dsin in the
    tables' dtype."""
    device = device_of(backend)
    B, H, T, D = 2, 3, 13, 20
    x = randn((B, H, T, D), dtype, device)
    grad = randn((B, H, T, D), dtype, device)
    tables = rope_angles(T, 8, B, torch.float32, device)  # R = 16 < D

    def run(cast, fn):
        xs = x.detach().to(cast).requires_grad_(True)
        cs, ss = (t.detach().to(torch.float64 if cast == torch.float64 else t.dtype)
                  .requires_grad_(True) for t in tables)
        out = fn(xs, cs, ss)
        return [out, *torch.autograd.grad(out, (xs, cs, ss), grad.to(cast))]

    if backend != "torch":
        with pytest.raises(BackendNotSupportedError, match="'cos' or 'sin' requires grad"):
            run(dtype, lambda a, c, s: fusedlm.rotary_embedding(a, c, s, backend=backend))
    OpDispatch.last_choice.pop("rotary_embedding", None)
    ours = run(dtype, lambda a, c, s: fusedlm.rotary_embedding(a, c, s))
    assert OpDispatch.last_choice["rotary_embedding"] == "torch"  # no kernel ran
    truth = run(torch.float64, lambda a, c, s: eager_rotary(a, c, s, False))
    base = run(dtype, lambda a, c, s: eager_rotary(a, c, s, False))
    for name, o, b, t in zip(["out", "dx", "dcos", "dsin"], ours, base, truth, strict=True):
        assert o.dtype == b.dtype, name
        assert_close_rule(o, b, t, name=name)
    # under no_grad the same call runs the kernel
    with torch.no_grad():
        fusedlm.rotary_embedding(x, *(t.detach().requires_grad_(True) for t in tables),
                                 backend=backend)
    assert OpDispatch.last_choice["rotary_embedding"] == backend


def test_gradient_is_not_differentiable_again():
    """The kernels' gradient has no second derivative: with create_graph=True a first backward
    works and a second one raises (once_differentiable), instead of a silently wrong (zero)
    term. With cos or sin requiring grad the reference serves the call, and a second
    derivative is torch's own."""
    cos, sin = rope_angles(5, 4)
    x = randn((2, 3, 5, 8), torch.float32).requires_grad_(True)
    (dx,) = torch.autograd.grad(fusedlm.rotary_embedding(x, cos, sin).pow(2).sum(), x,
                                create_graph=True)
    expected = torch.autograd.grad(eager_rotary(x, cos, sin, False).pow(2).sum(), x)[0]
    torch.testing.assert_close(dx, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dx.sum().backward()

    c = cos.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(fusedlm.rotary_embedding(x, c, sin).pow(3).sum(), x,
                                create_graph=True)
    (d2,) = torch.autograd.grad(dx.sum(), c)
    ce = cos.clone().requires_grad_(True)
    (dxe,) = torch.autograd.grad(eager_rotary(x, ce, sin, False).pow(3).sum(), x,
                                 create_graph=True)
    torch.testing.assert_close(d2, torch.autograd.grad(dxe.sum(), ce)[0], rtol=1e-5, atol=1e-5)


# ---- dispatch: no_grad, autocast, backends, transforms ----------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_autograd_skips_the_function(backend, monkeypatch):
    """Under torch.no_grad() or with x not requiring grad, the forward runs without the
    autograd.Function and gives the grad-mode output bit for bit."""
    device = device_of(backend)
    cos, sin = rope_angles(9, 8, 2, device=device)
    x = randn((2, 4, 9, 16), torch.float32, device)
    expected = fusedlm.rotary_embedding(x.clone().requires_grad_(True), cos, sin,
                                        backend=backend)
    assert expected.grad_fn is not None

    def refuse(*_):
        raise AssertionError("the autograd.Function ran without autograd")

    with monkeypatch.context() as m:
        m.setattr(rotary_ops._RotaryEmbeddingEager, "apply", refuse)
        with torch.no_grad():
            no_grad = fusedlm.rotary_embedding(x.clone().requires_grad_(True), cos, sin,
                                               backend=backend)
        plain = fusedlm.rotary_embedding(x, cos, sin, backend=backend)
    for out in (no_grad, plain):
        assert out.grad_fn is None and not out.requires_grad
        torch.testing.assert_close(out, expected.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_keeps_x_dtype(dtype, backend):
    """Under bfloat16 autocast the rotation runs as without it: the output in x's dtype (float32
    stays float32, as eager's elementwise rotation does), forward and gradient bit for bit."""
    device = device_of(backend)
    cos, sin = rope_angles(9, 8, device=device)
    x = randn((2, 4, 9, 16), dtype, device)
    grad = randn((2, 4, 9, 16), dtype, device)
    results = []
    for enabled in (False, True):
        leaf = x.clone().requires_grad_(True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled):
            out = fusedlm.rotary_embedding(leaf, cos, sin, backend=backend)
        results.append((out, torch.autograd.grad(out, leaf, grad)[0]))
    (out, dx), (out_autocast, dx_autocast) = results
    assert out_autocast.dtype == dtype and dx_autocast.dtype == dtype
    torch.testing.assert_close(out_autocast, out, rtol=0, atol=0)
    torch.testing.assert_close(dx_autocast, dx, rtol=0, atol=0)


def test_auto_on_cpu_takes_the_cpu_kernel():
    cos, sin = rope_angles(5, 4)
    x = randn((1, 2, 5, 8), torch.float32).requires_grad_(True)
    OpDispatch.last_choice.pop("rotary_embedding", None)
    out = fusedlm.rotary_embedding(x, cos, sin)
    assert OpDispatch.last_choice["rotary_embedding"] == (
        "cpu" if fusedlm.backends()["cpu"].available else "torch")
    if fusedlm.backends()["cpu"].available:  # the C++ node: its backward runs the cpu kernel
        assert "RotaryEmbeddingFunction" in out.grad_fn.name()
        return
    OpDispatch.last_choice.pop("rotary_embedding")
    out.sum().backward()  # the backward is the same op
    assert OpDispatch.last_choice["rotary_embedding"] == "torch"


def test_named_backend_that_cannot_serve_raises():
    cos, sin = rope_angles(5, 4)
    x = randn((1, 2, 5, 8), torch.float32)
    with pytest.raises(BackendNotSupportedError,
                       match="argument 'backend' asks for backend 'cuda', which cannot serve"):
        fusedlm.rotary_embedding(x, cos, sin, backend="cuda")
    with pytest.raises(ValueError, match="argument 'backend'"):
        fusedlm.rotary_embedding(x, cos, sin, backend="fast")


def test_under_torch_func_transforms():
    """vmap, jacrev and jvp (and forward-mode AD) run the torch reference (the kernels have no
    batching or forward-mode rules) and agree with the eager rotation under the same
    transform."""
    x = randn((3, 2, 2, 5, 8), torch.float64)
    cos, sin = rope_angles(5, 4, dtype=torch.float64)
    tangent = torch.randn_like(x)

    def ours(t):
        return fusedlm.rotary_embedding(t, cos, sin)

    def theirs(t):
        return eager_rotary(t, cos, sin, False)

    for transform in (
        lambda f: torch.vmap(f)(x),
        lambda f: torch.func.jacrev(f)(x[0, :1, :1]),
        lambda f: torch.func.jvp(f, (x[0],), (tangent[0],))[1],
    ):
        torch.testing.assert_close(transform(ours), transform(theirs), rtol=1e-12, atol=1e-12)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x[0], tangent[0])
        got = torch.autograd.forward_ad.unpack_dual(ours(dual)).tangent
    torch.testing.assert_close(got, theirs(tangent[0]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_kernel_backend_named_under_vmap_raises(backend):
    cos, sin = rope_angles(5, 4, device=device_of(backend))
    x = randn((3, 1, 2, 5, 8), torch.float32, device_of(backend))
    with pytest.raises(BackendNotSupportedError, match="torch.func transforms"):
        torch.vmap(lambda t: fusedlm.rotary_embedding(t, cos, sin, backend=backend))(x)


# ---- bad inputs ---------------------------------------------------------------------------------


def _x(dtype=torch.float32, device="cpu", shape=(2, 3, 5, 8)):
    return torch.randn(shape, dtype=dtype, device=device)


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


BAD_INPUTS = [
    # (id, exception, argument named, call)
    ("x_list", TypeError, "'x'", lambda f: f([[1.0]], _t(5, 4), _t(5, 4))),
    ("x_int", TypeError, "'x'", lambda f: f(_x().long(), _t(5, 4), _t(5, 4))),
    ("x_bool", TypeError, "'x'", lambda f: f(_x() > 0, _t(5, 4), _t(5, 4))),
    ("x_complex", TypeError, "'x'", lambda f: f(_x().to(torch.complex64), _t(5, 4), _t(5, 4))),
    ("x_sparse", ValueError, "'x'", lambda f: f(_x().to_sparse(), _t(5, 4), _t(5, 4))),
    ("x_3d", ValueError, "'x'", lambda f: f(_x()[0], _t(5, 4), _t(5, 4))),
    ("x_5d", ValueError, "'x'", lambda f: f(_x()[None], _t(5, 4), _t(5, 4))),
    ("cos_none", TypeError, "'cos'", lambda f: f(_x(), None, _t(5, 4))),
    ("cos_int", TypeError, "'cos'", lambda f: f(_x(), _t(5, 4).long(), _t(5, 4))),
    ("cos_1d", ValueError, "'cos'", lambda f: f(_x(), _t(4), _t(4))),
    ("cos_4d", ValueError, "'cos'", lambda f: f(_x(), _t(2, 1, 5, 4), _t(2, 1, 5, 4))),
    ("cos_positions", ValueError, "'cos'", lambda f: f(_x(), _t(6, 4), _t(6, 4))),
    ("cos_batch_rows", ValueError, "'cos'", lambda f: f(_x(), _t(3, 5, 4), _t(3, 5, 4))),
    ("cos_R_over_D", ValueError, "'cos'", lambda f: f(_x(), _t(5, 5), _t(5, 5))),
    ("cos_no_angles", ValueError, "'cos'", lambda f: f(_x(), _t(5, 0), _t(5, 0))),
    ("cos_D_1", ValueError, "'cos'", lambda f: f(_x(shape=(1, 1, 5, 1)), _t(5, 1), _t(5, 1))),
    ("cos_on_meta", ValueError, "'cos'",
     lambda f: f(_x(), _t(5, 4, device="meta"), _t(5, 4))),
    ("x_on_meta", ValueError, "'cos'", lambda f: f(_x(device="meta"), _t(5, 4), _t(5, 4))),
    ("sin_none", TypeError, "'sin'", lambda f: f(_x(), _t(5, 4), None)),
    ("sin_int", TypeError, "'sin'", lambda f: f(_x(), _t(5, 4), _t(5, 4).int())),
    ("sin_shape", ValueError, "'sin'", lambda f: f(_x(), _t(5, 4), _t(5, 3))),
    ("sin_per_row_cos_shared", ValueError, "'sin'", lambda f: f(_x(), _t(5, 4), _t(2, 5, 4))),
    ("sin_positions", ValueError, "'sin'", lambda f: f(_x(), _t(5, 4), _t(4, 4))),
    ("sin_on_meta", ValueError, "'sin'",
     lambda f: f(_x(), _t(5, 4), _t(5, 4, device="meta"))),
    ("interleaved_int", TypeError, "'interleaved'",
     lambda f: f(_x(), _t(5, 4), _t(5, 4), interleaved=1)),
    ("interleaved_none", TypeError, "'interleaved'",
     lambda f: f(_x(), _t(5, 4), _t(5, 4), interleaved=None)),
    ("interleaved_str", TypeError, "'interleaved'",
     lambda f: f(_x(), _t(5, 4), _t(5, 4), interleaved="gptj")),
    ("interleaved_tensor", TypeError, "'interleaved'",
     lambda f: f(_x(), _t(5, 4), _t(5, 4), interleaved=torch.tensor(True))),
    ("backend_unknown", ValueError, "'backend'", lambda f: f(_x(), _t(5, 4), _t(5, 4),
                                                              backend="gpu")),
    ("backend_none", ValueError, "'backend'", lambda f: f(_x(), _t(5, 4), _t(5, 4),
                                                           backend=None)),
    ("backend_cuda", BackendNotSupportedError, "'backend'",
     lambda f: f(_x(), _t(5, 4), _t(5, 4), backend="cuda")),
]


@pytest.mark.parametrize(("exc", "argument", "call"), [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_the_argument(exc, argument, call):
    with pytest.raises(exc) as info:
        call(fusedlm.rotary_embedding)
    message = str(info.value)
    assert argument in message, f"{type(info.value).__name__} does not name {argument!r}: {message}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_table_row_is_shared_by_the_batch(backend):
    """A (1, T, R/2) table serves every batch row, as a (T, R/2) one does."""
    device = device_of(backend)
    x = randn((3, 2, 9, 16), torch.float32, device)
    cos, sin = rope_angles(9, 8, device=device)
    shared = fusedlm.rotary_embedding(x, cos[None], sin[None], backend=backend)
    torch.testing.assert_close(shared, fusedlm.rotary_embedding(x, cos, sin, backend=backend),
                               rtol=0, atol=0)
    check_rotary(x, cos[None], sin[None], False, backend)
