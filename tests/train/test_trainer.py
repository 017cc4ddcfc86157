"""The trainer: metrics, schedules, checkpoints (atomic, verified, keep-K), exact resume after
SIGKILL, the NaN policy, fine-tuning from weights, and the CLI's one-line errors."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from fusedlm.cli import main
from fusedlm.train import checkpoint as ckpt
from fusedlm.train import trainer as trainer_module
from fusedlm.train.config import ConfigError, TrainConfig, make_config
from fusedlm.train.hardware import peak_flops_of
from fusedlm.train.trainer import (
    Trainer,
    TrainingDiverged,
    learning_rate,
    make_optimizer,
    read_step,
)
from tests.helpers import refuse_host_reads

from .conftest import TINY_MODEL, read_metrics, train_flags


def test_metrics_record_every_step(data_dir, tmp_path):
    out = tmp_path / "run"
    assert main(train_flags(data_dir, out, steps=4, eval_every=2)) == 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert math.isclose(records[0]["val_loss"], math.log(256), rel_tol=0.05)  # untrained
    for r in records[1:]:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= r.keys()
        assert r["mfu"] is None  # a CPU has no peak in the table: MFU is not made up
    assert "val_loss" in records[2] and "val_loss" in records[4] and "val_loss" not in records[3]


def test_z_loss_is_trained_on_and_logged_apart(data_dir, tmp_path):
    """--z-loss: each step logs z_loss, the term added (at initialisation logits are near 0,
    so logsumexp is near ln(256) and the term near z * ln(256)**2), and loss stays the
    cross-entropy alone (near ln(256) too). A strong z-loss pulls the logsumexp down: after
    12 steps its mean square is 15% below a run whose z-loss is too weak to matter (21.4
    against 25.3 when this test was written)."""
    squares = {}
    for z_loss in (0.5, 1e-6):
        out = tmp_path / f"run-{z_loss}"
        assert main(train_flags(data_dir, out, steps=12, z_loss=z_loss, lr=3e-3)) == 0
        records = read_metrics(out)
        assert all("z_loss" in r for r in records)
        assert math.isclose(records[0]["z_loss"] / z_loss, math.log(256) ** 2, rel_tol=0.1)
        assert math.isclose(records[0]["loss"], math.log(256), rel_tol=0.05)
        squares[z_loss] = records[-1]["z_loss"] / z_loss
    assert squares[0.5] < 0.95 * squares[1e-6], squares
    plain = tmp_path / "plain"
    assert main(train_flags(data_dir, plain, steps=2)) == 0
    assert all("z_loss" not in r for r in read_metrics(plain))
    with pytest.raises(ConfigError, match="'z_loss' applies to language-model training"):
        make_config(data="x.csv", task="classify", z_loss=1e-4)


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989.4e12), ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA GeForce GTX 1080", None),
])
def test_peak_flops_by_device_name(name, peak):
    """MFU's denominator: the most specific name in the table wins (an H200 NVL is not an
    H200 SXM, an L40 is not an L4); an unknown device has none."""
    assert peak_flops_of(name) == peak

@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_learning_rate_schedules(schedule):
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=100, min_lr_ratio=0.1,
                      schedule=schedule, decay_fraction=0.2)
    lrs = [learning_rate(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0)
    if schedule == "constant":
        assert lrs[-1] == 1.0
    elif schedule == "cosine":
        assert lrs[-1] == pytest.approx(0.1) and all(
            a >= b for a, b in itertools.pairwise(lrs[10:]))
    else:
        assert lrs[79] == 1.0 and lrs[-1] == pytest.approx(0.1)
        assert lrs[85] == pytest.approx(1.0 - 0.9 * 6 / 20)


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fusedlm.cli", *args], env=env,
                          capture_output=True, text=True, **kwargs)


def test_sigkill_and_resume_is_bit_identical(data_dir, tmp_path):
    """A run killed with SIGKILL after a checkpoint and resumed with --resume logs exactly the
    losses of the run that never stopped."""
    steps = 30
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _run(train_flags(data_dir, full, steps=steps)).returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = train_flags(data_dir, killed, steps=steps, ckpt_every=10)
    proc = subprocess.Popen([sys.executable, "-m", "fusedlm.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / "checkpoints" / "step_0000010" / "manifest.json"
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), "the run never wrote its step-10 checkpoint"
    resumed = _run(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    want = [(r["step"], r["loss"]) for r in read_metrics(full)]
    got = [(r["step"], r["loss"]) for r in read_metrics(killed)]
    assert got == want  # bit-identical floats, no step twice


def test_checkpoints_keep_the_last_k_and_point_to_the_latest(data_dir, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "run" / "checkpoints" / ".step_0000002.tmp-999").mkdir(parents=True)  # a crash
    assert main(train_flags(data_dir, out, steps=8, ckpt_every=2)) == 0
    names = [os.path.basename(p) for p in ckpt.list_checkpoints(str(out))]
    assert names == ["step_0000004", "step_0000006", "step_0000008"]  # keep_checkpoints = 3
    assert ckpt.latest_checkpoint(str(out)).endswith("step_0000008")
    state = ckpt.load_checkpoint(str(out))
    assert state["trainer"]["step"] == 8 and state["config"]["tokenizer"] == "byte"


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_corrupt_checkpoint_gives_one_line_naming_the_file(data_dir, tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert main(train_flags(data_dir, out, steps=2, ckpt_every=2)) == 0
    path = ckpt.latest_checkpoint(str(out))
    victim = os.path.join(path, "manifest.json" if damage == "manifest" else "optimizer.pt")
    if damage == "flip":
        with open(victim, "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage in ("truncate", "manifest"):
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    else:
        os.remove(victim)
    capsys.readouterr()
    assert main(train_flags(data_dir, out, steps=4) + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusedlm train: error:") and err.count("\n") == 1
    assert victim in err
    with pytest.raises(ckpt.CheckpointError, match=os.path.basename(victim)):
        ckpt.load_checkpoint(path)


def _trainer(data_dir, out, **overrides) -> Trainer:
    values = dict(data=data_dir, out=str(out), model=json.loads(TINY_MODEL), batch_size=4,
                  max_steps=6, eval_every=0, ckpt_every=0, warmup_steps=2, seed=3)
    values.update(overrides)
    return Trainer(make_config(**values), log=lambda *a: None)


@pytest.mark.parametrize(("warmup", "expected"), [(2, 2), (6, 0), (None, 0)],
                         ids=["fits", "explicit-too-long", "default-too-long"])
def test_a_warmup_longer_than_the_run_is_shortened_and_said(data_dir, tmp_path, warmup,
                                                              expected):
    """A warmup not below max_steps (explicit, or the device default on a short run) is cut
    to max_steps // 10, and the log says so; one that fits is left alone, silently."""
    lines = []
    values = dict(data=data_dir, out=str(tmp_path / "run"), model=json.loads(TINY_MODEL),
                  batch_size=4, max_steps=6, eval_every=0, ckpt_every=0, warmup_steps=warmup)
    trainer = Trainer(make_config(**values), log=lines.append)
    assert trainer.cfg.warmup_steps == expected
    said = [line for line in lines if "warmup shortened" in line]
    if expected == warmup:
        assert not said
    else:
        assert said == [f"warmup_steps={warmup or 30} is not below max_steps=6: warmup "
                        f"shortened to 0 step(s)"]


