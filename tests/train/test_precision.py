"""``precision``: the run's autocast dtype and fp16's dynamic loss scaling, on the CPU (where
torch runs bfloat16 and float16 autocast and GradScaler too): each mode trains, a float16 step
whose gradients overflow is skipped and the scale lowered without the NaN policy counting it,
and a resumed fp16 run continues from its saved scale."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from fusedlm.cli import main
from fusedlm.train import checkpoint as ckpt
from fusedlm.train.config import ConfigError, make_config
from fusedlm.train.precision import Precision, resolve_precision
from fusedlm.train.trainer import Trainer

from .conftest import TINY_MODEL, read_metrics, train_flags
from .test_classify import classify_flags, reviews, write_jsonl


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these models gain nothing from a second, shared core
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("bf16_native", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_picks_by_device(monkeypatch, bf16_native, expected):
    """auto: fp32 on a CPU; on CUDA bf16 where the GPU runs it natively, else fp16 (asked
    without emulation: torch calls pre-Ampere GPUs bf16-capable by emulation)."""
    asked = {}

    def is_bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return bf16_native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_precision("auto", torch.device("cuda", 0)) == expected
    assert asked == {"including_emulation": False}
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    for name in ("bf16", "fp16", "fp32"):
        assert resolve_precision(name, torch.device("cpu")) == name


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="'precision' must be one of auto, bf16, fp16, fp32"):
        make_config(precision="fp8")
    with pytest.raises(ConfigError, match="'initial_loss_scale' must be a finite number >= 1"):
        make_config(initial_loss_scale=0.5)
    with pytest.raises(ValueError, match="once resolved, got 'auto'"):
        Precision("auto", torch.device("cpu"))


def test_each_precision_trains_near_fp32(data_dir, tmp_path, capsys):
    """Six steps in each mode: the 16-bit runs log losses within 1% of fp32's but not equal to
    them (autocast really ran), fp16 logs its loss scale each step (and nothing overflows at
    the default scale), and the checkpoint records the precision that ran (auto resolved)."""
    losses = {}
    for name in ("auto", "fp32", "bf16", "fp16"):
        out = tmp_path / name
        assert main(train_flags(data_dir, out, steps=6, precision=name, ckpt_every=6)) == 0
        records = read_metrics(out)
        losses[name] = [r["loss"] for r in records]
        assert all(("loss_scale" in r) == (name == "fp16") for r in records)
        if name == "fp16":
            assert {r["loss_scale"] for r in records} == {65536.0}
            assert not any(r.get("skipped") for r in records)
        ran = ckpt.load_checkpoint(str(out))
        assert ran["config"]["train"]["precision"] == ("fp32" if name == "auto" else name)
        assert (ran["trainer"]["loss_scaler"] is not None) == (name == "fp16")
    printed = capsys.readouterr().out
    assert "precision: fp32 (auto on cpu)\n" in printed
    assert "precision: fp16 with dynamic loss scaling (GradScaler, initial scale 65536)" in printed
    assert losses["auto"] == losses["fp32"]
    for name in ("bf16", "fp16"):
        assert losses[name] != losses["fp32"], f"{name}: autocast did not change a thing"
        for got, want in zip(losses[name], losses["fp32"], strict=True):
            assert got == pytest.approx(want, rel=0.01), name


def _fp16_trainer(data_dir, out, **overrides) -> Trainer:
    values = dict(data=data_dir, out=str(out), model=json.loads(TINY_MODEL), batch_size=4,
                  max_steps=12, eval_every=0, ckpt_every=0, warmup_steps=2, seed=3,
                  precision="fp16", lr=3e-3)
    values.update(overrides)
    return Trainer(make_config(**values), log=lambda *a: None)


def test_fp16_overflow_skips_the_step_halves_the_scale_and_is_not_a_bad_step(data_dir,
                                                                              tmp_path):
    """At a loss scale of 2**24 the tiny model's float16 gradients overflow (at this batch its
    first steps overflow from 2**17 up): the scaler skips those steps (the weights do not move)
    and halves the scale each time, until a step goes through. nan_policy "stop" with
    max_bad_steps 1 does not stop for it: an overflow is the scaler's business; a NaN loss
    still stops the run."""
    trainer = _fp16_trainer(data_dir, tmp_path / "run", nan_policy="stop", max_bad_steps=1,
                            initial_loss_scale=2.0**24)
    first = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    step_fn, moved = trainer.train_step, []

    def watch(step):
        result = step_fn(step)
        moved.append(any(not torch.equal(v, first[k])
                         for k, v in trainer.raw_model.state_dict().items()))
        return result

    trainer.train_step = watch
    trainer.train()
    records = read_metrics(tmp_path / "run")
    overflowed = [bool(r.get("overflow")) for r in records]
    skipped = overflowed.index(False)
    assert 5 <= skipped <= 9, overflowed  # 2**24 down to 2**19..2**15 (8 when written)
    assert overflowed == [True] * skipped + [False] * (len(records) - skipped), overflowed
    assert all(r["skipped"] and r["grad_norm"] is None for r in records[:skipped])
    assert [r["loss_scale"] for r in records[:skipped + 1]] == [
        2.0**(24 - i) for i in range(skipped + 1)]
    assert moved == [False] * skipped + [True] * (len(records) - skipped)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[skipped]["loss"]  # and then it learns


def test_fp16_resume_continues_from_the_saved_scale(data_dir, tmp_path):
    """A run that overflowed (scale lowered) resumes from its step-6 checkpoint with the scale
    it had there, so it logs the losses and scales of the run that never stopped."""
    flags = dict(steps=12, precision="fp16", ckpt_every=6, lr="3e-3")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    with open(tmp_path / "scale.toml", "w") as f:
        f.write("initial_loss_scale = 4194304.0\n")  # 2**22: the first steps overflow
    toml = str(tmp_path / "scale.toml")

    def run(out, *extra):
        command, *rest = train_flags(data_dir, out, **flags)
        return main([command, toml, *rest, *extra])

    assert run(full) == 0
    want = read_metrics(full)
    assert want[0]["overflow"] and want[5]["loss_scale"] < 2.0**22  # the scale has moved
    # resumed: the full run as it was after its step-6 checkpoint
    os.makedirs(resumed / "checkpoints")
    os.rename(full / "checkpoints" / "step_0000006", resumed / "checkpoints" / "step_0000006")
    (resumed / "checkpoints" / "latest").write_text("step_0000006")
    with open(resumed / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in want[:6])
    assert run(resumed, "--resume") == 0
    got = read_metrics(resumed)
    keys = ("step", "loss", "loss_scale", "grad_norm")
    assert [[r.get(k) for k in keys] for r in got] == [[r.get(k) for k in keys] for r in want]


def test_classify_trains_in_fp16(tmp_path):
    """The classifier's loop takes the same precision: fp16 logs its loss scale."""
    data = write_jsonl(tmp_path / "train.jsonl", reviews(40, seed=4))
    out = tmp_path / "run"
    assert main(classify_flags(data, out, 3, "--precision", "fp16", "--eval-every", "0")) == 0
    records = [r for r in read_metrics(out) if "loss" in r]
    assert len(records) == 3 and all(r["loss_scale"] == 65536.0 for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)
