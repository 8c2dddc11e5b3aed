"""Run behaviours beyond the happy path: non-finite losses, a frozen validation metric, predict, export, inspect."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, tiny_cfg
from PIL import Image

from medtune.cli import main
from medtune.losses import ComboLoss
from medtune.runs.files import read_metrics
from medtune.train.setup import TrainingStopped
from medtune.train.sft import train


def test_non_finite_losses_are_skipped_then_stop_the_run_with_a_checkpoint(tmp_path, monkeypatch):
    real_forward = ComboLoss.forward
    calls = {"n": 0}

    def nan_after_two_steps(self, logits, target, fov=None):
        loss, parts = real_forward(self, logits, target, fov)
        calls["n"] += 1
        return (loss * float("nan"), parts) if calls["n"] > 2 else (loss, parts)

    monkeypatch.setattr(ComboLoss, "forward", nan_after_two_steps)
    cfg = tiny_cfg(tmp_path, "train.preflight=false", "train.max_nonfinite=3", "train.eval_every=100", steps=20)
    with pytest.raises(TrainingStopped, match="3 non-finite losses in a row"):
        train(cfg)
    run = tmp_path / "runs" / "t"
    meta = json.loads((run / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["reason"] == "non-finite" and meta["step"] == 5
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["skipped"] for r in records] == [False, False, True, True, True]


def test_identical_validation_metric_is_reported(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.preflight=false", "optim.lr=0.0", "train.eval_every=1", steps=4)
    with pytest.warns(RuntimeWarning, match="validation metric identical"):
        run = train(cfg)
    assert any("warning" in r for r in read_metrics(run))


def test_predict_export_and_inspect_from_the_cli(tmp_path, capsys):
    run = train(tiny_cfg(tmp_path, steps=3))
    assert main(["eval", str(run)]) == 0
    images = sorted((tmp_path / "data").rglob("images/*.png"))[:2]
    out = tmp_path / "pred"
    assert main(["predict", str(run), *map(str, images), "--out", str(out)]) == 0
    for image in images:
        mask = Image.open(out / f"{image.stem}_mask.png")
        assert mask.size == Image.open(image).size and set(mask.getdata()) <= {0, 255}
        assert (out / f"{image.stem}_prob.png").is_file() and (out / f"{image.stem}_overlay.png").is_file()
    assert json.loads((out / "predict.json").read_text())["threshold_source"].startswith("calibrated on val")
    assert main(["export", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    data_dir = next((tmp_path / "data").iterdir())
    capsys.readouterr()
    assert main(["data", "inspect", str(data_dir)]) == 0
    assert "generic" in capsys.readouterr().out
    assert torch.load(run / "checkpoints" / "last" / "trainer_state.pt", weights_only=True)["trainer"]["step"] == 3


# ---- issue 9: every run survives its machine ---------------------------------------------------------------------
class SimulatedKill(Exception):
    """Raised from inside a training step: the process 'dies' there (nothing after it is written)."""


def last_weights(run) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / "last" / "model" / "model.safetensors"))


def assert_same_weights(a, b) -> None:
    wa, wb = last_weights(a), last_weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"final weights differ from the uninterrupted run's: {different[:5]}"


def losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def patch_loss(monkeypatch, kill_at: int | None = None, overflow_at: tuple[int, ...] = ()):
    """Wrap ComboLoss: its `kill_at`-th call (preflight calls included) raises SimulatedKill; the calls in
    `overflow_at` get a gradient no fp16 loss scale survives (1e38 per logit) while their loss value is unchanged."""
    real_forward = ComboLoss.forward
    calls = {"n": 0}

    def forward(self, logits, target, fov=None):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise SimulatedKill(f"killed in loss call {kill_at}")
        loss, parts = real_forward(self, logits, target, fov)
        if calls["n"] in overflow_at:
            zero_with_huge_gradient = (logits.float() - logits.float().detach()).sum() * 1e38
            loss = loss + zero_with_huge_gradient
        return loss, parts

    monkeypatch.setattr(ComboLoss, "forward", forward)


STEPS = 6


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A folder with one uninterrupted run ("reference") that the resumed runs below must equal bit for bit."""
    root = tmp_path_factory.mktemp("lifecycle")
    train(tiny_cfg(root, steps=STEPS, name="reference"))
    return root


