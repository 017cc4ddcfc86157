"""fusedlm.attention's ``dropout_p`` (attention dropout inside the kernels: probabilities
dropped after the softmax by a Philox4x32-10 stream, the rest scaled by 1 / (1 - p)) on every
backend, with the masks, softcap, sinks and lse, through attention_varlen,
scaled_dot_product_attention, torch.compile, activation checkpointing and the custom ops'
opcheck.

Truth: tests/helpers.naive_attention in float64 with the keep mask of
``fusedlm.reference.attention_dropout_keep`` (whose Philox is checked here against the
generator's published known answer and a plain-Python Philox); baseline: the same naive math at
the input's dtype. The seed each call draws is pinned by patching ``_dropout_seed``."""

from __future__ import annotations

import importlib
import math
import types

import pytest
import torch

import fusedlm
from fusedlm import reference
from fusedlm.backends import OpDispatch
from tests.helpers import (
    assert_close_rule,
    available_backends,
    device_of,
    kernel_backends,
    naive_attention,
    needs_cpu_backend,
)
from tests.ops.test_attention_lse_and_sinks import _inputs, _skip_if_refused
from tests.ops.test_attention_softcap import _check as check_attention

BACKENDS = available_backends()
CUDA = [param for param in available_backends("cuda") if param.id == "cuda"]
GPU_KERNELS = [param for param in available_backends("cuda") if param.id in ("cuda", "triton")]
attention_ops = importlib.import_module("fusedlm.ops.attention")

SEED = 2**40 + 977  # above 2^32: both halves of the Philox key matter
# (B, Hq, Hkv, Tq, Tk, D): one element; odd sizes (Tk not a multiple of 4: a row's last Philox
# word group is partial); GQA; Tq > Tk; several partial tiles (the cpu kernels' 128-key tiles,
# the AVX2 Philox's 8-counter runs and their remainders); decoding (key splits).
SHAPES = [
    (1, 1, 1, 1, 1, 8),
    (2, 4, 2, 17, 23, 40),
    (1, 2, 2, 70, 17, 64),
    (1, 2, 1, 150, 270, 40),
    (1, 8, 2, 1, 700, 64),
]
SHAPE_IDS = ["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s) for s in SHAPES]
DTYPES = [torch.float64, torch.float32, torch.float16]


@pytest.fixture
def pinned_seed(monkeypatch):
    """Every call draws SEED (on the inputs' device, as the real draw)."""
    monkeypatch.setattr(attention_ops, "_dropout_seed",
                        lambda device: torch.tensor(SEED, device=device))
    return SEED


# ---- the random numbers -------------------------------------------------------------------


def _philox_python(seed: int, n: int) -> list[int]:
    """Philox4x32-10 written out on Python ints (Salmon et al. 2011): counter (n lo, n hi, 0,
    0), key (seed lo, seed hi)."""
    mask = 0xFFFFFFFF
    c = [n & mask, n >> 32, 0, 0]
    key = [seed & mask, seed >> 32]
    for _ in range(10):
        product_a, product_b = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(product_b >> 32) ^ c[1] ^ key[0], product_b & mask,
             (product_a >> 32) ^ c[3] ^ key[1], product_a & mask]
        key = [(key[0] + 0x9E3779B9) & mask, (key[1] + 0xBB67AE85) & mask]
    return c


