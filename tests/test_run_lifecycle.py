"""Run behaviours beyond the happy path: non-finite losses, a frozen validation metric, predict, export, inspect."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_cfg
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
