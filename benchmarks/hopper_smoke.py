"""A quick check of fusedlm's Hopper (sm_90a) attention kernels before the long GPU steps.

    python benchmarks/hopper_smoke.py --json OUT.json

benchmarks/gpu_check runs it right after the build, under a short timeout: if the sm_90a
kernels hang or give wrong numbers on their first run, the later steps run with
FUSEDLM_ATTENTION_SM90=0 (the sm_80 kernels) and without the Hopper-only tests, instead of losing
the whole pytest step to a hang. Each case runs forward and backward with the Hopper kernels
required and with them off, and compares both with float32 math on the GPU: the Hopper error
must stay within 3x the sm_80 kernels' error plus a small absolute term.

Exit status 0 when every case passes or the GPU is not sm_90 (nothing to check), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

import torch

# (B, Hq, Hkv, Tq, Tk, D, causal): both templates, padded D, ragged tiles, more key tiles than
# ring stages, GQA, Tq > Tk (causal CTAs without a key tile)
CASES = [
    (1, 2, 2, 130, 130, 64, True),
    (2, 4, 2, 77, 300, 128, True),
    (1, 2, 1, 300, 40, 72, True),
    (1, 3, 3, 129, 257, 40, False),
]


def _reference(q, k, v, causal):
    """float32 softmax(q k^T / sqrt(D)) v, bottom-right causal, with GQA."""
    group = q.shape[1] // k.shape[1]
    qf, kf, vf = (t.float() for t in (q, k.repeat_interleave(group, 1),
                                      v.repeat_interleave(group, 1)))
    scores = qf @ kf.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        Tq, Tk = q.shape[2], k.shape[2]
        rows = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
        scores = scores.masked_fill(torch.arange(Tk, device=q.device)[None, :] > rows,
                                    float("-inf"))
    # rows that see no key: output 0 (and no NaN in the backward)
    seen = torch.isfinite(scores).any(dim=-1, keepdim=True)
    probs = torch.softmax(torch.where(seen, scores, 0.0), dim=-1) * seen
    return probs @ vf


def _run(q, k, v, grad_out, causal, setting):
    import fusedlm
    from fusedlm.bench.cases import attention_sm90_setting

    with attention_sm90_setting(setting):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = fusedlm.attention(*leaves, causal=causal, backend="cuda")
        out.backward(grad_out)
        torch.cuda.synchronize()
        return [out.detach(), *[t.grad for t in leaves]]


def check(case) -> dict:
    B, Hq, Hkv, Tq, Tk, D, causal = case
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16)
               for shape in ((B, Hq, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)))
    grad_out = torch.randn(B, Hq, Tq, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
    truth_out = _reference(*leaves, causal)
    truth = [truth_out.detach(), *torch.autograd.grad(truth_out, leaves, grad_out.float())]
    hopper = _run(q, k, v, grad_out, causal, "require")
    sm80 = _run(q, k, v, grad_out, causal, "0")
    result = {"case": list(case), "ok": True, "tensors": {}}
    for name, h, s, t in zip(("out", "dq", "dk", "dv"), hopper, sm80, truth, strict=True):
        err_hopper = (h.float() - t).abs().max().item()
        err_sm80 = (s.float() - t).abs().max().item()
        bound = 3 * err_sm80 + 1e-2 * max(1.0, t.abs().max().item())
        ok = bool(torch.isfinite(h).all()) and err_hopper <= bound
        result["tensors"][name] = {"err_hopper": err_hopper, "err_sm80": err_sm80,
                                   "bound": bound, "ok": ok}
        result["ok"] = result["ok"] and ok
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    report: dict = {"cases": []}
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        report["status"] = "skipped: not a compute capability 9.0 GPU"
    else:
        for case in CASES:
            try:
                report["cases"].append(check(case))
            except Exception:  # noqa: BLE001 - recorded per case
                report["cases"].append({"case": list(case), "ok": False,
                                        "error": traceback.format_exc()[-2000:]})
            print(json.dumps(report["cases"][-1]), flush=True)
        report["status"] = "ok" if all(c["ok"] for c in report["cases"]) else "failed"
    print(report["status"], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
