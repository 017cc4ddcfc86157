"""Host time of one call of each fused op on a tiny input, against PyTorch's own op, on the CPU,
one thread, best of 5 rounds of 200 calls, the contenders interleaved so machine noise hits all
alike. For fwd+bwd, "fusedlm-python-node" is the same call with the C++ autograd nodes off (the
ops' Python autograd.Function, what every eager call used before them).

With inputs this small the kernels do almost nothing, so the time is what the Python checks,
the backend choice and the autograd machinery cost per call. On a GPU that time is spent before
each launch: a model whose per-layer kernels take less than it is host-bound.

    python benchmarks/call_overhead.py [--backend auto]
"""

from __future__ import annotations

import argparse
import importlib
import time

import torch
import torch.nn.functional as F

import fusedlm


def _both(pair):
    return pair[0] + pair[1]


def _eager_add_norm(norm, x, residual, *params):
    h = x + residual
    return norm(h, (8,), *params), h


def _eager_softcap_attention(q, k, v, cap=30.0):
    """Gemma 2's eager attention: scaled scores soft-capped, causal, softmax, @ v."""
    scores = torch.tanh(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 / cap) * cap
    T = q.shape[-2]
    hidden = torch.ones(T, T, dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1) @ v


def _eager_rotary(x, cos, sin):
    """Hugging Face Llama's apply_rotary_pos_emb for one tensor: rotate_half, two multiplies."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


def _cases(backend: str):
    x, residual = torch.randn(4, 8), torch.randn(4, 8)
    weight, bias = torch.ones(8), torch.zeros(8)
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    angles = torch.randn(16, 8)
    cos, sin = angles.cos(), angles.sin()
    return {
        "layer_norm (4, 8)": (
            (x, weight, bias),
            lambda x, w, b: fusedlm.layer_norm(x, (8,), w, b, backend=backend),
            lambda x, w, b: F.layer_norm(x, (8,), w, b),
        ),
        "rms_norm (4, 8)": (
            (x, weight),
            lambda x, w: fusedlm.rms_norm(x, (8,), w, backend=backend),
            lambda x, w: F.rms_norm(x, (8,), w),
        ),
        # y and h both read (y + h), as a pre-norm block reads them
        "add_layer_norm (4, 8)": (
            (x, residual, weight, bias),
            lambda x, r, w, b: _both(fusedlm.add_layer_norm(x, r, (8,), w, b, backend=backend)),
            lambda x, r, w, b: _both(_eager_add_norm(F.layer_norm, x, r, w, b)),
        ),
        "add_rms_norm (4, 8)": (
            (x, residual, weight),
            lambda x, r, w: _both(fusedlm.add_rms_norm(x, r, (8,), w, backend=backend)),
            lambda x, r, w: _both(_eager_add_norm(F.rms_norm, x, r, w)),
        ),
        "rotary_embedding (1, 2, 16, 16)": (  # (the tables take no gradient)
            (q,),
            lambda x: fusedlm.rotary_embedding(x, cos, sin, backend=backend),
            lambda x: _eager_rotary(x, cos, sin),
        ),
        "swiglu (4, 8)": (
            (x, residual),
            lambda g, u: fusedlm.swiglu(g, u, backend=backend),
            lambda g, u: F.silu(g) * u,
        ),
        "attention (1, 2, 16, 16) causal": (
            (q, k, v),
            lambda q, k, v: fusedlm.attention(q, k, v, causal=True, backend=backend),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        ),
        "attention softcap 30 (torch: eager)": (
            (q, k, v),
            lambda q, k, v: fusedlm.attention(q, k, v, causal=True, softcap=30.0,
                                              backend=backend),
            _eager_softcap_attention,
        ),
        "attention dropout 0.1": (
            (q, k, v),
            lambda q, k, v: fusedlm.attention(q, k, v, causal=True, dropout_p=0.1,
                                              backend=backend),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                           dropout_p=0.1),
        ),
    }


def _forward_no_grad(fn, inputs):
    def run():
        with torch.no_grad():
            fn(*inputs)
    return run


def _forward_backward(fn, inputs):
    leaves = [t.clone().requires_grad_(True) for t in inputs]

    def run():
        fn(*leaves).sum().backward()
    return run


def _python_function(fn):
    """``fn`` with the C++ autograd nodes turned off: the ops' Python autograd.Function runs, as
    it did for every backend before those nodes existed (the "before" column of a change)."""
    modules = [importlib.import_module(f"fusedlm.ops.{m}") for m in ("norm", "attention", "glu",
                                                                         "rotary")]

    def run(*args):
        saved = [m.extension_autograd for m in modules]
        for m in modules:
            m.extension_autograd = lambda *a, **k: None
        try:
            return fn(*args)
        finally:
            for m, f in zip(modules, saved, strict=True):
                m.extension_autograd = f

    return run


def main(backend: str = "cpu", calls: int = 200, rounds: int = 5) -> None:
    torch.set_num_threads(1)
    for name, (inputs, ours, theirs) in _cases(backend).items():
        for mode, wrap in (("fwd no_grad", _forward_no_grad), ("fwd+bwd", _forward_backward)):
            runs = {"fusedlm": wrap(ours, inputs), "torch": wrap(theirs, inputs)}
            if mode == "fwd+bwd":
                runs["fusedlm-python-node"] = wrap(_python_function(ours), inputs)
            best = dict.fromkeys(runs, float("inf"))
            for run in runs.values():  # warm-up: first-call costs, backend lookups
                for _ in range(20):
                    run()
            for _ in range(rounds):
                for label, run in runs.items():
                    start = time.perf_counter()
                    for _ in range(calls):
                        run()
                    best[label] = min(best[label], (time.perf_counter() - start) / calls * 1e6)
            print(f"{name:32s} {mode:11s} "
                  + "  ".join(f"{label} {us:6.1f} us" for label, us in best.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cpu", choices=("cpu", "auto", "torch"),
                        help="the backend fusedlm's calls name (auto: as a user's default call)")
    main(parser.parse_args().backend)
