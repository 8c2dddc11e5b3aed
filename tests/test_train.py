"""End-to-end supervised runs on tiny models: run folder contract, checkpoints, resume, multi-process, eval."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_logs_mfu, tiny_cfg
from peft import PeftModel

from medtune.evaluate import evaluate_run
from medtune.models.lora import export_merged
from medtune.runs.files import read_metrics
from medtune.runs.load import load_run_model
from medtune.train.sft import train


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_unet_full_run_writes_the_run_folder_and_evaluates(tmp_path):
    run = train(tiny_cfg(tmp_path, steps=6))
    for name in ("config.yaml", "env.json", "metrics.jsonl", "split.json", "preflight.json"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "best" / "model" / "model.safetensors").is_file()
    assert (run / "checkpoints" / "last" / "trainer_state.pt").is_file()
    pre = json.loads((run / "preflight.json").read_text())
    assert pre["passed"] and pre["n_trainable"] > 0
    assert len(losses(run)) == 6 and all(map(lambda v: v == v, losses(run)))
    # the dead-gradient watch ran on every logged step and found every trainable tensor alive
    assert [r["dead_gradient_tensors"] for r in read_metrics(run) if "loss" in r] == [0] * 6
    env = json.loads((run / "env.json").read_text())
    assert env["versions"]["torch"] and "device" in env
    summary = evaluate_run(run)
    assert 0.0 <= summary["pooled@cal"]["dice"] <= 1.0 and summary["n_images"] == 2
    assert (run / "eval" / "test" / "per_image.csv").is_file()


def test_tensorboard_logs_land_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = train(tiny_cfg(tmp_path, "train.trackers=[tensorboard]", steps=2, name="tb"))
    assert list((run / "tb").rglob("events.out.tfevents*")), "no TensorBoard events in RUN/tb"
    assert not (tmp_path / "tb").exists(), "TensorBoard events written to the working directory"


def test_lora_on_saved_base_gives_peft_adapter_and_changes_output(tmp_path):
    base = train(tiny_cfg(tmp_path, steps=4, name="base"))
    _, base_model, _ = load_run_model(base, "best", "cpu")
    export_merged(base_model, tmp_path / "base-model")
    run = train(tiny_cfg(tmp_path, f"model.path={tmp_path / 'base-model'}", "lora.r=4", steps=4, name="lora"))
    adapter = run / "checkpoints" / "last" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    cfg, model, _ = load_run_model(run, "last", "cpu")
    # PEFT itself loads what we saved
    fresh = load_run_model(base, "best", "cpu")[1].net
    peft_model = PeftModel.from_pretrained(fresh, adapter)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ours = model.forward_logits(x)
        assert torch.allclose(model.net(x), peft_model(x), atol=1e-5)
        with model.adapters_disabled():
            reference = model.forward_logits(x)
    assert not torch.allclose(ours, reference), "LoRA adapter did not change the model: nothing trained"
    pre = json.loads((run / "preflight.json").read_text())
    assert pre["passed"] and all("lora_A" in n for n in pre["zero_grad_first_step"])


def test_tiny_sam_semantic_and_box_runs(tmp_path):
    from medtune.models.sam import tiny_sam_config_dict

    sam = json.dumps(tiny_sam_config_dict())
    run = train(tiny_cfg(tmp_path, "model.family=sam", f"model.config={sam}", "model.finetune=lora",
                         "data.derive_fov=false", steps=3, name="sam"))
    assert json.loads((run / "preflight.json").read_text())["passed"]
    assert (run / "checkpoints" / "last" / "adapter" / "adapter_model.safetensors").is_file()
    assert_logs_mfu(run)
    box = train(tiny_cfg(tmp_path, "model.family=sam", f"model.config={sam}", "model.finetune=lora",
                         "model.prompt=box", "data.sampling=whole_image", steps=3, name="sam-box"))
    summary = evaluate_run(box)
    assert summary["n_images"] == 2


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "medtune.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _write_cfg(tmp_path, cfg, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(cfg.to_yaml())
    return path


def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path):
    steps = 80  # long enough that the signal lands mid-run, short enough for CI
    opts = ("train.eval_every=20", "train.save_every=16")
    full = train(tiny_cfg(tmp_path, *opts, steps=steps, name="full"))
    cfg_path = _write_cfg(tmp_path, tiny_cfg(tmp_path, *opts, steps=steps, name="killed"))
    run_dir = tmp_path / "runs" / "killed"
    proc = _cli("train", str(cfg_path))
    deadline = time.time() + 120
    while time.time() < deadline and len(losses(run_dir)) < 5:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    stopped_at = len(losses(run_dir))
    assert 5 <= stopped_at < steps, out
    assert json.loads((run_dir / "checkpoints" / "last" / "meta.json").read_text())["reason"] == "SIGTERM"
    resumed = _cli("train", "--resume", str(run_dir))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert losses(run_dir) == pytest.approx(losses(full), rel=1e-6, abs=1e-7)
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, steps + 1))


@pytest.mark.slow
@pytest.mark.ci
def test_two_process_gloo_matches_one_process(tmp_path):
    one = train(tiny_cfg(tmp_path, "train.preflight=false", steps=4, name="one"))
    cfg_path = _write_cfg(tmp_path, tiny_cfg(tmp_path, "train.preflight=false", steps=4, name="two"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29517", "-m", "medtune.cli", "train", str(cfg_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = tmp_path / "runs" / "two"
    assert losses(two) == pytest.approx(losses(one), rel=1e-4, abs=1e-5)
    # Compare the functions, not the raw weights: conv biases that feed an InstanceNorm have an exactly-zero true
    # gradient, so Adam moves them by rounding noise that differs between 1 and 2 processes yet changes no output.
    m1, m2 = load_run_model(one, "last", "cpu")[1], load_run_model(two, "last", "cpu")[1]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(m1(x), m2(x), atol=1e-4)


def _torchrun(port: int, *args: str, **kw):
    """`medtune` on 2 gloo processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(port), "-m", "medtune.cli", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _descendants(pid: int) -> list[int]:
    """pid's child processes, their children, ... (from /proc): torchrun starts its workers in sessions of their own,
    so killing its process group does not reach them."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _kill_9_tree(proc) -> None:
    for pid in [proc.pid, *_descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _finish(proc, timeout=300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.ci
def test_two_process_kill_9_then_resume_gives_bit_identical_weights(tmp_path):
    """2 gloo processes with dropout (each rank its own random stream), killed with SIGKILL mid-run (no handler, no
    final save), resumed from the last checkpoint: the final weights equal the uninterrupted run's bit for bit. Only
    true if every rank gets back its own optimizer state and RNG state: rank 0's RNG on rank 1 changes its dropout."""
    from safetensors.torch import load_file

    steps, save_every = 200, 10  # the tiny steps take milliseconds: enough of them that the kill lands mid-run
    opts = ("train.preflight=false", "train.eval_every=100", f"train.save_every={save_every}",
            "model.config={channels: [4, 8, 16], strides: [2, 2], num_res_units: 1, dropout: 0.3}")
    full_cfg = _write_cfg(tmp_path, tiny_cfg(tmp_path, *opts, steps=steps, name="full"), "full.yaml")
    killed_cfg = _write_cfg(tmp_path, tiny_cfg(tmp_path, *opts, steps=steps, name="killed"), "killed.yaml")
    full, killed = tmp_path / "runs" / "full", tmp_path / "runs" / "killed"
    _finish(_torchrun(29541, "train", str(full_cfg)))

    proc = _torchrun(29542, "train", str(killed_cfg))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(losses(killed)) < 2 * save_every + 2:
        time.sleep(0.05)
    _kill_9_tree(proc)  # torchrun and both workers, at once, with no chance to save
    proc.communicate(timeout=60)
    killed_at = len(losses(killed))
    assert 2 * save_every + 2 <= killed_at < steps, "the kill must land mid-run, after a checkpoint"
    _finish(_torchrun(29543, "train", "--resume", str(killed)))

    assert losses(killed) == losses(full)
    a = load_file(str(full / "checkpoints" / "last" / "model" / "model.safetensors"))
    b = load_file(str(killed / "checkpoints" / "last" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # each rank's RNG state is its own file in the checkpoint, and the two streams do differ
    engine = killed / "checkpoints" / "last" / "engine"
    states = [torch.load(engine / f"random_states_{r}.pkl", weights_only=False)["torch_manual_seed"] for r in (0, 1)]
    assert not torch.equal(states[0], states[1])


@pytest.mark.realdata
def test_short_real_training_and_eval_on_drive(tmp_path):
    """A short U-Net run on real DRIVE, calibrated on a val split carved from training, evaluated on its test set."""
    from helpers import SHARED_DATA

    from medtune.config import load_config

    drive = SHARED_DATA / "DRIVE"
    if not drive.is_dir():
        pytest.skip(f"{drive} not found: real-data test skipped (see ../shared/data/README.md)")
    cfg = load_config(REPO / "configs" / "drive_unet.yaml", [
        f"data.path={drive}", f"run.output_dir={tmp_path}", "optim.max_steps=60", "optim.warmup_steps=10",
        "data.batch_size=8", "train.eval_every=60", "train.save_every=60", "train.log_every=10", "train.trackers=[]",
        "eval.bootstrap=100",
    ])
    run = train(cfg)
    split = json.loads((run / "split.json").read_text())
    assert len(split["test"]) == 20 and len(split["train"]) + len(split["val"]) == 20 and split["val"]
    summary = evaluate_run(run)
    pooled = summary["pooled@cal"]
    # 60 steps is far from converged (the benchmark reaches ~0.8): this checks the pipeline learns real vessels
    assert pooled["dice"] > 0.45 and pooled["auc"] > 0.85, pooled
    assert summary["n_images"] == 20 and summary["calibration"]["strategy"] == "max_dice"


class _TwoProcessStub:
    """What micro_batch_weights asks of an accelerator, as rank 0 of 2 whose peer holds `peer_units` units."""

    def __init__(self, peer_units: float):
        self.device, self.num_processes, self.peer_units = torch.device("cpu"), 2, peer_units

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor + self.peer_units


def test_micro_batch_weights_by_hand():
    """Each micro-batch's mean loss is weighted by its units x processes / all units of the optimizer step."""
    from types import SimpleNamespace

    from medtune.train.sft import micro_batch_weights

    tokens = SimpleNamespace(loss_units=lambda b: torch.tensor(float(b["n"])))
    # 3 and 1 supervised tokens here, 4 on the other process: 3 x 2 / 8 and 1 x 2 / 8
    weights = micro_batch_weights([{"n": 3}, {"n": 1}], tokens, _TwoProcessStub(4.0))
    assert [float(w) for w in weights] == [0.75, 0.25]
    # no loss_units: samples count; 4 and 2 images here, 6 there -> 4 x 2 / 12, 2 x 2 / 12
    per_sample = SimpleNamespace(loss_units=None)
    weights = micro_batch_weights([{"ids": list("abcd")}, {"ids": list("ef")}], per_sample, _TwoProcessStub(6.0))
    assert [float(w) for w in weights] == pytest.approx([2 / 3, 1 / 3])
    # nothing supervised anywhere: weights 0, not NaN
    assert [float(w) for w in micro_batch_weights([{"n": 0}], tokens, _TwoProcessStub(0.0))] == [0.0]


def test_an_adapter_saved_from_gathered_weights_holds_those_weights(tmp_path):
    """FSDP shards the live parameters, so a checkpoint's adapter/ is written from the full state dict the engine
    gathered (keys as SegModel.state_dict()): what lands in the PEFT folder are those values, not the live ones."""
    from medtune.models.lora import load_trainable, save_trainable
    from medtune.models.registry import build_model

    cfg = tiny_cfg(tmp_path, "model.finetune=lora")
    live, fresh = build_model(cfg), build_model(cfg)
    gathered = {k: (torch.full_like(v, 0.5) if "lora_B" in k else v.clone()) for k, v in live.state_dict().items()}
    save_trainable(live, tmp_path / "ckpt", state_dict=gathered)
    load_trainable(fresh, tmp_path / "ckpt")
    loaded = dict(fresh.state_dict())
    lora_b = [k for k in gathered if "lora_B" in k]
    assert lora_b and all(torch.equal(loaded[k], gathered[k]) for k in lora_b)
    assert not any(torch.equal(live.state_dict()[k], gathered[k]) for k in lora_b)  # the live ones are zeros


def test_a_checkpoint_from_before_engine_state_still_resumes_exactly(tmp_path):
    """Checkpoints written before engine/ existed kept optimizer and RNG in trainer_state.pt: one rewritten into that
    form resumes to the same final weights as the uninterrupted run."""
    import random
    import shutil

    from safetensors.torch import load_file

    opts = ("train.save_every=2", "train.keep_last=5", "train.preflight=false")
    run = train(tiny_cfg(tmp_path, *opts, steps=4, name="full"))
    final = load_file(str(run / "checkpoints" / "last" / "model" / "model.safetensors"))
    ckpt = run / "checkpoints" / "step-2"
    engine = ckpt / "engine"
    blob = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    rng = torch.load(engine / "random_states_0.pkl", weights_only=False)
    blob.update(optimizer=torch.load(engine / "optimizer.bin", weights_only=True), scaler=None,
                rng={"torch": rng["torch_manual_seed"], "python": rng["random_state"]})
    torch.save(blob, ckpt / "trainer_state.pt")
    shutil.rmtree(engine)
    for name in ("last", "step-4", "best"):
        shutil.rmtree(run / "checkpoints" / name, ignore_errors=True)
    random.seed(12345)  # whatever state the process is in: the checkpoint's RNG must win
    train(tiny_cfg(tmp_path, *opts, steps=4, name="full"), resume=run)
    resumed = load_file(str(run / "checkpoints" / "last" / "model" / "model.safetensors"))
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_a_launch_config_whose_accumulation_differs_from_the_recipe_is_refused(tmp_path, monkeypatch):
    """`accelerate launch` hands a DeepSpeed config's gradient_accumulation_steps over in the environment, where it
    overrides the recipe's; the engine would then step at other boundaries than the micro-batches. One line, before
    anything is written."""
    from medtune.errors import ConfigError
    from medtune.train.setup import make_accelerator

    cfg = tiny_cfg(tmp_path, steps=2)
    cfg.optim.grad_accum = 2
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=1, but optim.grad_accum=2"):
        make_accelerator(cfg)
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    assert make_accelerator(cfg).gradient_accumulation_steps == 2


@pytest.mark.slow
def test_accelerate_does_not_enable_fsdp_on_cpu_processes(tmp_path):
    """Why the multi-process CPU tests run DDP and not FSDP: accelerate (the engine) turns FSDP on only for GPU-like
    device types; 2 gloo CPU processes with ACCELERATE_USE_FSDP=true stay MULTI_CPU (accelerate/state.py). If this
    fails, accelerate supports FSDP on CPU and the 2-process save/resume test should run it too."""
    script = tmp_path / "probe.py"
    script.write_text("from accelerate import Accelerator\nprint('TYPE', Accelerator(cpu=True).distributed_type.name)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_FSDP": "true"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("TYPE MULTI_CPU") == 2, proc.stdout
