"""Training data decoded on access (LazySamples) in DataLoader workers: same batches as the eager path, nothing
decoded up front, and exact resume with workers."""
from __future__ import annotations

import shutil

import pytest
import torch
from helpers import tiny_cfg
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate as collate

import medtune.data.loading as loading
from medtune.data.datasets import StepBatchSampler, TrainPatchDataset
from medtune.data.run_split import load_split_samples, prepare_split
from medtune.data.types import DataError
from medtune.train.sft import train

STEPS = (0, 3, 7)  # a step of each epoch's start, middle and a later epoch (8 keys per epoch at batch 4)


def _split(tmp_path, *opts):
    cfg = tiny_cfg(tmp_path, *opts)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return cfg, prepare_split(cfg, run_dir), run_dir


def _batches(dataset, cfg, workers: int) -> list[dict]:
    sampler = StepBatchSampler(len(dataset), cfg.data.batch_size, cfg.run.seed)
    loader = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                             generator=torch.Generator()))
    out = [next(loader) for _ in range(max(STEPS) + 1)]
    return [out[s] for s in STEPS]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_lazy_batches_equal_eager_ones_with_and_without_workers(tmp_path):
    cfg, data, run_dir = _split(tmp_path, "data.scale_norm.enabled=true")  # the streamed scale pass too
    eager = TrainPatchDataset(load_split_samples(cfg, data, "train", run_dir), cfg.data, cfg.run.seed)
    lazy = TrainPatchDataset(load_split_samples(cfg, data, "train", run_dir, lazy=True), cfg.data, cfg.run.seed)
    reference = _batches(eager, cfg, 0)
    assert not torch.equal(reference[0]["image"], reference[1]["image"])  # the steps differ: the check can fail
    _assert_same(reference, _batches(lazy, cfg, 0))
    _assert_same(reference, _batches(lazy, cfg, 2))


def test_lazy_split_decodes_nothing_until_a_batch_needs_it(tmp_path, monkeypatch):
    cfg, data, run_dir = _split(tmp_path)
    calls = []
    real = loading.load_sample
    monkeypatch.setattr(loading, "load_sample", lambda *a, **k: calls.append(a[0].id) or real(*a, **k))
    samples = load_split_samples(cfg, data, "train", run_dir, lazy=True)
    dataset = TrainPatchDataset(samples, cfg.data, cfg.run.seed)
    assert len(samples) == len(data.split["train"]) > 0 and calls == []
    keys = StepBatchSampler(len(dataset), cfg.data.batch_size, cfg.run.seed).global_batch_at(0)
    for key in keys:
        dataset[key]
    assert len(calls) == len(keys)  # one decode per item, no more


def test_resume_with_two_workers_gives_bit_identical_weights(tmp_path):
    opts = ("train.save_every=2", "train.keep_last=5", "train.preflight=false", "data.num_workers=2")
    run = train(tiny_cfg(tmp_path, *opts, steps=4, name="full"))
    final = load_file(str(run / "checkpoints" / "last" / "model" / "model.safetensors"))
    in_process = train(tiny_cfg(tmp_path, *opts[:-1], "data.num_workers=0", steps=4, name="inproc"))
    same = load_file(str(in_process / "checkpoints" / "last" / "model" / "model.safetensors"))
    assert all(torch.equal(final[k], same[k]) for k in final)  # workers decode exactly what the main process would
    for name in ("last", "step-4", "best"):
        shutil.rmtree(run / "checkpoints" / name, ignore_errors=True)
    train(tiny_cfg(tmp_path, *opts, steps=4, name="full"), resume=run)
    resumed = load_file(str(run / "checkpoints" / "last" / "model" / "model.safetensors"))
    assert any(not torch.equal(final[k], torch.zeros_like(final[k])) for k in final)
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_a_broken_training_file_met_in_a_worker_is_one_line(tmp_path, capsys):
    """Decoding on access means a broken training file (here a mask: masks are not read at start) is met inside a
    DataLoader worker, whose error torch re-raises with the worker's traceback folded into the message; the CLI
    still prints the original error's one line, naming the file."""
    from helpers import tiny_cfg, write_generic

    from medtune.cli import main

    data = write_generic(tmp_path / "data", n=8, size=32)
    for mask in (data / "masks").iterdir():
        mask.write_bytes(b"not a png")
    cfg = tiny_cfg(tmp_path, "data.layout=generic", f"data.path={data}", "data.num_workers=2",
                   "data.split.val_fraction=0.0", "data.split.test_fraction=0.0", steps=2)
    config = tmp_path / "broken.yaml"
    config.write_text(cfg.to_yaml())
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("medtune train: error: ") and "cannot be read as an image" in err
    assert str(data / "masks") in err and "Traceback" not in err and "DataLoader worker" not in err


def test_one_line_unwraps_only_the_worker_wrapper():
    from medtune.errors import DataError, one_line

    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\nmedtune.errors.DataError: a.png: cannot be read")
    assert one_line(wrapped) == "a.png: cannot be read"
    assert one_line(DataError("b.png: two: colons")) == "b.png: two: colons"


def test_a_resumed_run_reads_no_image_for_its_scale_factors(tmp_path, monkeypatch):
    """Scale normalisation measures every training image's FOV once; RUN/scale.json keeps the factors, so the
    lazy training split of a resumed run (or an eval) is ready without decoding anything."""
    cfg, data, run_dir = _split(tmp_path, "data.scale_norm.enabled=true")
    first = load_split_samples(cfg, data, "train", run_dir, lazy=True)
    calls = []
    real = loading.load_sample
    monkeypatch.setattr(loading, "load_sample", lambda *a, **k: calls.append(a[0].id) or real(*a, **k))
    again = load_split_samples(cfg, prepare_split(cfg, run_dir), "train", run_dir, lazy=True)
    assert calls == [] and again.scales == first.scales and len(set(first.scales.values())) > 1


def test_the_rl_curriculum_is_measured_once_per_run(tmp_path, monkeypatch):
    from medtune.train.rl import curriculum_order, thinness

    cfg, data, run_dir = _split(tmp_path)
    eager = load_split_samples(cfg, data, "train", run_dir)
    expected = sorted(range(len(eager)), key=lambda i: thinness(eager[i]))
    assert curriculum_order(load_split_samples(cfg, data, "train", run_dir, lazy=True), run_dir, True) == expected
    calls = []
    real = loading.load_sample
    monkeypatch.setattr(loading, "load_sample", lambda *a, **k: calls.append(a[0].id) or real(*a, **k))
    resumed = curriculum_order(load_split_samples(cfg, data, "train", run_dir, lazy=True), run_dir, True)
    assert resumed == expected and calls == [] and expected != sorted(expected)


def test_a_resume_reads_only_the_val_and_test_files_that_changed(tmp_path, monkeypatch):
    import os

    from medtune.data.run_split import check_readable

    cfg, data, run_dir = _split(tmp_path)
    check_readable(cfg, data, ("val", "test"), run_dir)
    calls = []
    real = loading.load_sample
    monkeypatch.setattr(loading, "load_sample", lambda *a, **k: calls.append(a[0].id) or real(*a, **k))
    check_readable(cfg, data, ("val", "test"), run_dir)
    assert calls == []
    changed = data.samples[data.split["test"][0]]
    os.utime(changed.image, ns=(0, 0))  # touched since: read again
    check_readable(cfg, data, ("val", "test"), run_dir)
    assert calls == [changed.id]
    changed.image.write_bytes(b"broken")
    with pytest.raises(DataError, match="cannot be read as an image"):
        check_readable(cfg, data, ("val", "test"), run_dir)