def test_philox_known_answer():
    """Random123's known answer for Philox4x32-10 with counter 0 and key 0."""
    words = reference.philox4x32(0, torch.zeros(1, dtype=torch.int64))
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _philox_python(0, 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_reference_philox_is_the_plain_one():
    """The reference's int64-tensor Philox (16-bit halves of the multipliers) against Python
    ints, for counters and seeds of every size up to 2^63 - 1."""
    gen = torch.Generator().manual_seed(0)
    counters = [0, 1, 2**32 - 1, 2**32, 2**63 - 1] + [
        int(x) for x in torch.randint(0, 2**63 - 1, (20,), generator=gen)]
    for seed in (0, 1, 2**32 - 1, 2**32 + 5, SEED, 2**63 - 1):
        words = reference.philox4x32(seed, torch.tensor(counters, dtype=torch.int64))
        for i, n in enumerate(counters):
            assert [int(w[i]) for w in words] == _philox_python(seed, n), (seed, n)


def test_reference_philox_takes_any_int64_seed_as_int_or_tensor():
    """A seed is an int64's 64 bits: negative ones key Philox with their two's complement, and
    the one-element tensor the kernels read gives the words of the int."""
    counters = torch.tensor([0, 1, 2**32 + 3, 2**62 + 11], dtype=torch.int64)
    for seed in (5, SEED, -1, -(2**40) - 7, -(2**63)):
        want = [_philox_python(seed % 2**64, int(n)) for n in counters]
        for form in (seed, torch.tensor(seed), torch.tensor([seed])):
            words = reference.philox4x32(form if isinstance(form, int) else form.reshape(()),
                                         counters)
            assert [[int(w[i]) for w in words] for i in range(4)] == want, (seed, form)
        keep_int = reference.attention_dropout_keep(1, 2, 3, 9, 0.5, seed)
        keep_tensor = reference.attention_dropout_keep(1, 2, 3, 9, 0.5, torch.tensor([seed]))
        assert torch.equal(keep_int, keep_tensor)


def test_the_seed_is_drawn_on_the_inputs_device_and_never_read_by_the_host():
    """The draw is a (,) int64 tensor on q's device from that device's generator, and the ops
    layer and the reference only pass it on or compute with it: on the meta device (no data,
    so any host read would raise) a dropout call runs forward and backward. On a GPU this is
    what lets a captured CUDA graph draw a new mask each replay (test below)."""
    seed = attention_ops._dropout_seed(torch.device("meta"))
    assert (seed.device.type, seed.dtype, seed.shape) == ("meta", torch.int64, ())
    torch.manual_seed(3)
    first = attention_ops._dropout_seed(torch.device("cpu"))
    torch.manual_seed(3)
    assert int(first) == int(attention_ops._dropout_seed(torch.device("cpu")))
    assert 0 <= int(first) < 2**63
    q = torch.empty((1, 2, 5, 8), device="meta", requires_grad=True)
    k, v = (torch.empty((1, 1, 7, 8), device="meta") for _ in range(2))
    out = fusedlm.attention(q, k, v, causal=True, dropout_p=0.3, softcap=5.0, backend="torch")
    out.sum().backward()
    assert out.device.type == q.grad.device.type == "meta"


def test_keep_mask_layout():
    """Element (b, h, i, j) takes word j % 4 of counter ((b Hq + h) Tq + i) ceil(Tk / 4) + j // 4
    and is kept iff it reaches floor(p 2^32)."""
    B, Hq, Tq, Tk, p = 2, 3, 5, 7, 0.4
    keep = reference.attention_dropout_keep(B, Hq, Tq, Tk, p, SEED)
    threshold = reference.dropout_threshold(p)
    assert threshold == int(0.4 * 2**32)
    for b, h, i, j in [(0, 0, 0, 0), (1, 2, 4, 6), (0, 1, 3, 5), (1, 0, 2, 3)]:
        n = ((b * Hq + h) * Tq + i) * 2 + j // 4
        assert bool(keep[b, h, i, j]) == (_philox_python(SEED, n)[j % 4] >= threshold)


# ---- values and gradients -----------------------------------------------------------------


def _check(shape, dtype, backend, dropout_p, softcap=None, **options):
    """out (and lse) and the gradients of q, k, v (and sinks) against truth and baseline, all
    three with the keep mask of SEED (tests/ops/test_attention_softcap.py's check, unit-scale
    inputs)."""
    check_attention(shape, dtype, backend, softcap, spread=1.0, dropout_p=dropout_p,
                    dropout_seed=SEED, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_dropout(shape, causal, dtype, backend, pinned_seed):
    _check(shape, dtype, backend, 0.3, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=SHAPE_IDS[1:4])
def test_dropout_bfloat16(shape, causal, backend, pinned_seed):
    """bfloat16 (the Triton case runs on a GPU: the interpreter's bfloat16 dot is not one)."""
    _check(shape, torch.bfloat16, backend, 0.3, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout_p", [1e-6, 0.1, 0.5, 0.9])
def test_dropout_rates(dropout_p, backend, pinned_seed):
    _check((2, 4, 2, 33, 45, 16), torch.float32, backend, dropout_p, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("masks", ["window", "key_range", "documents"])
def test_dropout_with_windows_and_key_ranges(masks, dtype, backend, pinned_seed):
    shape = (2, 4, 2, 40, 52, 16)
    if masks == "window":
        kwargs = {"causal": True, "window": (9, 0)}
    elif masks == "key_range":
        kwargs = {"key_range": torch.tensor([[3, 50], [0, 17]], device=device_of(backend))}
    else:
        bounds = torch.tensor([0, 11, 30, 52])
        starts = torch.repeat_interleave(bounds[:-1], bounds.diff())[:40]
        ends = torch.repeat_interleave(bounds[1:], bounds.diff())[:40]
        per_query = torch.stack([starts, ends], dim=1)[None].expand(2, 40, 2)
        kwargs = {"key_range": per_query.to(device_of(backend))}
    _check(shape, dtype, backend, 0.25, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_sinks", [False, True], ids=["lse", "sinks_and_lse"])
def test_dropout_with_softcap_lse_gradient_and_sinks(use_sinks, backend, pinned_seed):
    """lse is the softmax's (no dropout in it) and carries its gradient; sinks scale the
    dropped output; the cap comes before the softmax, the dropout after it."""
    _check((2, 4, 2, 19, 37, 16), torch.float32, backend, 0.2, use_sinks=use_sinks,
           use_lse=True, softcap=2.0, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_dropout_is_plain_attention_bit_for_bit(backend):
    """dropout_p=0 takes the kernels' plain call: the same bits as leaving it out."""
    _skip_if_refused(backend, torch.float32)
    q, k, v, *_ = _inputs((2, 4, 2, 19, 37, 16), torch.float32, device_of(backend))
    plain = fusedlm.attention(q, k, v, causal=True, backend=backend)
    assert torch.equal(fusedlm.attention(q, k, v, causal=True, dropout_p=0.0, backend=backend),
                       plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_default_generator_seeds_the_mask(backend):
    """torch.manual_seed repeats a call's mask; successive calls draw new masks; every backend
    drops the same elements for the same seed."""
    _skip_if_refused(backend, torch.float32)
    q, k, v, *_ = _inputs((1, 2, 2, 16, 24, 8), torch.float32, device_of(backend))
    torch.manual_seed(7)
    first = fusedlm.attention(q, k, v, dropout_p=0.5, backend=backend)
    second = fusedlm.attention(q, k, v, dropout_p=0.5, backend=backend)
    torch.manual_seed(7)
    again = fusedlm.attention(q, k, v, dropout_p=0.5, backend=backend)
    torch.manual_seed(7)
    reference_backend = fusedlm.attention(q, k, v, dropout_p=0.5, backend="torch")
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    torch.testing.assert_close(first, reference_backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_keeps_the_expected_share_unbiased(backend):
    """With equal scores (q = 0), one-hot values and 256 keys (D = 256), out[i, d] is row i's
    kept share of key d's probability times 1 / (1 - p): the kept fraction is 1 - p within
    binomial noise and the mean output that of no dropout (inverted dropout is unbiased)."""
    _skip_if_refused(backend, torch.float32)
    device = device_of(backend)
    p, Tq, Tk = 0.3, 200, 256
    q = torch.zeros(1, 1, Tq, Tk, device=device)
    k = torch.randn(1, 1, Tk, Tk, device=device)
    v = torch.eye(Tk, device=device)[None, None]  # (1, 1, Tk, Tk): out = P * M / (1 - p)
    torch.manual_seed(3)
    out = fusedlm.attention(q, k, v, dropout_p=p, backend=backend)
    kept = out != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / Tk / (1 - p)))
    assert abs(out.sum(-1).mean().item() - 1.0) < 5 * math.sqrt(p / (1 - p) / Tq / Tk) + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_dropout_is_attention_on_the_packed_view(backend, pinned_seed):
    """attention_varlen with dropout: fusedlm.attention on the (1, H, total, D) view with each
    query's sequence as its key range, mask included (the counters are the packed rows')."""
    _skip_if_refused(backend, torch.float32)
    device = device_of(backend)
    lengths_q, lengths_k = [5, 1, 12], [7, 3, 12]
    Hq, Hkv, D = 4, 2, 16
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(sum(lengths_q), Hq, D, generator=gen).to(device).requires_grad_()
    k = torch.randn(sum(lengths_k), Hkv, D, generator=gen).to(device).requires_grad_()
    v = torch.randn(sum(lengths_k), Hkv, D, generator=gen).to(device).requires_grad_()
    cu_q = torch.tensor([0, 5, 6, 18], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 7, 10, 22], dtype=torch.int32, device=device)
    out = fusedlm.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=0.4, backend=backend)
    out.square().sum().backward()

    sequence_of_query = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths_q))
    key_range = torch.stack([cu_k[:-1].cpu()[sequence_of_query],
                             cu_k[1:].cpu()[sequence_of_query]], dim=1)[None]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    views = [t.transpose(0, 1)[None] for t in leaves]
    keep = reference.attention_dropout_keep(1, Hq, 18, 22, 0.4, SEED, device)
    expected = naive_attention(*views, key_range=key_range.to(device), dropout_keep=keep,
                               dropout_p=0.4)
    torch.testing.assert_close(out, expected[0].transpose(0, 1))
    expected.square().sum().backward()
    for name, leaf, ours in zip(("dq", "dk", "dv"), leaves, (q, k, v), strict=True):
        torch.testing.assert_close(ours.grad, leaf.grad, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_drop_in_runs_dropout_in_our_kernels(backend, pinned_seed):
    """fusedlm.scaled_dot_product_attention(dropout_p=...) is served by our kernels (no longer
    handed to torch's SDPA) with the mask of the seed; dropout_p >= 1 still goes to torch's."""
    _skip_if_refused(backend, torch.float32)
    q, k, v, *_ = _inputs((2, 4, 4, 13, 13, 16), torch.float32, device_of(backend))
    out, ours = attention_ops.sdpa_with_route(q, k, v, dropout_p=0.3, is_causal=True,
                                              backend=backend)
    assert ours
    keep = reference.attention_dropout_keep(2, 4, 13, 13, 0.3, SEED, q.device)
    torch.testing.assert_close(
        out, naive_attention(q, k, v, causal=True, causal_offset=0, dropout_keep=keep,
                             dropout_p=0.3))
    out, ours = attention_ops.sdpa_with_route(q, k, v, dropout_p=1.0)
    assert not ours and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend", BACKENDS)
def test_activation_checkpointing_recomputes_the_same_mask(backend):
    """torch.utils.checkpoint restores the default generator for the recomputation, so the
    recomputed forward draws the same seed: the gradients of an uncheckpointed run."""
    _skip_if_refused(backend, torch.float32)
    q, k, v, *_ = _inputs((1, 4, 2, 21, 21, 16), torch.float32, device_of(backend))

    def block(q, k, v):
        return fusedlm.attention(q, k, v, causal=True, dropout_p=0.3, backend=backend)

    grads = []
    for checkpointed in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(11)
        if checkpointed:
            out = torch.utils.checkpoint.checkpoint(block, *leaves, use_reentrant=False)
        else:
            out = block(*leaves)
        grads.append(torch.autograd.grad(out.square().sum(), leaves))
    for name, plain, recomputed in zip(("dq", "dk", "dv"), *grads, strict=True):
        torch.testing.assert_close(recomputed, plain, msg=name)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_compile_fullgraph(backend):
    """Under torch.compile the seed's draw is in the graph (a tensor, not a constant): each
    call of the compiled function drops anew, and with the generator seeded alike it drops what
    eager drops, forward and backward."""
    _skip_if_refused(backend, torch.float32)
    torch._dynamo.reset()
    q, k, v, _, grad_out, _ = _inputs((2, 4, 2, 13, 21, 16), torch.float32, device_of(backend))

    def step(q, k, v):
        return (fusedlm.attention(q, k, v, causal=True, dropout_p=0.3, backend=backend)
                * grad_out).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(5)
        loss = fn(*leaves)
        results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
    for name, eager, traced in zip(("loss", "dq", "dk", "dv"), *results, strict=True):
        torch.testing.assert_close(traced, eager, msg=name)
    assert not torch.equal(compiled(q, k, v), compiled(q, k, v))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@needs_cpu_backend
def test_dropout_compile_inductor_draws_a_mask_per_call():
    """Under torch.compile's default backend (inductor, which runs the seed's draw with its own
    random numbers, as it does torch's dropout): each call drops anew, torch.manual_seed
    repeats a call, and the backward runs."""
    torch._dynamo.reset()
    q, k, v = (t.requires_grad_() for t in _inputs((2, 4, 2, 13, 21, 16), torch.float32,
                                                    "cpu")[:3])

    def loss(q, k, v):
        return fusedlm.attention(q, k, v, causal=True, dropout_p=0.3, backend="cpu").square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    torch.manual_seed(0)
    first = compiled(q, k, v)
    torch.manual_seed(0)
    again = compiled(q, k, v)
    later = compiled(q, k, v)
    assert torch.equal(first, again) and not torch.equal(again, later)
    grads = torch.autograd.grad(first, (q, k, v))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck_with_dropout(backend):
    """torch.library.opcheck of fusedlm::attention_fwd/bwd with dropout (schema, fake tensors,
    autograd registration)."""
    q, k, v, _, grad_out, grad_lse = _inputs((1, 4, 2, 9, 11, 8), torch.float32, "cpu")
    seed = torch.tensor(SEED)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.fusedlm.attention_fwd.default,
                          (*leaves, 0.35, True, 2, backend, None, None, 0.0, 0.3, seed))
    out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, 0.35, True, 2, backend, None, None, 0.0,
                                               0.3, seed)
    torch.library.opcheck(torch.ops.fusedlm.attention_bwd.default,
                          (grad_out, q, k, v, out, lse, 0.35, True, 2, backend, None, None,
                           grad_lse.float(), 0.0, 0.3, seed))


# ---- bad inputs and the cuda backend ------------------------------------------------------


@pytest.mark.parametrize("dropout_p, error, match", [
    (-0.1, ValueError, r"argument 'dropout_p' must be in \[0, 1\)"),
    (1.0, ValueError, r"argument 'dropout_p' must be in \[0, 1\)"),
    (math.nan, ValueError, "dropout_p"),
    ("0.1", TypeError, "dropout_p"),
    (True, TypeError, "dropout_p"),
])
def test_bad_dropout_p_is_named(dropout_p, error, match):
    q, k, v, *_ = _inputs((1, 2, 2, 4, 4, 8), torch.float32, "cpu")
    with pytest.raises(error, match=match):
        fusedlm.attention(q, k, v, dropout_p=dropout_p)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(error, match=match):
        fusedlm.attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1),
                                 v[0].transpose(0, 1), cu, cu, dropout_p=dropout_p)