def _poison(trainer: Trainer, bad_steps: set[int]) -> None:
    """Makes the loss NaN on the given (0-based) steps."""
    step_fn = trainer.train_step

    def poisoned(step):
        trainer.loss_multiplier = math.nan if step in bad_steps else 1.0
        return step_fn(step)

    trainer.train_step = poisoned


@pytest.mark.parametrize("reset_positions", [False, True], ids=["window-positions", "reset"])
def test_document_separator_keeps_documents_apart_in_training_and_eval(data_dir, tmp_path,
                                                                      reset_positions):
    """document_separator: every step and evaluation passes the windows' document ids (and
    reset_positions) to the model (newline-separated lines as documents here); training still
    learns."""
    seen = []
    trainer = _trainer(data_dir, tmp_path / "run", document_separator=10, eval_every=3,
                       reset_positions=reset_positions)
    forward = trainer.raw_model.forward

    def recording(idx, targets=None, cache=None, document_ids=None, reset_positions=False,
                  return_logits=True):
        seen.append((document_ids, reset_positions))
        assert not return_logits  # the trainer never needs them
        return forward(idx, targets, cache, document_ids, reset_positions, return_logits)

    trainer.raw_model.forward = recording
    trainer.train()
    assert seen and all(d is not None and r is reset_positions for d, r in seen)
    x = trainer.train_batches.next_batch(trainer.device)[0]
    documents = trainer._packing(x)["document_ids"]
    assert documents.shape == x.shape and int(documents.max()) > 0  # lines split the windows
    records = read_metrics(tmp_path / "run")
    assert records[-1]["val_loss"] < records[0]["val_loss"]


