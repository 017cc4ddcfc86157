"""Runs every fusedlm GPU kernel once on tiny inputs, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/sanitizer_cases.py --backend cuda
    compute-sanitizer --tool racecheck python benchmarks/sanitizer_cases.py --backend triton

Each case (attention forward + backward for each dtype, causal and not, GQA, odd lengths and
head dims, rows that see no key, strided and misaligned inputs, the deterministic backward,
windows, key ranges, packed documents, decoding, soft-capping and dropout;
LayerNorm and RMSNorm forward + backward, with and without affine parameters, odd widths;
cross-entropy forward + backward on strided logits and linear_cross_entropy in chunks whose
gradient is written over their logits (Triton); rotary embeddings forward + backward on
strided q views, partial and interleaved, with per-row angle tables, and SwiGLU and GeGLU
(exact and tanh gelu) forward + backward on odd widths and the strided halves of a fused
projection (Triton); the AdamW step
for float32 and
bfloat16 parameters, with and without amsgrad) runs through the public API with
``backend=<name>``, then the device is synchronized so that an asynchronous fault lands on its
case. A case the backend does not support (it raises
fusedlm.BackendNotSupportedError) is recorded as unsupported, not as a failure; a backend that
is not available here (``fusedlm.backends()``) is skipped whole.

Under memcheck, set PYTORCH_NO_CUDA_MEMORY_CACHING=1 (benchmarks/gpu_check does): each tensor
is then its own allocation, so an out-of-bounds access cannot hide inside the caching
allocator's blocks. Exit status: 1 if any case raised anything but BackendNotSupportedError.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (B, Hq, Hkv, Tq, Tk, D): square, GQA with Tq != Tk and odd sizes, a longer block-crossing one,
# Tq > Tk (causal rows that see no key) at the largest head dim, one query row at an odd head dim,
# more key tiles than the Hopper forward's 2-stage ring holds
ATTENTION_SHAPES = ((1, 2, 2, 17, 17, 64), (2, 4, 2, 5, 33, 40), (1, 2, 1, 130, 130, 128),
                    (2, 4, 1, 150, 40, 256), (1, 3, 3, 1, 77, 33), (1, 2, 1, 70, 300, 64))
NORM_SHAPES = ((7, 127), (4, 1024), (3, 4099))
# (N, V): several rows per program, a ragged last chunk of 4096 columns
CROSS_ENTROPY_SHAPES = ((37, 127), (3, 5000))
# (B, H, T, D, R, interleaved, per-row angles): a (B, T, H, D) projection's view, full
# rotary; partial rotary (pass-through features) at an odd T; interleaved pairs with per-row
# (B, T, R/2) angles; odd T past one tile of positions at a head dim not a power of two
ROTARY_SHAPES = ((2, 4, 17, 64, 64, False, False), (1, 3, 33, 72, 32, False, False),
                 (2, 2, 9, 40, 40, True, True), (1, 2, 300, 80, 64, False, True))
# (N, I): odd widths, one wider than a column block (2048), a row shorter than one tile
GLU_SHAPES = ((7, 127), (3, 4099), (1, 33))
ADAMW_SHAPES = ((127,), (33, 65), (4099,))


def _param(n: int, dev: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(n, device=dev, dtype=dtype, requires_grad=True)


def _both_dq_paths(forward) -> None:
    """forward() then its backward, with the atomic dQ and then the deterministic one."""
    was = torch.are_deterministic_algorithms_enabled()
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            out = forward()
            out.backward(torch.randn_like(out))
        finally:
            torch.use_deterministic_algorithms(was)


def _with_sm80_kernels(case):
    """case() with FUSEDLM_ATTENTION_SM90=0 (the sm_80 kernels on an sm_90 GPU too)."""
    from fusedlm.bench.cases import attention_sm90_setting

    def run():
        with attention_sm90_setting("0"):
            case()

    return run


def _cases(backend: str, dev: str = "cuda"):
    import fusedlm
    from fusedlm.bench.cases import attention_sm90_setting

    for dtype in DTYPES:
        dn = str(dtype).removeprefix("torch.")
        for causal in (False, True):
            for B, Hq, Hkv, Tq, Tk, D in ATTENTION_SHAPES:
                def attention(B=B, Hq=Hq, Hkv=Hkv, Tq=Tq, Tk=Tk, D=D, dtype=dtype, causal=causal):
                    q = torch.randn(B, Hq, Tq, D, device=dev, dtype=dtype, requires_grad=True)
                    k = torch.randn(B, Hkv, Tk, D, device=dev, dtype=dtype, requires_grad=True)
                    v = torch.randn(B, Hkv, Tk, D, device=dev, dtype=dtype, requires_grad=True)
                    out = fusedlm.attention(q, k, v, causal=causal, backend=backend)
                    out.backward(torch.randn_like(out))

                yield (f"attention fwd+bwd {dn} {'causal' if causal else 'full'} "
                       f"B={B} Hq={Hq} Hkv={Hkv} Tq={Tq} Tk={Tk} D={D}", attention)

        def attention_layouts(dtype=dtype):
            # q, k from a packed (B, T, 3, H, D) tensor (strided views), v at a 1-element
            # storage offset (misaligned: copied), under the deterministic backward
            B, T, H, D = 2, 37, 4, 64
            qkv = torch.randn(B, T, 3, H, D, device=dev, dtype=dtype, requires_grad=True)
            q, k, _ = (t.transpose(1, 2) for t in qkv.unbind(2))
            flat = torch.randn(B * H * T * D + 1, device=dev, dtype=dtype)[1:]
            v = flat.view(B, H, T, D).requires_grad_(True)
            was = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(True)
            try:
                out = fusedlm.attention(q, k, v, causal=True, backend=backend)
                out.backward(torch.randn_like(out))
            finally:
                torch.use_deterministic_algorithms(was)

        yield f"attention fwd+bwd {dn} strided/misaligned, deterministic", attention_layouts

        def attention_sm80_kernels(dtype=dtype):
            # on an sm_90 GPU the cases above run the sm_90a kernels: the sm_80 ones too
            q, k, v = (torch.randn(1, 2, 130, 128, device=dev, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            with attention_sm90_setting("0"):
                out = fusedlm.attention(q, k, v, causal=True, backend=backend)
                out.backward(torch.randn_like(out))

        if backend == "cuda":
            yield (f"attention fwd+bwd {dn} sm_80 kernels (FUSEDLM_ATTENTION_SM90=0)",
                   attention_sm80_kernels)

        def attention_sliding_window(dtype=dtype):
            # the key loops start past tile 0 and the dK/dV query loop stops early
            q = torch.randn(1, 4, 300, 64, device=dev, dtype=dtype, requires_grad=True)
            k, v = (torch.randn(1, 2, 330, 64, device=dev, dtype=dtype, requires_grad=True)
                    for _ in range(2))
            _both_dq_paths(lambda: fusedlm.attention(q, k, v, causal=True, window=(100, 0),
                                                     backend=backend))

        def attention_key_range(dtype=dtype):
            # padded batch: key loops over each row's range only, tiles cut by it, an empty row
            q = torch.randn(3, 4, 200, 64, device=dev, dtype=dtype, requires_grad=True)
            k, v = (torch.randn(3, 2, 200, 64, device=dev, dtype=dtype, requires_grad=True)
                    for _ in range(2))
            ranges = torch.tensor([[70, 200], [0, 133], [200, 200]], device=dev)
            _both_dq_paths(lambda: fusedlm.attention(q, k, v, causal=True, key_range=ranges,
                                                     backend=backend))

        def attention_documents(dtype=dtype):
            # packed documents: per-query key ranges (the query extent kernels, per-row bounds)
            q, k, v = (torch.randn(2, 2, 190, 64, device=dev, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            ids = torch.tensor([[0] * 50 + [1] * 3 + [2] * 137, [0] * 190], device=dev)
            ranges = fusedlm.key_range_from_document_ids(ids)
            _both_dq_paths(lambda: fusedlm.attention(q, k, v, causal=True, key_range=ranges,
                                                     backend=backend))

        def attention_decode(dtype=dtype):
            # decoding steps: a GQA group's query heads packed into rows, the keys split over
            # CTAs and their partial results combined (attention_fwd.cu's plan); a padded batch
            # row that sees no key
            q = torch.randn(2, 8, 1, 64, device=dev, dtype=dtype)
            k, v = (torch.randn(2, 2, 700, 64, device=dev, dtype=dtype) for _ in range(2))
            ranges = torch.tensor([[100, 700], [0, 0]], device=dev)
            with torch.no_grad():
                fusedlm.attention(q, k, v, causal=True, key_range=ranges, backend=backend)
                fusedlm.attention(q[:, :2], k, v, causal=False, backend=backend)

        def attention_score_mods(dtype=dtype):
            # soft-capping and dropout (the cuda kernels' kScoreMods instances), GQA, odd
            # lengths, then with packed documents (their per-query instances) and decoding
            q = torch.randn(2, 4, 150, 64, device=dev, dtype=dtype, requires_grad=True)
            k, v = (torch.randn(2, 2, 170, 64, device=dev, dtype=dtype, requires_grad=True)
                    for _ in range(2))
            _both_dq_paths(lambda: fusedlm.attention(q, k, v, causal=True, softcap=5.0,
                                                     dropout_p=0.2, backend=backend))
            ids = torch.tensor([[0] * 50 + [1] * 100, [0] * 150], device=dev)
            ranges = fusedlm.key_range_from_document_ids(ids)
            _both_dq_paths(lambda: fusedlm.attention(q, k[:, :, :150], v[:, :, :150],
                                                     causal=True, key_range=ranges, softcap=5.0,
                                                     dropout_p=0.2, backend=backend))
            with torch.no_grad():
                fusedlm.attention(q[:, :, :1], k, v, softcap=5.0, dropout_p=0.2, backend=backend)

        yield f"attention fwd {dn} decoding (heads packed, keys split)", attention_decode
        for name, case in (("sliding window (100, 0)", attention_sliding_window),
                           ("key range (padded batch)", attention_key_range),
                           ("packed documents", attention_documents),
                           ("softcap and dropout", attention_score_mods)):
            yield f"attention fwd+bwd {dn} {name}", case
            if backend == "cuda":
                # on an sm_90 GPU the above runs the sm_90a kernels: the sm_80 bounded ones too
                yield (f"attention fwd+bwd {dn} {name}, sm_80 kernels (FUSEDLM_ATTENTION_SM90=0)",
                       _with_sm80_kernels(case))
        for M, N in NORM_SHAPES:
            for affine in (True, False):
                def layer_norm(M=M, N=N, dtype=dtype, affine=affine):
                    x = torch.randn(M, N, device=dev, dtype=dtype, requires_grad=True)
                    w = _param(N, dev, dtype) if affine else None
                    b = _param(N, dev, dtype) if affine else None
                    y = fusedlm.layer_norm(x, (N,), w, b, 1e-5, backend=backend)
                    y.backward(torch.randn_like(y))

                def rms_norm(M=M, N=N, dtype=dtype, affine=affine):
                    x = torch.randn(M, N, device=dev, dtype=dtype, requires_grad=True)
                    w = _param(N, dev, dtype) if affine else None
                    y = fusedlm.rms_norm(x, (N,), w, 1e-6, backend=backend)
                    y.backward(torch.randn_like(y))

                tag = "affine" if affine else "no-affine"
                yield f"layer_norm fwd+bwd {dn} {M}x{N} {tag}", layer_norm
                yield f"rms_norm fwd+bwd {dn} {M}x{N} {tag}", rms_norm
        if backend == "triton":  # (the residual-add norms have no CUDA C++ kernel)
            for M, N in NORM_SHAPES:
                def add_norms(M=M, N=N, dtype=dtype):
                    # a 16-bit branch on a float32 stream (strided), and same-dtype pairs
                    for residual_dtype in (torch.float32, dtype):
                        x = torch.randn(M, N, device=dev, dtype=dtype, requires_grad=True)
                        r = torch.randn(M, 2 * N, device=dev, dtype=residual_dtype)[:, ::2]
                        r.requires_grad_(True)
                        w = _param(N, dev, residual_dtype)
                        b = _param(N, dev, residual_dtype)
                        y, h = fusedlm.add_layer_norm(x, r, (N,), w, b, 1e-5, backend=backend)
                        torch.autograd.backward((y, h), (torch.randn_like(y), torch.randn_like(h)))
                        y, h = fusedlm.add_rms_norm(x, r, (N,), w, 1e-6, backend=backend)
                        y.backward(torch.randn_like(y))  # (h unused: no grad_h)

                yield f"add_layer_norm/add_rms_norm fwd+bwd {dn} {M}x{N}", add_norms
        if backend == "triton":  # (the op has no CUDA C++ kernel)
            for N, V in CROSS_ENTROPY_SHAPES:
                def cross_entropy(N=N, V=V, dtype=dtype):
                    logits = torch.randn(N, 2 * V, device=dev, dtype=dtype)[:, ::2]
                    logits.requires_grad_(True)
                    target = torch.randint(0, V, (N,), device=dev)
                    target[::3] = -100
                    loss = fusedlm.cross_entropy(logits, target, label_smoothing=0.1,
                                                 backend=backend)
                    loss.backward()

                yield f"cross_entropy fwd+bwd {dn} {N}x{V} strided", cross_entropy

                def linear_cross_entropy(N=N, V=V, dtype=dtype):
                    # the backward kernel writes each chunk's gradient over its logits
                    hidden = torch.randn(N, 32, device=dev, dtype=dtype, requires_grad=True)
                    weight = torch.randn(V, 32, device=dev, dtype=dtype, requires_grad=True)
                    target = torch.randint(0, V, (N,), device=dev)
                    loss = fusedlm.linear_cross_entropy(hidden, weight, target, chunk_size=3,
                                                        backend=backend)
                    loss.backward()

                yield (f"linear_cross_entropy fwd+bwd {dn} {N}x32x{V} chunks of 3",
                       linear_cross_entropy)
            for B, H, T, D, R, interleaved, per_row in ROTARY_SHAPES:
                def rotary(B=B, H=H, T=T, D=D, R=R, dtype=dtype, interleaved=interleaved,
                           per_row=per_row):
                    # x a (B, T, H, D) projection's transpose(1, 2) view; float32 angles (any
                    # float dtype is taken), strided: every other column of a wider table
                    x = torch.randn(B, T, H, D, device=dev, dtype=dtype).transpose(1, 2)
                    x.requires_grad_(True)
                    shape = (B, T, R) if per_row else (T, R)
                    cos = torch.randn(shape, device=dev)[..., ::2]
                    sin = torch.randn(shape, device=dev)[..., ::2]
                    out = fusedlm.rotary_embedding(x, cos, sin, interleaved=interleaved,
                                                   backend=backend)
                    out.backward(torch.randn_like(out))

                yield (f"rotary_embedding fwd+bwd {dn} B={B} H={H} T={T} D={D} R={R}"
                       f"{' interleaved' if interleaved else ''}"
                       f"{' per-row angles' if per_row else ''}", rotary)
            for N, width in GLU_SHAPES:
                for approximate in (None, "none", "tanh"):  # swiglu; geglu exact and tanh
                    def glu(N=N, width=width, dtype=dtype, approximate=approximate):
                        # gate and up: the two halves of a fused (N, 2I) projection (row
                        # stride 2I)
                        fused = torch.randn(N, 2 * width, device=dev, dtype=dtype,
                                            requires_grad=True)
                        gate, up = fused[:, :width], fused[:, width:]
                        if approximate is None:
                            out = fusedlm.swiglu(gate, up, backend=backend)
                        else:
                            out = fusedlm.geglu(gate, up, approximate=approximate,
                                                backend=backend)
                        out.backward(torch.randn_like(out))

                    name = ("swiglu" if approximate is None
                            else f"geglu approximate={approximate!r}")
                    yield (f"{name} fwd+bwd {dn} {N}x{width} halves of a fused projection",
                           glu)
    for dtype in (torch.float32, torch.bfloat16):
        dn = str(dtype).removeprefix("torch.")
        for amsgrad in (False, True):
            def adamw(dtype=dtype, amsgrad=amsgrad):
                params = [torch.nn.Parameter(torch.randn(s, device=dev, dtype=dtype))
                          for s in ADAMW_SHAPES]
                opt = fusedlm.optim.AdamW(params, lr=1e-3, amsgrad=amsgrad, backend=backend)
                for _ in range(2):
                    for p in params:
                        p.grad = torch.randn_like(p)
                    opt.step()

            yield f"adamw 2 steps {dn}{' amsgrad' if amsgrad else ''}", adamw


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(backend: str, device: str = "cuda") -> dict:
    import fusedlm

    result = {"backend": backend, "device": device, "cases": [], "ok": 0, "unsupported": 0,
              "failed": 0}
    info = fusedlm.backends().get(backend)
    if device == "cuda" and not torch.cuda.is_available():
        result["status"] = "skipped: no CUDA GPU"
        return result
    if info is None or not info.available:
        result["status"] = f"skipped: backend {backend!r} unavailable: " + \
            (info.reason if info is not None else "unknown backend")
        return result
    torch.manual_seed(0)
    for name, case in _cases(backend, device):
        t0 = time.perf_counter()
        entry = {"case": name}
        try:
            case()
            _sync(device)
            entry["status"] = "ok"
        except fusedlm.BackendNotSupportedError as why:
            entry["status"] = "unsupported"
            entry["reason"] = str(why).splitlines()[0][:300]
        except Exception as error:  # noqa: BLE001 - recorded; the run goes on
            entry["status"] = "failed"
            entry["reason"] = f"{type(error).__name__}: {str(error).strip()[:500]}"
            entry["traceback"] = traceback.format_exc(limit=6)[-2000:]
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        result["cases"].append(entry)
        result[entry["status"]] += 1
        print(f"[{backend}] {entry['status']:<11} {name}"
              + (f": {entry.get('reason', '')[:160]}" if entry["status"] != "ok" else ""),
              flush=True)
    result["status"] = "failed" if result["failed"] else "ok"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cuda,triton",
                        help="comma-separated backends (default: cuda,triton)")
    parser.add_argument("--json", default=None, help="write the per-case results here")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default); cpu runs the same cases on CPU tensors (a smoke "
                             "test of this script, e.g. --backend cpu)")
    args = parser.parse_args(argv)
    results = [run(b.strip(), args.device) for b in args.backend.split(",") if b.strip()]
    for r in results:
        print(f"[{r['backend']}] {r['status']}: {r['ok']} ok, {r['unsupported']} unsupported, "
              f"{r['failed']} failed", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if any(r["failed"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
