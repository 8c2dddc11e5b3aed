"""Report, compare, k-fold and cross-validation on hand-built run folders: no training, a few seconds in all."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import write_generic

from medtune.config import build_config
from medtune.data.types import Sample

N_DATA = 10
TEST_IDS = [f"images/img{i}" for i in range(2, N_DATA)]  # 8 test images
METRICS = ["dice", "iou", "precision", "recall", "specificity", "accuracy", "auc", "cldice",
           "betti0_error", "betti1_error", "hd95", "assd"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_generic(tmp_path_factory.mktemp("data"), n=N_DATA, size=32)


def _ci(values: np.ndarray) -> dict:
    rng = np.random.default_rng(0)
    v = values[np.isfinite(values)]
    boot = [rng.choice(v, len(v)).mean() for _ in range(200)]
    return {"mean": float(v.mean()), "lo": float(np.percentile(boot, 2.5)), "hi": float(np.percentile(boot, 97.5)),
            "n": int(len(v)), "n_nan": int((~np.isfinite(values)).sum())}


def per_image_values(better: bool) -> dict[str, np.ndarray]:
    """Per-image metrics at the calibrated threshold. Run B ('better') gains 0.08-0.15 Dice on every image, has a
    lower hd95, and exactly the same specificity: the expected verdicts are unambiguous."""
    base = np.array([0.55, 0.62, 0.70, 0.48, 0.66, 0.73, 0.59, 0.68])
    gain = np.array([0.10, 0.12, 0.08, 0.15, 0.11, 0.09, 0.13, 0.10]) if better else np.zeros(8)
    dice = base + gain
    vals = {m: np.full(8, 0.9) for m in METRICS}
    vals.update(dice=dice, iou=dice / (2 - dice), precision=dice + 0.02, recall=dice - 0.02,
                specificity=np.array([0.97, 0.98, 0.96, 0.99, 0.97, 0.98, 0.95, 0.97]),
                hd95=np.array([9.0, 7.5, 6.0, 12.0, 8.0, 5.5, 10.0, 7.0]) - (3.0 if better else 0.0))
    return vals


def write_run(root: Path, name: str, data: Path, better: bool, lora_r: int, test_ids=TEST_IDS,
              rl: bool = False, overrides: tuple[str, ...] = ()) -> Path:
    run = root / name
    (run / "eval" / "test").mkdir(parents=True)
    cfg = build_config({}, [f"run.name={name}", f"run.output_dir={root}", "data.layout=generic", f"data.path={data}",
                            "model.finetune=lora", f"lora.r={lora_r}", "optim.max_steps=40", *overrides])
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "split.json").write_text(json.dumps({"train": ["images/img0"], "val": ["images/img1"],
                                                "test": list(test_ids)}))
    records = []
    for step in range(1, 41):
        rec = {"step": step, "loss": 1.0 / step + (0.0 if better else 0.1), "lr": 1e-3 * (1 - step / 41)}
        if rl:
            rec.update(reward_mean=0.5 + step / 100, kl=0.01 * step, clip_fraction=0.1)
        records.append(rec)
        if step % 10 == 0:
            records.append({"step": step, "val_dice": 0.5 + step / 100 + (0.1 if better else 0), "val_auc": 0.9})
    records.append({"step": 30, "warning": "validation metric identical <b>over</b> 3 evaluations"})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "preflight.json").write_text(json.dumps({
        "passed": True, "n_trainable": 12, "n_trainable_params": 34567, "n_frozen": 40, "loss": 0.91,
        "zero_grad_first_step": ["base.lora_A.default.weight"], "steps": 3,
        "notes": ["1 LoRA-A tensors have zero gradient on step one: expected, LoRA-B starts at 0"]}))

    n = len(test_ids)
    vals = {m: v[:n] for m, v in per_image_values(better).items()}
    t050 = {m: v - 0.01 for m, v in vals.items()}
    with (run / "eval" / "test" / "per_image.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id"] + [f"{m}@t050" for m in METRICS] + [f"{m}@cal" for m in METRICS])
        for i, sid in enumerate(test_ids):
            w.writerow([sid] + [t050[m][i] for m in METRICS] + [vals[m][i] for m in METRICS])
    threshold = 0.42
    pooled = {"dice": float(vals["dice"].mean()) + 0.01, "precision": 0.8, "recall": 0.7, "auc": 0.95,
              "specificity": 0.97, "iou": 0.6}
    summary = {"run": str(run), "checkpoint": "best", "split": "test", "n_images": n, "threshold": threshold,
               "calibration": {"threshold": threshold, "strategy": "max_dice", "value": 0.7},
               "pooled@t050": {k: v - 0.01 for k, v in pooled.items()}, "pooled@cal": pooled,
               "per_image@t050": {m: _ci(v) for m, v in t050.items()},
               "per_image@cal": {m: _ci(v) for m, v in vals.items()}}
    (run / "eval" / "test" / "summary.json").write_text(json.dumps(summary))
    grid = np.linspace(0, 1, 21)
    (run / "eval" / "test" / "calibration.json").write_text(json.dumps({
        "threshold": threshold, "strategy": "max_dice", "value": 0.7,
        "curve": {"thresholds": grid.tolist(), "dice": (0.7 - (grid - threshold) ** 2).tolist(),
                  "precision": grid.tolist(), "recall": (1 - grid).tolist()}}))

    from PIL import Image
    rng = np.random.default_rng(1 if better else 2)
    maps = {}
    for k, sid in enumerate(test_ids):
        mask = np.asarray(Image.open(data / "masks" / f"{sid.split('/')[1]}.png")) > 0
        noise = rng.random(mask.shape) * (0.3 if better else 0.6)
        maps[f"p{k}"] = (np.clip(mask * 0.7 + noise, 0, 1) * 255).round().astype(np.uint8)
    np.savez_compressed(run / "eval" / "test" / "probs.npz", ids=np.array(test_ids), **maps)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    return (write_run(root, "run-a", data_dir, better=False, lora_r=8),
            write_run(root, "run-b", data_dir, better=True, lora_r=32, rl=True))


# ---------------------------------------------------------------------------------------------------------------
# report


@pytest.fixture(scope="module")
def report_html(runs) -> str:
    from medtune.reporting import write_report

    out = write_report(runs[1])
    assert out == runs[1] / "report.html"
    return out.read_text()


def test_report_is_self_contained(report_html):
    assert report_html.count('<img src="data:image/png;base64,') >= 10  # curves, threshold, PR, 6 overlays
    external = re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", report_html, flags=re.I)
    assert external == []
    assert "<script" not in report_html.lower()


def test_report_sections(report_html):
    for text in ("Configuration", "full resolved config", "Gradient-flow preflight", "PASSED", "34,567",
                 "training loss", "RL: mean reward", "RL: KL to the reference", "Threshold and precision-recall",
                 "average precision", "3 worst", "3 best", "magenta", "pooled @0.5"):
        assert text in report_html, text
    # user text from metrics.jsonl is escaped, never interpreted as markup
    assert "identical &lt;b&gt;over&lt;/b&gt; 3 evaluations" in report_html
    assert "<b>over</b>" not in report_html


def test_report_per_image_table_worst_first(report_html):
    section = report_html.split("Per image, worst first")[1].split("</table>")[0]
    ids = re.findall(r'<td class="l">(images/img\d+)</td>', section)
    dice = per_image_values(True)["dice"]
    expected = [TEST_IDS[i] for i in np.argsort(dice, kind="stable")]
    assert ids == expected


def test_report_needs_eval(tmp_path, data_dir):
    from medtune.reporting import write_report

    run = tmp_path / "fresh"
    run.mkdir()
    (run / "config.yaml").write_text(build_config({}, [f"data.path={data_dir}"]).to_yaml())
    with pytest.raises(FileNotFoundError, match=r"medtune eval .*fresh --split val"):
        write_report(run, split="val")


def test_report_without_ground_truth(tmp_path, data_dir):
    """Moved data: the report still has the metrics and says why the pictures are missing."""
    from medtune.reporting import write_report

    run = write_run(tmp_path, "moved", data_dir, better=False, lora_r=8)
    cfg_text = (run / "config.yaml").read_text().replace(str(data_dir), str(tmp_path / "gone"))
    (run / "config.yaml").write_text(cfg_text)
    text = write_report(run).read_text()
    assert "PR curve and overlays omitted" in text
    assert "Per image, worst first" in text


def test_pr_curve_exact_on_8bit():
    from medtune.report.plots import pr_curve_from_uint8

    p = np.array([[255, 200], [100, 0]], np.uint8)
    g = np.array([[1, 0], [1, 0]], np.uint8)
    pr = pr_curve_from_uint8([p], [g], [np.ones_like(g)])
    i = list(np.round(pr["thresholds"] * 255)).index(100)  # prediction: 255, 200, 100 -> 2 TP, 1 FP
    assert pr["recall"][i] == 1.0 and pr["precision"][i] == pytest.approx(2 / 3)
    assert pr["ap"] == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)


def test_pr_curve_matches_brute_force():
    from medtune.report.plots import pr_curve_from_uint8

    rng = np.random.default_rng(3)
    probs = [rng.integers(0, 256, (16, 16)).astype(np.uint8) for _ in range(3)]
    gts = [(rng.random((16, 16)) < 0.3).astype(np.uint8) for _ in range(3)]
    fovs = [(rng.random((16, 16)) < 0.8).astype(np.uint8) for _ in range(3)]
    pr = pr_curve_from_uint8(probs, gts, fovs)
    p = np.concatenate([x[f > 0] for x, f in zip(probs, fovs)]).astype(int)
    g = np.concatenate([x[f > 0] for x, f in zip(gts, fovs)]).astype(bool)
    for k in (0, 1, 77, 128, 254, 255):
        i = int(np.argmin(np.abs(pr["thresholds"] - k / 255)))
        tp, fp = int((g & (p >= k)).sum()), int((~g & (p >= k)).sum())
        assert pr["recall"][i] == pytest.approx(tp / g.sum()), k
        assert pr["precision"][i] == pytest.approx(tp / (tp + fp) if tp + fp else 1.0), k


# ---------------------------------------------------------------------------------------------------------------
# compare


@pytest.fixture(scope="module")
def compared(runs, tmp_path_factory):
    from medtune.reporting import compare_runs

    out = tmp_path_factory.mktemp("cmp")
    return compare_runs(list(runs), out_dir=out), out


def _line(text: str, metric: str) -> str:
    return next(ln for ln in text.splitlines() if ln.split("  ")[0].strip() == metric)


def test_compare_table_verdicts(compared):
    text, _ = compared
    assert "baseline run-a" in text and "paired over 8 common image(s)" in text
    assert _line(text, "dice").rstrip().endswith("better")
    assert "+0.1100" in _line(text, "dice")  # mean of the constructed gains
    assert _line(text, "specificity").rstrip().endswith("no significant difference")
    assert _line(text, "hd95 ↓").rstrip().endswith("better")  # lower hd95 is the better one
    assert "-3.0000" in _line(text, "hd95 ↓")
    assert "pooled dice" in text
    assert "lora.r (8 / 32)" in text
    assert "NOTE" not in text  # same image set


def test_compare_files(compared):
    _, out = compared
    md = (out / "compare.md").read_text()
    assert "## Config differences" in md and "| lora.r | 8 | 32 |" in md
    with (out / "compare.csv").open() as f:
        rows = {r["metric"]: r for r in csv.DictReader(f)}
    assert rows["dice"]["run-b-run-a:verdict"] == "better"
    assert float(rows["dice"]["run-b-run-a:diff"]) == pytest.approx(0.11)
    assert float(rows["dice"]["run-b-run-a:lo"]) > 0
    assert rows["specificity"]["run-b-run-a:verdict"] == "no significant difference"
    assert rows["betti0_error"]["run-b-run-a:verdict"] == "no significant difference"
    page = (out / "compare.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 2  # val Dice and loss, all runs overlaid
    assert '<span class="better">better</span>' in page and "lora.r" in page
    assert not re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, flags=re.I)


def test_compare_pairs_only_common_images(tmp_path, data_dir, runs):
    from medtune.reporting import compare_runs

    other = write_run(tmp_path, "run-c", data_dir, better=True, lora_r=32, test_ids=TEST_IDS[:6])
    text = compare_runs([runs[0], other])
    assert "paired over 6 common image(s)" in text
    assert "NOTE: The runs were evaluated on different image sets" in text
    assert _line(text, "dice").rstrip().endswith("better")


def test_compare_needs_eval(tmp_path, runs):
    from medtune.report.compare import compare_runs  # the mask comparison's own check (x holds no evaluation)

    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="medtune eval"):
        compare_runs([runs[0], tmp_path / "x"])
    with pytest.raises(ValueError, match="at least two"):
        compare_runs([runs[0]])


def test_compare_refuses_runs_evaluated_differently(tmp_path, data_dir, runs):
    """A flip-TTA baseline against a run evaluated without TTA: the difference would be partly the TTA."""
    from medtune.reporting import compare_runs

    tta = write_run(tmp_path, "run-tta", data_dir, better=False, lora_r=8, overrides=("eval.tta=true",))
    for at in ("cal", "t050"):
        with pytest.raises(ValueError, match=r"evaluated with different settings: eval\.tta \(run-tta=true, "
                                             r"run-b=false\).*--allow-eval-mismatch") as err:
            compare_runs([tta, runs[1]], at=at)
        assert "\n" not in str(err.value)
    text = compare_runs([tta, runs[1]], allow_eval_mismatch=True)
    assert "NOTE: The runs were evaluated with different settings (eval.tta (run-tta=true, run-b=false))" in text
    # tiling counts; the calibration strategy counts only at the calibrated threshold; CI resamples do not count
    tiled = write_run(tmp_path, "run-tiled", data_dir, better=False, lora_r=8, overrides=("eval.roi_size=64",))
    with pytest.raises(ValueError, match=r"eval\.roi_size"):
        compare_runs([tiled, runs[1]])
    recall = write_run(tmp_path, "run-recall", data_dir, better=False, lora_r=8, overrides=("eval.bootstrap=10",))
    summary = recall / "eval" / "test" / "summary.json"
    summary.write_text(summary.read_text().replace('"strategy": "max_dice"', '"strategy": "target_recall"'))
    with pytest.raises(ValueError, match=r"eval\.calibration \(run-recall=target_recall, run-b=max_dice\); "
                                         r"eval\.target_recall"):
        compare_runs([recall, runs[1]])
    assert "better" in _line(compare_runs([recall, runs[1]], at="t050"), "dice")


def test_config_differences_flatten():
    from medtune.report.compare import config_differences

    diffs = dict(config_differences([{"lora": {"r": 8}, "model": {"config": {"channels": [4, 8]}}, "a": 1},
                                     {"lora": {"r": 32}, "model": {"config": {"channels": [4, 8]}}}]))
    assert diffs == {"lora.r": [8, 32], "a": [1, "—"]}


# ---------------------------------------------------------------------------------------------------------------
# k-fold


def _samples(n: int, groups: list[str | None] | None = None) -> list[Sample]:
    groups = groups or [None] * n
    return [Sample(id=f"s{i:02d}", image=Path(f"s{i:02d}.png"), group=g) for i, g in enumerate(groups)]


def _split_cfg(**kw):
    return build_config({}, [f"data.split.{k}={v}" for k, v in kw.items()]).data.split


def test_kfold_partitions_and_respects_groups():
    from medtune.data.kfold import kfold_split

    groups = ["p0", "p0", "p0", "p1", "p1", None, None, "p2", "p2", None, "p3", None, None]
    samples = _samples(len(groups), groups)
    k = 4
    tested: list[str] = []
    for fold in range(k):
        split = kfold_split(samples, _split_cfg(folds=k, fold=fold, val_fraction=0.2), seed=7)
        assert split == kfold_split(samples, _split_cfg(folds=k, fold=fold, val_fraction=0.2), seed=7)
        ids = split["train"] + split["val"] + split["test"]
        assert sorted(ids) == sorted(s.id for s in samples)  # each fold: a partition of all samples
        assert split["test"] and split["train"] and split["val"]
        where = {i: name for name, members in split.items() for i in members}
        for g in ("p0", "p1", "p2", "p3"):
            assert len({where[s.id] for s in samples if s.group == g}) == 1, g
        tested += split["test"]
    assert sorted(tested) == sorted(s.id for s in samples)  # every sample tested exactly once
    sizes = [len(kfold_split(samples, _split_cfg(folds=k, fold=f), seed=7)["test"]) for f in range(k)]
    assert max(sizes) - min(sizes) <= 1  # 13 samples, largest group 3: balanced folds
    other = [kfold_split(samples, _split_cfg(folds=k, fold=f), seed=8)["test"] for f in range(k)]
    assert other != [kfold_split(samples, _split_cfg(folds=k, fold=f), seed=7)["test"] for f in range(k)]


def test_kfold_errors():
    from medtune.data.kfold import kfold_split

    samples = _samples(6, ["a", "a", "b", "b", "c", "c"])
    with pytest.raises(ValueError, match="needs at least 4 groups but the data has 3"):
        kfold_split(samples, _split_cfg(folds=4, fold=0), seed=0)
    with pytest.raises(ValueError, match="out of range"):
        kfold_split(samples, _split_cfg(folds=3, fold=3), seed=0)


def test_prepare_split_uses_kfold(tmp_path, data_dir):
    """The data layer routes data.split.folds to kfold_split (fold i tests a different set)."""
    pytest.importorskip("accelerate")
    from medtune.data.run_split import prepare_split

    tests = []
    for fold in range(2):
        cfg = build_config({}, ["data.layout=generic", f"data.path={data_dir}", "data.split.folds=2",
                                f"data.split.fold={fold}"])
        (tmp_path / str(fold)).mkdir()
        tests.append(prepare_split(cfg, tmp_path / str(fold)).split["test"])
    assert sorted(tests[0] + tests[1]) == sorted(f"images/img{i}" for i in range(N_DATA))


# ---------------------------------------------------------------------------------------------------------------
# cross-validation (bookkeeping around injected train / evaluate: training itself is tested elsewhere)


def test_run_cv(tmp_path):
    from medtune.report.cv import run_cv

    cfg = build_config({}, ["run.name=exp", f"run.output_dir={tmp_path}"])
    trained = []

    def fake_train(cfg_i):
        assert cfg_i.data.split.folds == 3 and cfg_i.run.name == f"exp-cv3-fold{cfg_i.data.split.fold}"
        run = Path(cfg_i.run.output_dir) / cfg_i.run.name
        run.mkdir()
        (run / "config.yaml").write_text(cfg_i.to_yaml())
        trained.append(cfg_i.data.split.fold)
        return run

    def fake_eval(run):
        fold = int(run.name[-1])
        summary = {"threshold": 0.4, "n_images": 5, "pooled@cal": {"dice": 0.7 + 0.1 * fold},
                   "per_image@cal": {"dice": {"mean": 0.6 + 0.1 * fold, "lo": 0.5, "hi": 0.8},
                                     "hd95": {"mean": None, "lo": None, "hi": None}}}
        (run / "eval" / "test").mkdir(parents=True)
        (run / "eval" / "test" / "summary.json").write_text(json.dumps(summary))
        return summary

    text = run_cv(cfg, 3, train_fn=fake_train, evaluate_fn=fake_eval)
    assert trained == [0, 1, 2]
    out = tmp_path / "exp-cv3"
    result = json.loads((out / "cv_summary.json").read_text())
    assert result["pooled@cal"]["dice"]["mean"] == pytest.approx(0.8)
    assert result["pooled@cal"]["dice"]["sd"] == pytest.approx(0.1)
    assert result["per_image@cal"]["dice"]["folds"] == pytest.approx([0.6, 0.7, 0.8])
    assert result["per_image@cal"]["hd95"]["mean"] is None
    assert "0.7000 ± 0.1000" in text and "exp-cv3-fold2" in text
    assert "| dice | 0.8000 ± 0.1000 | 0.7000 ± 0.1000 |" in (out / "cv.md").read_text()
    # a second invocation reuses the finished folds instead of retraining them
    trained.clear()
    assert run_cv(cfg, 3, train_fn=fake_train, evaluate_fn=fake_eval).splitlines()[:5] == text.splitlines()[:5]
    assert trained == []


def test_run_cv_refuses_rl_from_a_parent(tmp_path):
    """Every fold would copy the parent's split.json: k identical test sets reported as k folds."""
    from medtune.report.cv import run_cv

    cfg = build_config({}, ["objective=rl", "rl.init_from=runs/parent", f"run.output_dir={tmp_path}"])
    trained = []
    with pytest.raises(ValueError, match=r"rl\.init_from=runs/parent reuses that run's split in every fold") as err:
        run_cv(cfg, 3, train_fn=trained.append, evaluate_fn=trained.append)
    assert trained == [] and "\n" not in str(err.value)


def test_compare_warns_when_too_few_pairs(tmp_path, data_dir):
    from medtune.reporting import compare_runs

    a = write_run(tmp_path, "few-a", data_dir, better=False, lora_r=8, test_ids=TEST_IDS[:4])
    b = write_run(tmp_path, "few-b", data_dir, better=True, lora_r=8, test_ids=TEST_IDS[:4])
    cfg = b / "config.yaml"
    cfg.write_text(cfg.read_text().replace(str(data_dir), str(tmp_path / "elsewhere")))
    text = compare_runs([a, b])
    assert "Only 4 paired image(s)" in text
    assert "The runs read different data (data.path differ)" in text
    # +0.11 Dice on every image, but 4 pairs cannot be significant: the verdict must not claim otherwise
    assert _line(text, "dice").rstrip().endswith("no significant difference")