def test_nan_policy_skip_drops_the_step_and_goes_on(data_dir, tmp_path):
    trainer = _trainer(data_dir, tmp_path / "run")
    _poison(trainer, {2})
    before = {}

    step_fn = trainer.train_step

    def watch(step):
        if step == 2:
            before.update({k: v.clone() for k, v in trainer.raw_model.state_dict().items()})
        result = step_fn(step)
        if step == 2:
            for k, v in trainer.raw_model.state_dict().items():
                assert torch.equal(v, before[k]), f"{k} changed on a skipped step"
        return result

    trainer.train_step = watch
    trainer.train()
    records = read_metrics(tmp_path / "run")
    assert [r.get("skipped", False) for r in records] == [False, False, True, False, False, False]
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(records) if i != 2)
    # strict JSON: the skipped step's NaN loss and gradient norm are nulls, not NaN tokens
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    strict = [json.loads(line, parse_constant=_refuse_constant) for line in lines]
    assert strict[2]["loss"] is None and strict[2]["grad_norm"] is None


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_step_never_reads_a_tensor_on_the_host(data_dir, tmp_path, monkeypatch, arch):
    """train_step queues a whole step (two micro-batches, z-loss, clipping, the AdamW step)
    without turning a tensor into a Python value, each of which would be a wait for the GPU;
    a NaN step is skipped on the device (the optimizer's found_inf): its weights and step
    counts stay, and read_step reports it."""
    model = json.loads(TINY_MODEL)
    if arch == "llama":
        model.update(arch="llama", n_kv_head=1)
    trainer = _trainer(data_dir, tmp_path / "run", model=model, grad_accum=2, z_loss=1e-4)
    results, moved = [], []
    with monkeypatch.context() as patch:
        refuse_host_reads(patch)
        for step in range(3):
            before = [p.detach().clone() for p in trainer.raw_model.parameters()]
            trainer.loss_multiplier = math.nan if step == 1 else 1.0
            results.append(trainer.train_step(step))
            moved.append(any(not torch.equal(p, q) for p, q in
                             zip(trainer.raw_model.parameters(), before, strict=True)))
    read = [read_step(result) for result in results]
    assert [r["finite"] for r in read] == [True, False, True]
    assert moved == [True, False, True]
    assert math.isnan(read[1]["loss"]) and all(math.isfinite(read[i]["loss"]) for i in (0, 2))
    assert all(isinstance(r[k], float) for r in read for k in ("loss", "grad_norm", "z_loss"))
    steps = {float(state["step"]) for state in trainer.optimizer.state.values()}
    assert steps == {2.0}, "the skipped step must not count"


def test_step_n_is_read_after_step_n_plus_1_is_queued(data_dir, tmp_path, monkeypatch):
    """The loop queues step n + 1 before it reads step n, except where validation, a sample
    or a checkpoint follows step n (they must see its weights) and at the last step; the
    metrics still hold every step, in order."""
    trainer = _trainer(data_dir, tmp_path / "run", max_steps=7, eval_every=3, ckpt_every=5)
    events = []
    queue, read, evaluate, save = (trainer.train_step, trainer_module.read_step,
                                   trainer.evaluate, trainer.save)

    def queued(step):
        events.append(f"q{step + 1}")
        return queue(step)

    def reading(result):
        events.append(f"r{len([e for e in events if e.startswith('r')]) + 1}")
        return read(result)

    def evaluating():
        events.append("eval")
        return evaluate()

    def saving():
        events.append("save")
        return save()

    trainer.train_step, trainer.evaluate, trainer.save = queued, evaluating, saving
    monkeypatch.setattr(trainer_module, "read_step", reading)
    trainer.train()
    assert events == ["eval", "q1", "q2", "r1", "q3", "r2", "r3", "eval", "q4", "q5", "r4",
                      "r5", "save", "q6", "r6", "eval", "q7", "r7", "eval", "save"], events
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6, 7]  # (0: validation)
    assert all(r["tokens_per_s"] > 0 for r in records[1:])
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 6, 7]



