"""Task video end to end through the CLI on a tiny SAM 2 video model and synthetic angiography runs: training on clips
(kill -9 and resume: bit-identical weights), evaluation, prediction on a video file and on a frame folder (masks,
16-bit probabilities, an overlay video PyAV reads back), bad inputs in one line, RL on clips."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO
from PIL import Image

from medtune.config import build_config
from medtune.data.synthetic_video import write_synthetic_video_dataset
from medtune.runs.files import read_metrics

av = pytest.importorskip("av")
pytest.importorskip("transformers")

N_VIDEOS, N_FRAMES, SIZE = 5, 12, 64


def video_cfg(tmp_path: Path, name: str, *overrides: str, steps: int = 8):
    """A ~1.3M-parameter SAM 2 video model on 4-frame clips of the synthetic runs, a handful of steps."""
    return build_config({}, [
        f"run.name={name}", f"run.output_dir={tmp_path / 'runs'}", "run.seed=0",
        "data.layout=video_frames", f"data.path={tmp_path / 'data'}", "data.channels=1", "data.patch_size=64",
        "data.batch_size=2", "data.video.clip_length=4", "data.video.clips_per_video=2",
        "data.split.val_fraction=0.2", "data.split.test_fraction=0.2",
        "model.family=sam2_video", "model.config={preset: tiny}",
        f"optim.max_steps={steps}", "optim.warmup_steps=1", "optim.lr=1e-3",
        f"train.eval_every={steps}", f"train.save_every={steps}", "train.log_every=1", "train.trackers=[]",
        "eval.bootstrap=50", *overrides,
    ])


def _data(tmp_path: Path) -> Path:
    return write_synthetic_video_dataset(tmp_path / "data", n_videos=N_VIDEOS, n_frames=N_FRAMES, size=SIZE,
                                         annotate_every=3, seed=0)


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "medtune.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = _cli(*args)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _ok(*args: str) -> str:
    done = _run(*args)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def kill_9_after_two_checkpoints(proc: subprocess.Popen, run: Path, save_every: int, steps: int) -> None:
    """SIGKILL the training process ``proc`` of ``run`` once it has logged a step past its second checkpoint (no
    handler runs, nothing more is saved), and check that the kill landed mid-run."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(losses(run)) < 2 * save_every + 1:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert 2 * save_every + 1 <= len(losses(run)) < steps, "the kill must land mid-run, after a checkpoint"


