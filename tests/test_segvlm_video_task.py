"""Task video with a segmenting VLM (tiny InternVL + tiny SAM 2 video mask head) end to end through the CLI on
synthetic angiography runs: training on clips (kill -9 and resume: bit-identical losses and weights),
evaluation (the generated answer per video in per_video.csv), prediction on a video file and a frame folder asked by
--prompt TEXT (the answer written next to the masks); clips about one referring expression where the data has them;
the one-line refusals."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO
from PIL import Image
from test_video_data import write_sa2va
from test_video_task import _ok, _write_cfg, kill_9_after_two_checkpoints, losses, read_video, write_mp4

from medtune.config import build_config
from medtune.data.datasets import resize_square
from medtune.data.synthetic_video import write_synthetic_video_dataset
from medtune.data.video import NO_TARGET, VideoClipDataset
from medtune.data.video_layouts import discover_videos
from medtune.runs.files import read_metrics

pytest.importorskip("av")
pytest.importorskip("transformers")

N_VIDEOS, N_FRAMES, SIZE = 5, 8, 48
QUESTION = "Please segment the vessel in this run."


def segvlm_video_cfg(tmp_path: Path, name: str, *overrides: str, steps: int = 4):
    """A tiny segmenting VLM (InternVL + SAM 2 video, LoRA) on 4-frame clips, the VLM seeing 2 of them."""
    return build_config({}, [
        f"run.name={name}", f"run.output_dir={tmp_path / 'runs'}", "run.seed=0",
        "data.layout=video_frames", f"data.path={tmp_path / 'data'}", "data.channels=1", f"data.patch_size={SIZE}",
        "data.batch_size=2", "data.video.clip_length=4", "data.video.clips_per_video=2",
        "data.split.val_fraction=0.2", "data.split.test_fraction=0.2",
        "model.family=segvlm", "model.config={preset: tiny, vlm: internvl, sam: sam2_video}",
        "model.finetune=lora", "lora.r=4", "model.vlm.video_frames=2", "task.class_name=vessel",
        "task.max_new_tokens=4",
        f"optim.max_steps={steps}", "optim.warmup_steps=1", "optim.lr=1e-3",
        f"train.eval_every={steps}", f"train.save_every={steps}", "train.log_every=1", "train.trackers=[]",
        "eval.bootstrap=50", *overrides,
    ])


def _train_process(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "medtune.cli", "train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _train_ok(*args: str) -> None:
    proc = _train_process(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]


def _data(tmp_path: Path) -> Path:
    return write_synthetic_video_dataset(tmp_path / "data", n_videos=N_VIDEOS, n_frames=N_FRAMES, size=SIZE,
                                         annotate_every=3, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny segmenting-VLM video run trained through `medtune train`, shared by evaluation and prediction."""
    tmp = tmp_path_factory.mktemp("segvlm-video-run")
    _data(tmp)
    _ok("train", str(_write_cfg(tmp, segvlm_video_cfg(tmp, "sv"), "sv")))
    return tmp / "runs" / "sv"


def test_config_prompt_kind_and_clip_training():
    from medtune.models.vlm.seg.parts import trains_on_clips

    cfg = build_config({}, ["data.layout=video_frames", "model.family=segvlm"])
    assert cfg.task_kind() == "video" and cfg.prompt_kind() == "text" and trains_on_clips(cfg)
    image = build_config({}, ["model.family=segvlm"])
    assert image.prompt_kind() == "text" and not trains_on_clips(image)
    assert build_config({}, ["model.family=sam2_video", "model.prompt=mask"]).prompt_kind() == "mask"
    with pytest.raises(Exception, match="prompted by a question"):
        build_config({}, ["model.family=segvlm", "model.prompt=mask"])