@pytest.mark.gpu
@pytest.mark.parametrize("packing", [{}, {"document_separator": 10}], ids=["plain", "documents"])
def test_gpu_steps_queue_without_a_sync_and_match_torch_kernels(data_dir, tmp_path, packing):
    """On a GPU in bf16 (llama: RMSNorm, rotary, SwiGLU, GQA; and with packed documents, whose
    per-query key ranges are worked out on the device): once the kernels are compiled,
    queueing a fused-kernel step calls nothing synchronizing (torch's sync debug mode raises on
    any, in torch's ops and in ours), and eight steps log losses within 2% of those of
    kernels="torch" (torch's SDPA, norms and fused AdamW)."""
    model = json.loads(TINY_MODEL) | {"arch": "llama", "n_kv_head": 1, "block_size": 128}
    losses = {}
    for kernels in ("fused", "torch"):
        out = tmp_path / kernels
        trainer = _trainer(data_dir, out, model=model, device="cuda", precision="bf16",
                           kernels=kernels, max_steps=8, grad_accum=2, **packing)
        for step in range(2):  # compiles and autotunes (which synchronize)
            read_step(trainer.train_step(step))
        results = []
        if kernels == "fused":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(2, 8):
                results.append(trainer.train_step(step))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        losses[kernels] = [read_step(r)["loss"] for r in results]
        assert all(read_step(r)["finite"] for r in results)
    for got, want in zip(losses["fused"], losses["torch"], strict=True):
        assert got == pytest.approx(want, rel=2e-2), (losses["fused"], losses["torch"])



def test_why_a_sharded_loss_scaler_gets_torch_default_adamw():
    """make_optimizer(kernels="torch") under FSDP2 + fp16 avoids torch's fused AdamW: it
    raises on ShardedGradScaler's (1,)-shaped found_inf (on a CPU as on a GPU), which
    fusedlm's AdamW takes. Skips once torch takes it, so the workaround can go."""
    found_inf = torch.zeros(1)  # ShardedGradScaler's shape (GradScaler's is 0-dim)
    linear = torch.nn.Linear(4, 4)
    linear(torch.ones(2, 4)).sum().backward()
    torch_fused = torch.optim.AdamW(linear.parameters(), fused=True)
    torch_fused.grad_scale, torch_fused.found_inf = None, found_inf
    try:
        torch_fused.step()
    except RuntimeError as e:
        assert "broadcast" in str(e)
    else:
        pytest.skip("torch's fused AdamW takes a (1,) found_inf now: make_optimizer's "
                    "sharded_scaler workaround is no longer needed")
    ours = make_optimizer(linear, make_config(kernels="fused", lr=1e-3),
                          sharded_scaler=True)
    ours.grad_scale, ours.found_inf = None, found_inf
    ours.step()
    assert all(float(state["step"]) == 1.0 for state in ours.state.values())


def _refuse_constant(name: str):
    raise AssertionError(f"metrics.jsonl holds {name}, which strict JSON readers refuse")


def test_nan_policy_stops_after_max_bad_steps(data_dir, tmp_path):
    trainer = _trainer(data_dir, tmp_path / "run", max_bad_steps=2)
    _poison(trainer, {1, 2})
    with pytest.raises(TrainingDiverged, match="2 bad step"):
        trainer.train()
    stop = _trainer(data_dir, tmp_path / "run2", nan_policy="stop")
    _poison(stop, {0})
    with pytest.raises(TrainingDiverged, match="nan_policy='stop'"):
        stop.train()
    assert read_metrics(tmp_path / "run2")[-1]["skipped"] is True


def test_sample_of_diverged_weights_says_so(data_dir, tmp_path):
    """A run that ends on non-finite weights (nan_policy "skip" kept going) prints that no
    sample could be drawn, rather than failing in torch.multinomial after training."""
    trainer = _trainer(data_dir, tmp_path / "run")
    assert not trainer.sample(tokens=3).startswith("(no sample")
    with torch.no_grad():
        next(trainer.raw_model.parameters()).fill_(float("nan"))
    assert trainer.sample(tokens=3) == (
        "(no sample: GPT.generate: the model's logits are not finite (NaN or Inf weights?))")


def test_init_from_checkpoint_and_hf_directory(data_dir, tmp_path):
    first = tmp_path / "first"
    assert main(train_flags(data_dir, first, steps=6, ckpt_every=6)) == 0
    second = tmp_path / "second"
    assert main(train_flags(data_dir, second, steps=2, model=None)
                + ["--init-from", str(first)]) == 0
    # Continued training starts from the trained weights: its first loss is the first run's
    # level, well below an untrained model's ln(256).
    assert read_metrics(second)[0]["loss"] < read_metrics(first)[0]["loss"] - 0.3

    transformers = pytest.importorskip("transformers")
    hf_dir = tmp_path / "hf"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(hf_dir)
    assert main(train_flags(data_dir, tmp_path / "third", steps=2, model='{"dropout": 0.1}')
                + ["--init-from", str(hf_dir)]) == 0
    assert main(train_flags(data_dir, tmp_path / "fourth", steps=2)
                + ["--init-from", str(hf_dir)]) == 2  # --model n_layer etc. vs loaded weights