def test_resume_auto_restarts_a_run_killed_before_its_first_checkpoint(base, monkeypatch):
    """Killed after config, split and a metrics line, before any checkpoint (best comes at step 3); then a truncated
    config.yaml and a torn metrics line on top: `--resume auto` starts over in the same folder, as a fresh run."""
    cfg = tiny_cfg(base, steps=STEPS, name="early")
    with monkeypatch.context() as m:
        patch_loss(m, kill_at=3 + 2)  # 3 preflight calls, then step 2
        with pytest.raises(SimulatedKill):
            train(cfg)
    run = base / "runs" / "early"
    assert (run / "split.json").is_file() and not (run / "checkpoints").exists()
    split_before = (run / "split.json").read_text()
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text[: len(text) // 2])  # parses, with half the keys at their defaults
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "lo')
    assert train(cfg, resume="auto") == run
    assert_same_weights(run, base / "runs" / "reference")
    assert losses(run) == losses(base / "runs" / "reference")
    assert (run / "config.yaml").read_text() == text and (run / "split.json").read_text() == split_before
    assert not list((base / "runs").glob("early-*")), "a second run folder was created"


def test_explicit_resume_of_a_run_without_checkpoint_starts_from_step_0(base, monkeypatch):
    cfg = tiny_cfg(base, "train.preflight=false", steps=STEPS, name="explicit")
    with monkeypatch.context() as m:
        patch_loss(m, kill_at=2)
        with pytest.raises(SimulatedKill):
            train(cfg)
    run = base / "runs" / "explicit"
    train(cfg, resume=run)
    assert_same_weights(run, base / "runs" / "reference")  # the preflight changes nothing either


def test_resume_auto_continues_from_a_time_based_last_past_a_half_written_one(base, monkeypatch):
    """`last` every step by the clock (save_every is 6): killed at step 5, with a half-written checkpoint folder left
    behind, the run continues from step 4 and ends as the uninterrupted run did."""
    cfg = tiny_cfg(base, "train.save_every_minutes=1e-9", steps=STEPS, name="timed")
    with monkeypatch.context() as m:
        patch_loss(m, kill_at=3 + 5)
        with pytest.raises(SimulatedKill):
            train(cfg)
    ckpts = base / "runs" / "timed" / "checkpoints"
    assert json.loads((ckpts / "last" / "meta.json").read_text())["step"] == 4
    (ckpts / ".tmp-last-999999" / "model").mkdir(parents=True)  # what a kill in the middle of a save leaves
    (ckpts / ".tmp-last-999999" / "model" / "model.safetensors").write_bytes(b"\0" * 10)
    train(cfg, resume="auto")
    assert_same_weights(ckpts.parent, base / "runs" / "reference")
    assert losses(ckpts.parent) == losses(base / "runs" / "reference")
    assert not list(ckpts.glob(".*")), "leftovers of the interrupted save were not cleaned up"


def test_resume_auto_refuses_a_different_config_in_one_line(base, capsys):
    reference = base / "runs" / "reference"
    changed = base / "changed.yaml"
    changed.write_text(tiny_cfg(base, "optim.lr=0.02", "loss.bce=0.25", steps=STEPS, name="reference").to_yaml())
    assert main(["train", str(changed), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr (0.01 -> 0.02)" in err and "loss.bce" in err and "Traceback" not in err
    assert err.strip().count("\n") == 0
    # how it logs and saves may change; nothing is retrained (the run is complete) and no second folder appears
    same = base / "same.yaml"
    same.write_text(tiny_cfg(base, "train.log_every=2", steps=STEPS, name="reference").to_yaml())
    before = last_weights(reference)
    assert main(["train", str(same), "--resume", "auto"]) == 0
    assert all(torch.equal(before[k], v) for k, v in last_weights(reference).items())
    assert not list((base / "runs").glob("reference-*"))
    assert len(losses(reference)) == STEPS


def test_checkpoint_recovery_and_meta_json(tmp_path, monkeypatch):
    """A crash between the two renames of a save leaves only `.old-last`: it is put back, never deleted; half-written
    `.tmp-*` folders go; the newest complete checkpoint wins; meta.json is strict JSON (null, not -Infinity)."""
    from medtune.models.registry import build_model
    from medtune.runs.checkpoint import TrainerState, latest_checkpoint, recover_checkpoints, save_checkpoint
    from medtune.train.setup import make_optimizer, make_scheduler

    cfg = tiny_cfg(tmp_path)
    model = build_model(cfg)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    root = tmp_path / "checkpoints"
    save_checkpoint(root, "best", model, optimizer, scheduler, TrainerState(step=3), {"val_auc": float("nan")})
    save_checkpoint(root, "last", model, optimizer, scheduler, TrainerState(step=4))
    meta = json.loads((root / "last" / "meta.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert meta["best_metric"] is None and meta["step"] == 4
    assert json.loads((root / "best" / "meta.json").read_text(), parse_constant=lambda c: pytest.fail(c))["val_auc"] is None
    (root / "last").rename(root / ".old-last")  # killed between "last -> .old-last" and ".tmp -> last"
    (root / ".tmp-last-123").mkdir()
    save_checkpoint(root, "step-5", model, optimizer, scheduler, TrainerState(step=5))
    recover_checkpoints(root)
    assert sorted(p.name for p in root.iterdir()) == ["best", "last", "step-5"]
    assert latest_checkpoint(tmp_path).name == "step-5"
    # killed again between the renames, then the next save dies before its new folder is in place: the only
    # complete copy of `last` must survive both
    (root / "last").rename(root / ".old-last")
    real_replace = os.replace

    def replace_dies_on_the_new_folder(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise SimulatedKill("killed before the new checkpoint was renamed into place")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_dies_on_the_new_folder)
    with pytest.raises(SimulatedKill):
        save_checkpoint(root, "last", model, optimizer, scheduler, TrainerState(step=6))
    monkeypatch.setattr(os, "replace", real_replace)
    recover_checkpoints(root)
    assert json.loads((root / "last" / "meta.json").read_text())["step"] == 4
    assert sorted(p.name for p in root.iterdir()) == ["best", "last", "step-5"]


def test_a_failing_run_releases_the_sigterm_handler_and_the_trackers(tmp_path, monkeypatch):
    from accelerate import Accelerator

    ended = []
    real_end = Accelerator.end_training
    monkeypatch.setattr(Accelerator, "end_training", lambda self: ended.append(1) or real_end(self))
    before = signal.getsignal(signal.SIGTERM)
    patch_loss(monkeypatch, kill_at=1)
    with pytest.raises(SimulatedKill):
        train(tiny_cfg(tmp_path, "train.preflight=false", "train.trackers=[tensorboard]"))
    assert signal.getsignal(signal.SIGTERM) == before, "a dead run's SIGTERM handler is still installed"
    assert ended, "trackers were not closed"


def test_sigterm_during_data_loading_stops_cleanly_after_the_first_step(tmp_path, monkeypatch):
    import medtune.train.sft as sft

    outside = []
    previous = signal.signal(signal.SIGTERM, lambda *a: outside.append(1))
    real_prepare = sft.prepare_split

    def prepare_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(sft, "prepare_split", prepare_then_sigterm)
    try:
        run = train(tiny_cfg(tmp_path, steps=STEPS))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not outside, "the SIGTERM went to the handler outside the run"
    meta = json.loads((run / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["reason"] == "SIGTERM" and meta["step"] == 1


def test_a_bug_shows_its_traceback_and_a_user_error_one_line(tmp_path, monkeypatch, capsys):
    import medtune.train
    from medtune.config import ConfigError
    from medtune.data.types import DataError
    from medtune.errors import UserError

    assert issubclass(ConfigError, UserError) and issubclass(DataError, UserError) and issubclass(UserError, ValueError)
    path = tmp_path / "c.yaml"
    path.write_text(tiny_cfg(tmp_path).to_yaml())

    def bug(cfg, resume=None):
        raise ValueError("an internal shape mismatch")

    monkeypatch.setattr(medtune.train, "train", bug)
    with pytest.raises(ValueError, match="internal shape mismatch"):
        main(["train", str(path)])

    def user_error(cfg, resume=None):
        raise UserError("fix this key")

    monkeypatch.setattr(medtune.train, "train", user_error)
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err.strip() == "medtune train: error: fix this key"


# ---- fp16: the loss scaler ----------------------------------------------------------------------------------------
INIT_SCALE = 2.0**8


def with_fp16_on_cpu(monkeypatch) -> None:
    """accelerate runs fp16 only on accelerators; on CPU it silently trains in fp32 without a scaler. Turn on what it
    turns on for a GPU (fp16 autocast + a GradScaler, here torch's CPU one), so the real scaler code path runs."""
    import medtune.train.sft as sft

    real = sft.make_accelerator

    def make(cfg):
        accelerator = real(cfg)
        accelerator.native_amp = True
        # the scale grows after every 2 finite steps (instead of 2000), so a step the scaler should not have seen
        # shows; it starts low enough that this tiny model's fp16 gradients never overflow by themselves
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=2)
        return accelerator

    monkeypatch.setattr(sft, "make_accelerator", make)


def scaler_state(run) -> dict:
    # the loss scaler is part of accelerate's state, saved by save_state into the checkpoint's engine/ folder
    return torch.load(run / "checkpoints" / "last" / "engine" / "scaler.pt", weights_only=True)


def test_fp16_overflow_is_a_skipped_step_and_the_loss_scale_survives_resume_and_preflight(tmp_path, monkeypatch):
    with_fp16_on_cpu(monkeypatch)
    opts = ("train.mixed_precision=fp16", "train.max_nonfinite=2", "train.save_every=2")
    # two overflow steps in a row, max_nonfinite 2: an overflow counted as non-finite would stop the run
    with monkeypatch.context() as m:
        patch_loss(m, overflow_at=(2, 3))
        plain = train(tiny_cfg(tmp_path, "train.preflight=false", *opts, steps=STEPS, name="plain"))
    records = [r for r in read_metrics(plain) if "loss" in r]
    assert [r["skipped"] for r in records] == [False, True, True, False, False, False]
    assert records[-1]["fp16_overflows"] == 2
    # halved by each overflow, doubled after every 2 finite steps
    assert [r["loss_scale"] / INIT_SCALE for r in records] == [1, 1 / 2, 1 / 4, 1 / 4, 1 / 2, 1 / 2]
    assert scaler_state(plain)["scale"] == INIT_SCALE / 2
    # the same run with a preflight: the preflight's steps must leave the scaler as they found it
    with monkeypatch.context() as m:
        patch_loss(m, overflow_at=(3 + 2, 3 + 3))
        checked = train(tiny_cfg(tmp_path, *opts, steps=STEPS, name="checked"))
    assert scaler_state(checked) == scaler_state(plain)
    assert_same_weights(checked, plain)
    # killed at step 5, resumed from step 4: the scale (and its growth counter) comes back with the checkpoint
    cfg = tiny_cfg(tmp_path, "train.preflight=false", *opts, steps=STEPS, name="resumed")
    with monkeypatch.context() as m:
        patch_loss(m, kill_at=5, overflow_at=(2, 3))
        with pytest.raises(SimulatedKill):
            train(cfg)
    resumed = train(cfg, resume="auto")
    assert scaler_state(resumed) == scaler_state(plain)
    assert_same_weights(resumed, plain)


def _wait(proc, ready, timeout_s: float = 180.0) -> bool:
    deadline = time.time() + timeout_s
    while proc.poll() is None and time.time() < deadline:
        if ready():
            return True
        time.sleep(0.001)
    return False


@pytest.mark.slow
@pytest.mark.ci
def test_kill_9_then_the_same_command_ends_as_the_uninterrupted_run(base):
    """The scheduler's view: `medtune train CONFIG --resume auto` SIGKILLed soon after it wrote config.yaml (data,
    preflight, first steps), then during a checkpoint write, then run again to the end. bench/kill_resume.py does
    this 20 times at random moments."""
    cfg = tiny_cfg(base, "train.save_every=2", "train.save_every_minutes=0.002", steps=STEPS, name="kill9")
    path = base / "kill9.yaml"
    path.write_text(cfg.to_yaml())
    run, ckpts = base / "runs" / "kill9", base / "runs" / "kill9" / "checkpoints"
    command = [sys.executable, "-m", "medtune.cli", "train", str(path), "--resume", "auto"]

    def start():
        return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    proc = start()
    _wait(proc, lambda: (run / "config.yaml").exists())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc = start()
    _wait(proc, lambda: ckpts.is_dir() and any(ckpts.glob(".tmp-*")))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(run, base / "runs" / "reference")
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, STEPS + 1))
    assert sorted(p.name for p in (base / "runs").iterdir() if p.name.startswith("kill9")) == ["kill9"]


def test_resume_auto_of_an_rl_run_compares_with_the_config_it_adopted(base):
    """rl.init_from stores the parent's model section in config.yaml: the same command again is still the same run."""
    from medtune.config import ConfigError, build_config
    from medtune.train.rl import train as train_rl

    def rl_cfg(*extra):
        return build_config({}, [
            "objective=rl", "run.name=rl", f"run.output_dir={base / 'runs'}",
            f"rl.init_from={base / 'runs' / 'reference'}", "rl.group_size=2", "optim.max_steps=2",
            "optim.warmup_steps=1", "train.eval_every=2", "train.save_every=2", "train.trackers=[]", "lora.r=4",
            "data.batch_size=2", *extra,
        ])

    run = train_rl(rl_cfg(), resume="auto")
    assert run == base / "runs" / "rl" and (run / "reference-model" / ".complete").is_file()
    assert train_rl(rl_cfg("train.log_every=1"), resume="auto") == run
    with pytest.raises(ConfigError, match=r"rl\.kl_coef \(0\.05 -> 0\.5\)"):
        train_rl(rl_cfg("rl.kl_coef=0.5"), resume="auto")
    assert not list((base / "runs").glob("rl-*"))
