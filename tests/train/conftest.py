"""Fixtures for the trainer tests: a small byte-level data set prepared from a few standard
library sources, and the flags of a model small enough for a 2-core CPU."""

from __future__ import annotations

import json
import os
import sysconfig

import pytest

from fusedlm.train.prepare import prepare

TINY_MODEL = json.dumps({"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32})


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    stdlib = sysconfig.get_paths()["stdlib"]
    files = [os.path.join(stdlib, name) for name in ("textwrap.py", "string.py", "bisect.py",
                                                      "heapq.py", "fnmatch.py")]
    out = tmp_path_factory.mktemp("data")
    prepare(files, str(out), "byte", val_fraction=0.1, log=lambda *a: None)
    return str(out)


def train_flags(data_dir: str, out, steps: int = 6, model: str | None = TINY_MODEL,
                **extra) -> list[str]:
    """CLI flags of a tiny, fast run (``model=None``: no --model, for --init-from runs)."""
    flags = ["train", "--data", data_dir, "--out", str(out)]
    flags += ["--model", model] if model else []
    flags += ["--batch-size", "4", "--max-steps", str(steps), "--eval-every", "0",
             "--ckpt-every", "0", "--warmup-steps", "2", "--seed", "3"]
    for key, value in extra.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def read_metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]