def test_embedded_default_corpus_is_prepared_once(tmp_path, monkeypatch):
    from fusedlm.train.prepare import stdlib_corpus_dir

    monkeypatch.setenv("FUSEDLM_CACHE", str(tmp_path))
    messages = []
    path = stdlib_corpus_dir(max_bytes=300_000, log=messages.append)
    assert os.path.isfile(os.path.join(path, "train_000.bin")) and messages
    meta = json.load(open(os.path.join(path, "meta.json")))
    assert meta["tokenizer"] == "byte" and (
        50_000 < meta["train_tokens"] + meta["val_tokens"] <= 300_000 + 2 * meta["files"])
    messages.clear()
    assert stdlib_corpus_dir(max_bytes=300_000, log=messages.append) == path and not messages


@pytest.mark.parametrize("args, message", [
    (["--max-steps", "0"], "'max_steps' must be positive"),
    (["--data", "/nonexistent/shards"], "/nonexistent/shards: no such file"),
    (["--resume"], "no checkpoint in"),
    (["--model", "{bad json"], "--model must be a JSON object"),
    (["--model", '{"n_layers": 2}'], "no field(s) n_layers"),
    (["--preset", "gpt5"], "unknown preset 'gpt5'"),
    (["--model", '{"block_size": 100000}'], "shorter than one window"),
    (["--init-from", "/nonexistent/ckpt"], "/nonexistent/ckpt: no such checkpoint"),
    (["--document-separator", "-1"], "'document_separator' must be a token id"),
    (["--document-separator", "300"], "'document_separator' 300 is not a token id"),
    (["--reset-positions"], "'reset_positions' needs 'document_separator'"),
    (["--lr", "inf"], "'lr' must be a finite number > 0"),
    (["--warmup-steps", "-5"], "'warmup_steps' must be >= 0"),
    (["--seed", "-1"], "'seed' must be in [0, 2**63)"),
    (["--device", "tpu"], "'device' must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--device", "cuda:x"], "'device' must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    (["--model", "[1]"], "'model' must be a table / JSON object, got [1]"),
    (["--sample-every", "-1"], "'sample_every' must be >= 0"),
    (["--z-loss", "-0.001"], "'z_loss' must be a finite number >= 0"),
    (["--z-loss", "nan"], "'z_loss' must be a finite number >= 0"),
])
def test_cli_errors_are_one_line(data_dir, tmp_path, capsys, args, message):
    flags = train_flags(data_dir, tmp_path / "run",
                        model=None if "--init-from" in args else TINY_MODEL)
    if args[0] == "--data":
        flags[flags.index("--data") + 1] = args[1]
        args = []
    if args[0:1] == ["--model"]:
        flags[flags.index("--model") + 1] = args[1]
        args = []
    assert main(flags + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusedlm train: error:") and err.count("\n") == 1, err
    assert message in err


def test_toml_config_and_flag_precedence(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('preset = "tiny"\nlr = 0.01\nmax_steps = 7\n[model]\nn_layer = 1\n')
    cfg = make_config(str(path), lr=0.02)
    assert cfg.lr == 0.02 and cfg.max_steps == 7 and cfg.model == {"n_layer": 1}
    path.write_text("learning_rate = 1\n")
    with pytest.raises(ConfigError, match="unknown setting.*learning_rate"):
        make_config(str(path))
    path.write_text("lr = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        make_config(str(path))
    with pytest.raises(ConfigError, match="resume.*init_from"):
        make_config(resume=True, init_from="x")
    # A TOML file can give a setting any type: each is checked against its annotation.
    for text, message in (('batch_size = "16"', "'batch_size' must be an integer or unset"),
                          ("lr = true", "'lr' must be a number or unset"),
                          ("compile = 1", "'compile' must be true or false"),
                          ("model = 3", "'model' must be a table"),
                          ("beta2 = 1.0", "'beta2' must be in [0, 1)"),
                          ("weight_decay = nan", "'weight_decay' must be a finite number >= 0"),
                          ("min_lr_ratio = 1.5", "'min_lr_ratio' must be in [0, 1]")):
        path.write_text(text + "\n")
        with pytest.raises(ConfigError, match=re.escape(message)):
            make_config(str(path))
    path.write_text("lr = 1\ndecay_fraction = 1.0\nmin_lr_ratio = 1\n")  # ints for floats
    assert make_config(str(path)).lr == 1


def test_help_of_every_command(capsys):
    for command in ("train", "sample", "prepare", "info"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert "usage: fusedlm " + command in capsys.readouterr().out
    # python -m fusedlm is the same command
    result = subprocess.run([sys.executable, "-m", "fusedlm", "info"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "torch" in result.stdout, result.stderr


def test_sample_command(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_flags(data_dir, out, steps=2, ckpt_every=2)) == 0
    capsys.readouterr()
    assert main(["sample", str(out), "--prompt", "import ", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out.startswith("import ")
    shutil.rmtree(out / "checkpoints")
    assert main(["sample", str(out)]) == 2


def test_a_new_run_never_overwrites_checkpoints(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_flags(data_dir, out, steps=2, ckpt_every=2)) == 0
    capsys.readouterr()
    assert main(train_flags(data_dir, out, steps=2)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert ckpt.latest_checkpoint(str(out)).endswith("step_0000002")


def test_resume_from_an_index_keyed_optimizer_state(data_dir, tmp_path):
    """Checkpoints hold the optimizer state keyed by parameter name (torch.distributed.checkpoint's
    full state dict, the same under DDP and FSDP2); one written before, keyed by index
    (optimizer.state_dict()), still resumes exactly."""
    steps = 6
    full, run = tmp_path / "full", tmp_path / "run"
    assert main(train_flags(data_dir, full, steps=steps)) == 0
    args = train_flags(data_dir, run, steps=steps, ckpt_every=3)
    assert main(args) == 0
    path = str(run / "checkpoints" / "step_0000003")
    by_name = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
    assert all(isinstance(name, str) for name in by_name["state"])
    index = {}
    for group in by_name["param_groups"]:
        for name in group["params"]:
            index[name] = len(index)
    by_index = {"state": {index[name]: s for name, s in by_name["state"].items()},
                "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                 for g in by_name["param_groups"]]}
    torch.save(by_index, os.path.join(path, "optimizer.pt"))
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["optimizer.pt"] = {"bytes": os.path.getsize(os.path.join(path, "optimizer.pt")),
                                "sha256": ckpt._sha256(os.path.join(path, "optimizer.pt"))}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    shutil.rmtree(run / "checkpoints" / "step_0000006")
    (run / "checkpoints" / "latest").write_text("step_0000003")
    assert main(args + ["--resume"]) == 0
    want = [(r["step"], r["loss"]) for r in read_metrics(full)]
    assert [(r["step"], r["loss"]) for r in read_metrics(run)] == want


def test_torch_kernels_train_with_torch_adamw(data_dir, tmp_path):
    """kernels="torch" is plain PyTorch throughout, optimizer included: torch.optim.AdamW with
    the weight-decay groups of the fused run, whose losses it logs to float32 noise; its
    checkpoint resumes under kernels="fused" (the two optimizers share one state_dict format)."""
    import fusedlm

    fused = _trainer(data_dir, tmp_path / "fused")
    plain = _trainer(data_dir, tmp_path / "torch", kernels="torch")
    assert type(plain.optimizer) is torch.optim.AdamW
    assert type(fused.optimizer) is fusedlm.optim.AdamW

    def groups(optimizer):
        return [(g["weight_decay"], g["lr"], g["betas"], g["eps"], [p.shape for p in g["params"]])
                for g in optimizer.param_groups]

    assert groups(plain.optimizer) == groups(fused.optimizer)
    fused.train()
    plain.train()
    want = [r["loss"] for r in read_metrics(tmp_path / "fused")]
    got = [r["loss"] for r in read_metrics(tmp_path / "torch")]
    assert len(got) == len(want) == 6
    assert got == pytest.approx(want, rel=1e-4)

    run = tmp_path / "switch"
    args = train_flags(data_dir, run, steps=6, ckpt_every=3)
    assert main(args + ["--kernels", "torch"]) == 0
    shutil.rmtree(run / "checkpoints" / "step_0000006")
    (run / "checkpoints" / "latest").write_text("step_0000003")
    assert main(args + ["--kernels", "fused", "--resume"]) == 0
    assert [r["loss"] for r in read_metrics(run)] == pytest.approx(want, rel=1e-4)