@pytest.mark.parametrize("backend", kernel_backends())
def test_extension_entry_points_check_dropout(backend):
    """fusedlm._C.attention_fwd/bwd name a dropout_p outside [0, 1) and a seed that is not one
    int64 element on q's device (none at all with dropout, int32, two elements, another
    device); any int64 value is a seed (its 64 bits), negative ones too."""
    from fusedlm import _ext

    C = _ext.load()
    q, k, v, _, grad_out, _ = _inputs((1, 2, 2, 4, 4, 8), torch.float32, "cpu")
    seed = torch.tensor(-3)
    out, lse = C.attention_fwd(q, k, v, 0.5, False, 0, dropout_p=0.5, dropout_seed=seed)
    keep = reference.attention_dropout_keep(1, 2, 4, 4, 0.5, -3)
    truth = naive_attention(q.double(), k.double(), v.double(), scale=0.5, dropout_keep=keep,
                            dropout_p=0.5)
    torch.testing.assert_close(out.double(), truth, atol=1e-5, rtol=1e-5)
    C.attention_bwd(grad_out, q, k, v, out, lse, 0.5, False, 0, dropout_p=0.5,
                    dropout_seed=seed)
    for bad, name in (({"dropout_p": 1.0}, "dropout_p"), ({"dropout_p": -0.5}, "dropout_p"),
                      ({"dropout_p": 0.5}, "dropout_seed"),
                      ({"dropout_p": 0.5, "dropout_seed": seed.int()}, "dropout_seed"),
                      ({"dropout_p": 0.5, "dropout_seed": torch.tensor([3, 4])}, "dropout_seed"),
                      ({"dropout_p": 0.5, "dropout_seed": seed.to("meta")}, "dropout_seed")):
        error = TypeError if bad.get("dropout_seed", seed).dtype != torch.int64 else ValueError
        with pytest.raises(error, match=name):
            C.attention_fwd(q, k, v, 0.5, False, 0, **bad)
        with pytest.raises(error, match=name):
            C.attention_bwd(grad_out, q, k, v, out, lse, 0.5, False, 0, **bad)