def _write_cfg(tmp_path: Path, cfg, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(cfg.to_yaml())
    return path


def write_mp4(frames: list[np.ndarray], path: Path, fps: int = 10) -> Path:
    """uint8 [H, W] frames -> an MPEG-4 video (even sides)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.pix_fmt = "yuv420p"
        stream.height, stream.width = frames[0].shape
        for frame in frames:
            rgb = np.repeat(frame[..., None], 3, axis=2)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_video(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny video run, trained through `medtune train`, shared by the evaluation and prediction tests."""
    tmp = tmp_path_factory.mktemp("video-run")
    _data(tmp)
    cfg = _write_cfg(tmp, video_cfg(tmp, "v", steps=4), "v")
    _ok("train", str(cfg))
    return tmp / "runs" / "v"


def test_task_kind_follows_the_family_or_a_named_video_layout():
    assert build_config({}, ["model.family=sam2_video"]).task_kind() == "video"
    assert build_config({}, ["data.layout=video_files", "model.family=sam2"]).task_kind() == "video"
    assert build_config({}, ["data.layout=video_frames", "model.family=segvlm"]).task_kind() == "video"
    assert build_config({}, ["data.layout=video_frames", "model.family=vlm"]).task_kind() == "instruct"
    assert build_config({}, ["model.family=sam2"]).task_kind() == "masks"


def test_kill_9_mid_run_then_resume_gives_bit_identical_weights(tmp_path):
    """`medtune train` on clips killed with SIGKILL after a checkpoint (no handler runs, nothing is saved), resumed
    with `medtune train --resume`: the losses and the final weights equal an uninterrupted run's bit for bit
    (clips are a pure function of (seed, step); weights, optimizer, schedule and RNG come back)."""
    from safetensors.torch import load_file

    from medtune.train import train

    _data(tmp_path)
    steps, save_every = 24, 4
    opts = (f"train.save_every={save_every}", "train.eval_every=12")
    full = train(video_cfg(tmp_path, "full", *opts, steps=steps))
    killed = tmp_path / "runs" / "killed"
    proc = _cli("train", str(_write_cfg(tmp_path, video_cfg(tmp_path, "killed", *opts, steps=steps), "killed")))
    kill_9_after_two_checkpoints(proc, killed, save_every, steps)
    _ok("train", "--resume", str(killed))

    assert losses(killed)[-steps:] == losses(full)
    assert [r["step"] for r in read_metrics(killed) if "loss" in r][-steps:] == list(range(1, steps + 1))
    a = load_file(str(full / "checkpoints" / "last" / "model" / "model.safetensors"))
    b = load_file(str(killed / "checkpoints" / "last" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the clips trained the memory path: the preflight saw gradient reach the memory attention and encoder
    preflight = json.loads((full / "preflight.json").read_text())
    assert preflight["passed"]


def test_eval_writes_per_video_and_per_frame_tables(trained):
    out = _ok("eval", str(trained))
    assert "per-video" in out and "videos" in out
    summary = json.loads((trained / "eval" / "test" / "summary.json").read_text())
    split = json.loads((trained / "split.json").read_text())
    assert summary["task"] == "video" and summary["n_videos"] == len(split["test"])
    assert summary["n_frames"] == N_FRAMES * len(split["test"])
    assert 0.0 <= summary["threshold"] <= 1.0 and summary["calibration"]["strategy"] == "max_dice"
    per_frame = (trained / "eval" / "test" / "per_frame.csv").read_text().splitlines()
    assert len(per_frame) == 1 + N_FRAMES * len(split["test"])
    assert (trained / "eval" / "test" / "per_video.csv").is_file()

    # report and compare dispatch through the task like eval (in process: the CLI path is the same call)
    from medtune.evaluate import evaluate_run
    from medtune.reporting import compare_runs, write_report
    from medtune.train import train

    report = write_report(trained)
    assert report.is_file() and "Dice" in report.read_text()
    other = train(video_cfg(trained.parent.parent, "v-other", "optim.lr=3e-3", steps=2))
    evaluate_run(other)
    table = compare_runs([trained, other])  # paired per video, the first run the baseline
    assert "videos" in table and "v-other" in table


def test_predict_on_an_mp4_and_a_frame_folder(trained, tmp_path):
    """A video file (48x64: not the model's square) and a folder of odd-sized frames (61x63): one mask and one
    16-bit probability map per frame at the frame's own size, and an overlay video with every frame."""
    rng = np.random.default_rng(0)
    mp4_frames = [(rng.random((48, 64)) * 255).astype(np.uint8) for _ in range(7)]
    mp4 = write_mp4(mp4_frames, tmp_path / "angio.mp4")
    folder = tmp_path / "run7"
    folder.mkdir()
    for t in range(5):
        Image.fromarray((rng.random((61, 63)) * 255).astype(np.uint8)).save(folder / f"frame_{t:03d}.png")
    out_dir = tmp_path / "pred"
    printed = _ok("predict", str(trained), str(mp4), str(folder), "--out", str(out_dir))
    assert "angio: 7 masks" in printed and "run7: 5 masks" in printed

    for name, n, (h, w) in (("angio", 7, (48, 64)), ("run7", 5, (61, 63))):
        masks = sorted((out_dir / name / "masks").glob("*.png"))
        probs = sorted((out_dir / name / "probs").glob("*.png"))
        assert [p.name for p in masks] == [f"{t:05d}.png" for t in range(n)] == [p.name for p in probs]
        mask, prob = np.asarray(Image.open(masks[0])), np.asarray(Image.open(probs[0]))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        assert prob.shape == (h, w) and prob.dtype == np.uint16
        # the mask is the probability map at the threshold predict.json records
        thr = json.loads((out_dir / "predict.json").read_text())["threshold"]
        disagree = (mask > 0) != (prob / 65535 >= thr)  # only where 16-bit rounding crosses the threshold
        assert np.all(np.abs(prob[disagree] / 65535 - thr) < 1e-4)
        overlay = read_video(out_dir / name / "overlay.mp4")
        assert len(overlay) == n
        assert overlay[0].shape[:2] == (h + h % 2, w + w % 2)  # odd sides padded by one pixel for yuv420p


def test_bad_inputs_to_predict_are_one_line(trained, tmp_path):
    not_video = tmp_path / "notes.txt"
    not_video.write_text("not a video")
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _run("predict", str(trained), str(not_video), "--out", str(tmp_path / "p"))
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if not line.startswith("INFO ")]
    assert len(lines) == 1 and str(not_video) in lines[0] and "cannot be read as a video" in lines[0], done.stderr
    from medtune.errors import DataError, UserError
    from medtune.predict import predict_images

    with pytest.raises(DataError, match="no frame files") as refused:  # the CLI prints this one line
        predict_images(trained, [empty], tmp_path / "p")
    assert str(empty) in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "p").exists()  # nothing written for a refused input

    with pytest.raises(UserError, match="model.prompt=none"):  # a semantic run takes no prompt
        predict_images(trained, [empty], tmp_path / "p", box=(1, 2, 3, 4))


def test_rl_on_clips_runs_unchanged_or_says_why(trained, tmp_path):
    """objective: rl from the supervised video run: the mask policy on each supervised frame of a clip. With the
    mask decoder trained fully (default modules_to_save) it is refused in one line (its object-score gate gets no
    policy gradient); with LoRA only in the encoder and memory attention it trains and logs rewards."""
    from medtune.errors import ConfigError
    from medtune.train import train

    def rl_cfg(name, *extra):
        return build_config({}, [
            f"run.output_dir={tmp_path / 'runs'}", f"run.name={name}", "objective=rl", f"rl.init_from={trained}",
            "data.batch_size=2", "rl.group_size=2", "optim.max_steps=2", "optim.warmup_steps=1",
            "train.eval_every=2", "train.save_every=2", "train.log_every=1", "train.trackers=[]", *extra])

    with pytest.raises(ConfigError, match="lora.modules_to_save"):
        train(rl_cfg("rl-refused"))
    run = train(rl_cfg("rl", "lora.modules_to_save=[]"))
    records = read_metrics(run)
    assert any("reward_mean" in r for r in records) and any("val_reward" in r for r in records)


@pytest.mark.slow
@pytest.mark.ci
def test_video_demo_fast_mode_runs_end_to_end(tmp_path):
    """`medtune demo video --fast`: both runs train; the initial weights, the video model with and without its memory
    and the image-only model are scored on every frame of the same test videos, with CIs over videos and paired
    tests of the video model against the image-only one and against itself without memory."""
    from medtune.demo import VIDEO_DEMO, VIDEO_DEMO_TESTED, run_video_demo

    result = run_video_demo(tmp_path / "demo", fast=True)
    for name in ("initial", "video", "video_memory_off", "image_only"):
        for key in ("dice", "flicker"):
            c = result[name][key]
            assert 0.0 <= c["lo"] <= c["mean"] <= c["hi"] <= 1.0
    assert result["n_test_videos"] == 6
    for pair in ("video - image_only", "video - video_memory_off"):
        for key in VIDEO_DEMO_TESTED:
            d = result["paired"][pair][key]
            assert d["lo"] <= d["diff"] <= d["hi"] and 0.0 < d["p"] <= 1.0
    summary = json.loads((Path(result["runs"]["video"]) / "eval" / "data-test-dense" / "summary.json").read_text())
    assert summary["n_annotated_frames"] == summary["n_frames"] == VIDEO_DEMO["n_frames"] * summary["n_videos"]
    off = json.loads((Path(result["runs"]["video"]) / "eval" / "memory-off" / "summary.json").read_text())
    assert off["memory"] is False and summary["memory"] is True and off["n_frames"] == summary["n_frames"]


def test_a_mask_prompted_run_predicts_from_a_later_frame(tmp_path):
    """model.prompt=mask: the mask given for frame 3 prompts the memory, which propagates forward to the end and back
    to frame 0; every frame gets its mask and the overlay video still runs in frame order. Without the mask, or with
    a mask of another size, one line."""
    from medtune.errors import UserError
    from medtune.predict import predict_images
    from medtune.train import train

    _data(tmp_path)
    run = train(video_cfg(tmp_path, "prompted", "model.prompt=mask", "train.preflight=false", steps=2))
    frames = tmp_path / "data" / "JPEGImages" / "run000"
    prompt = tmp_path / "data" / "Annotations" / "run000" / "00003.png"
    out_dir = tmp_path / "pred"
    predict_images(run, [frames], out_dir, prompt=[str(prompt)], frame=3)
    masks = sorted((out_dir / "run000" / "masks").glob("*.png"))
    assert len(masks) == N_FRAMES
    overlay = read_video(out_dir / "run000" / "overlay.mp4")
    assert len(overlay) == N_FRAMES
    # frame 3's output is its prompt (at the mask decoder's low resolution): high on the given vessels, ~0 elsewhere;
    # the two training steps leave the other frames undecided
    given = np.asarray(Image.open(prompt)) > 0
    prob3 = np.asarray(Image.open(out_dir / "run000" / "probs" / "00003.png")) / 65535
    assert prob3[given].mean() > 0.2 and prob3[~given].mean() < 0.05
    with pytest.raises(UserError, match="--prompt MASK.png"):
        predict_images(run, [frames], tmp_path / "p2")
    small = tmp_path / "small.png"
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(small)
    with pytest.raises(UserError, match="frame's size"):
        predict_images(run, [frames], tmp_path / "p3", prompt=[str(small)])
    # the memory ablation needs a semantic run: the memory is what carries a prompt to the other frames
    from medtune.errors import ConfigError
    from medtune.runs.load import load_run_model
    from medtune.tasks.video import evaluate_model

    cfg, model, _ = load_run_model(run)
    with pytest.raises(ConfigError, match="only a semantic run"):
        evaluate_model(model, cfg, run, "val", out_dir=tmp_path / "no-memory", memory=False)