def test_clips_of_a_video_with_expressions_are_about_one_expression(tmp_path):
    """sa2va_video: a clip for a model that reads the question is about one expression, drawn with the clip (its
    words, its masks, its annotated frames); without, the masks are the union and there are no words. Evaluation asks
    about each expression of a video, scored on its own masks."""
    from medtune.tasks.video import video_queries

    truth = write_sa2va(tmp_path)
    cfg = build_config({}, [f"data.path={tmp_path}", "data.patch_size=32", "data.video.clip_length=2",
                            "data.video.clips_per_video=8", "task.class_name=vessel"])
    videos = discover_videos(cfg.data)
    clip_b = [v for v in videos if v.id == "clipB"]
    per_target = VideoClipDataset(clip_b, cfg.data, seed=0, per_target=True)
    seen = set()
    for index in range(len(per_target)):
        item = per_target[index]
        k = item["target"]
        seen.add(k)
        again = per_target[index]  # a pure function of the index
        assert item["text"] == f"vessel {k}" and again["target"] == k and torch.equal(again["masks"], item["masks"])
        for pos, frame in enumerate(item["frame_index"].tolist()):
            assert bool(item["annotated"][pos]) == (frame in (1, 3))
            if frame in (1, 3):
                mask = torch.from_numpy(truth[("clipB", k, frame)]).float()[None]
                _, want = resize_square(torch.zeros(1, *mask.shape[-2:]), mask, 32)
                assert torch.equal(item["masks"][pos], (want > 0.5).float())
    assert seen == {0, 1}
    union = VideoClipDataset(clip_b, cfg.data, seed=0)[0]
    assert union["target"] == NO_TARGET and union["text"] is None

    asked = video_queries(clip_b[0], cfg, takes_question=True)
    assert [(q.id, q.target) for q in asked] == [("clipB#0", 0), ("clipB#1", 1)]
    assert asked[1].question == "Please segment the vessel 1 in this image."
    (whole,) = video_queries(clip_b[0], cfg, takes_question=False)
    assert (whole.id, whole.target) == ("clipB", None)


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_run(tmp_path):
    """`medtune train` of the segmenting VLM on clips killed with SIGKILL after a checkpoint, resumed with `medtune
    train --resume`: the losses and the final weights equal an uninterrupted run's bit for bit (the resumed session
    counts the FLOPs of other steps than the uninterrupted one: counting must not change what a step computes, see
    train.utilisation); the preflight saw gradient reach every trainable tensor (the LM, [SEG]'s row, the
    projection, SAM 2's memory path)."""
    from safetensors.torch import load_file

    _data(tmp_path)
    steps, save_every = 12, 3
    opts = (f"train.save_every={save_every}", "train.eval_every=6")
    _train_ok(str(_write_cfg(tmp_path, segvlm_video_cfg(tmp_path, "full", *opts, steps=steps), "full")))
    full = tmp_path / "runs" / "full"
    killed = tmp_path / "runs" / "killed"
    proc = _train_process(str(_write_cfg(tmp_path, segvlm_video_cfg(tmp_path, "killed", *opts, steps=steps),
                                         "killed")))
    kill_9_after_two_checkpoints(proc, killed, save_every, steps)
    _train_ok("--resume", str(killed))

    assert losses(killed)[-steps:] == losses(full)
    assert [r["step"] for r in read_metrics(killed) if "loss" in r][-steps:] == list(range(1, steps + 1))
    assert all(r["loss_lm"] > 0 for r in read_metrics(full) if "loss" in r)  # the answer's LM loss trains too
    a = load_file(str(full / "checkpoints" / "last" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "checkpoints" / "last" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("memory_attention" in k for k in a) and any("language_model" in k for k in a)
    preflight = json.loads((full / "preflight.json").read_text())
    assert preflight["passed"]


def test_eval_writes_the_answer_per_video(trained):
    out = _ok("eval", str(trained))
    assert "per-video" in out
    summary = json.loads((trained / "eval" / "test" / "summary.json").read_text())
    split = json.loads((trained / "split.json").read_text())
    assert summary["task"] == "video" and summary["n_videos"] == len(split["test"])
    assert summary["n_frames"] == N_FRAMES * len(split["test"])
    with (trained / "eval" / "test" / "per_video.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == split["test"]
    for row in rows:
        assert "answer" in row and row["has_seg"] in ("0", "1")
        assert (row["has_seg"] == "1") == ("[SEG]" in row["answer"])


def test_predict_asks_the_question_on_an_mp4_and_a_frame_folder(trained, tmp_path):
    """--prompt TEXT is the question; every frame gets a mask and a probability map at its own size, the overlay
    every frame, and the generated answer is written next to the masks (answer.txt, predict.json)."""
    rng = np.random.default_rng(0)
    mp4 = write_mp4([(rng.random((48, 64)) * 255).astype(np.uint8) for _ in range(6)], tmp_path / "angio.mp4")
    folder = tmp_path / "run7"
    folder.mkdir()
    for t in range(5):
        Image.fromarray((rng.random((41, 45)) * 255).astype(np.uint8)).save(folder / f"frame_{t:03d}.png")
    out_dir = tmp_path / "pred"
    printed = _ok("predict", str(trained), str(mp4), str(folder), "--prompt", QUESTION, "--out", str(out_dir))
    assert "angio: 6 masks" in printed and "run7: 5 masks" in printed
    record = json.loads((out_dir / "predict.json").read_text())
    assert record["question"] == QUESTION and record["prompt"] is None
    for written, (name, n, (h, w)) in zip(record["videos"], (("angio", 6, (48, 64)), ("run7", 5, (41, 45)))):
        masks = sorted((out_dir / name / "masks").glob("*.png"))
        assert [p.name for p in masks] == [f"{t:05d}.png" for t in range(n)]
        assert np.asarray(Image.open(masks[0])).shape == (h, w)
        answer = (out_dir / name / "answer.txt").read_text().rstrip("\n")
        assert written["video"] == name and written["answer"] == answer and written["question"] == QUESTION
        assert written["has_seg"] == int(written["n_seg"] > 0) and f"{name}: {answer}" in printed
        assert len(read_video(out_dir / name / "overlay.mp4")) == n


def test_predict_options_of_a_question_run_are_one_line(trained, tmp_path):
    """A mask / box prompt, a frame, two questions or an empty one: refused before the model loads, nothing
    written."""
    from medtune.errors import UserError
    from medtune.predict import predict_images

    frames = tmp_path / "frames"
    frames.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(frames / "00000.png")
    out = tmp_path / "p"
    for kwargs, match in (({"box": (1, 2, 3, 4)}, "--box is for mask- or box-prompted"),
                          ({"frame": 2, "prompt": QUESTION}, "--frame is for mask- or box-prompted"),
                          ({"prompt": [QUESTION, "and the catheter"]}, "one --prompt TEXT"),
                          ({"prompt": "  "}, "--prompt is empty")):
        with pytest.raises(UserError, match=match) as refused:
            predict_images(trained, [frames], out, **kwargs)
        assert "\n" not in str(refused.value)
    assert not out.exists()