@pytest.mark.parametrize("backend", CUDA)
def test_auto_takes_the_cuda_kernels(backend):
    """On a GPU an fp16 dropout call with backend auto runs the CUDA kernels, forward and
    backward, with the mask of the seed it drew."""
    q, k, v, _, grad_out, _ = _inputs((1, 4, 2, 17, 23, 64), torch.float16, "cuda")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(0)
    out = fusedlm.attention(*leaves, causal=True, dropout_p=0.2)
    assert OpDispatch.last_choice["attention_fwd"] == "cuda"
    out.backward(grad_out)
    assert OpDispatch.last_choice["attention_bwd"] == "cuda"
    torch.manual_seed(0)
    seed = attention_ops._dropout_seed(q.device)  # (on the GPU: read there, no host copy)
    assert seed.device == q.device
    keep = reference.attention_dropout_keep(1, 4, 17, 23, 0.2, seed, "cuda")
    truth = naive_attention(q.double(), k.double(), v.double(), causal=True, dropout_keep=keep,
                            dropout_p=0.2)
    baseline = naive_attention(q, k, v, causal=True, dropout_keep=keep, dropout_p=0.2)
    assert_close_rule(out, baseline, truth, name="out")


@pytest.mark.parametrize("backend", GPU_KERNELS)
def test_dropout_in_a_captured_cuda_graph_draws_each_replay(backend, monkeypatch):
    """A forward and backward captured by hand in a CUDA graph (torch.cuda.graph, as
    make_graphed_callables does): the seed's draw is one of the graph's kernels and the
    attention kernels read it from device memory, so each replay drops another mask, and its
    out and gradients are those of an eager call with the seed that replay drew. (A seed handed
    to the kernels as a host int would be frozen into the graph: one mask for every replay.)"""
    drawn = []
    draw = attention_ops._dropout_seed
    monkeypatch.setattr(attention_ops, "_dropout_seed",
                        lambda device: drawn.append(draw(device)) or drawn[-1])
    q, k, v, _, grad_out, _ = _inputs((2, 4, 2, 97, 97, 64), torch.float16, "cuda")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def step():
        out = fusedlm.attention(*leaves, causal=True, dropout_p=0.25, backend=backend)
        return [out, *torch.autograd.grad(out, leaves, grad_out)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (Triton compiles here)
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    seed = drawn[-1]  # the graph's seed tensor: each replay's draw lands in it
    replays = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        replays.append((seed.clone(), [t.clone() for t in captured]))
    assert int(replays[0][0]) != int(replays[1][0])
    assert not torch.equal(replays[0][1][0], replays[1][1][0])
    for replay_seed, got in replays:
        monkeypatch.setattr(attention_ops, "_dropout_seed", lambda device, s=replay_seed: s)
        want = step()
        assert torch.equal(got[0], want[0]), "out"
        for name, g, w in zip(("dq", "dk", "dv"), got[1:], want[1:], strict=True):
            # (equal but for the atomic dq sums of the cuda backend's default mode)
            torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2 * w.abs().max().item(),
                                       msg=name)


def test_cuda_kernels_take_dropout_calls(monkeypatch):
    """The CUDA kernels' support check takes dropout (fp16 on sm_80+), so auto prefers them on
    a GPU; their numerics are tests/cuda_emulation/test_attention_score_mods_emulated.py's."""
    monkeypatch.setattr(attention_ops, "_capability", lambda device: (8, 0))
    q = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float16,
                              shape=(1, 4, 17, 64))
    assert attention_ops._extension_supports(q, q, q, None, None, 0.0, 0.1) is None
    assert attention_ops._triton_supports(q, q, q, None, None, 0.0, 0.1) is None
