"""`medtune demo`: the real use case in miniature, on embedded procedural data (no downloads, no user data).

1. a base U-Net is trained from scratch on site A (synthetic retina-like vessel images);
2. it is exported as a plain model folder, the way a user holds a pretrained model on disk;
3. on site B (other colour balance, contrast, noise, thinner vessels) the base is measured, then LoRA-fine-tuned,
   calibrated on B's validation split and measured again on B's test split: before/after Dice.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from medtune.config import build_config
from medtune.evaluate import evaluate_run, format_summary
from medtune.models.lora import export_merged
from medtune.models.registry import build_run_model
from medtune.runs.load import default_device, load_run_model
from medtune.tasks import task_for
from medtune.tasks.mask_eval import evaluate_model
from medtune.train.sft import train

# enough steps for the tiny model to learn the answer and the vessels on 2 CPU cores within the 3-minute budget
SEGVLM_DEMO_STEPS = 300


def _cfg(name: str, out: Path, domain: str, steps: int, extra: list[str]):
    return build_config({}, [
        f"run.name={name}", f"run.output_dir={out}", "run.seed=0",
        "data.layout=synthetic", f"data.path={out / 'data'}", f"data.synthetic.domain={domain}",
        "data.synthetic.n_images=24", "data.synthetic.size=128", "data.patch_size=64", "data.batch_size=8",
        "data.split.val_fraction=0.17", "data.split.test_fraction=0.25",
        f"optim.max_steps={steps}", f"train.eval_every={max(steps // 4, 1)}", f"train.save_every={steps}",
        "train.log_every=10", "eval.bootstrap=200", *extra,
    ])


def run_demo(out: Path, fast: bool = False) -> dict:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    base_steps, lora_steps = (40, 30) if fast else (400, 200)

    print(f"[1/4] base U-Net trained from scratch on site A ({base_steps} steps)")
    base_cfg = _cfg("base-siteA", out, "A", base_steps, ["optim.lr=3e-3", "optim.warmup_steps=20"])
    base_run = train(base_cfg)
    base_on_a = evaluate_run(base_run)

    print("[2/4] exporting the base as a plain model folder (what a user holds on disk)")
    base_model_dir = out / "base-model"
    _, base_model, _ = load_run_model(base_run, "best", "cpu")
    export_merged(base_model, base_model_dir)

    print("[3/4] LoRA fine-tuning the base on site B")
    lora_cfg = _cfg("lora-siteB", out, "B", lora_steps,
                    [f"model.path={base_model_dir}", "model.finetune=lora", "lora.preset=small",
                     "optim.lr=3e-3", "optim.warmup_steps=10"])
    lora_run = train(lora_cfg)

    print("[4/4] before / after on site B's test split (threshold calibrated on B's val split)")
    # Before = the same LoRA model with adapters at their initial zero update, i.e. exactly the base model,
    # measured by the same protocol on the same split.
    device = default_device()
    before_model = build_run_model(lora_cfg).to(device).eval()
    before, *_ = evaluate_model(before_model, task_for(lora_cfg), lora_cfg, lora_run, "test", device,
                                checkpoint_name="base (no LoRA)")
    after = evaluate_run(lora_run)
    print(format_summary(after))
    result = {
        "base_on_siteA_dice": base_on_a["pooled@cal"]["dice"],
        "base_on_siteB_dice": before["pooled@cal"]["dice"],
        "lora_on_siteB_dice": after["pooled@cal"]["dice"],
        "runs": {"base": str(base_run), "lora": str(lora_run)},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    print("\nmedtune demo: adapting a vessel model to a new site with LoRA (pooled Dice inside the FOV, test split)")
    print(f"  base model on site A (where it was trained): {result['base_on_siteA_dice']:.4f}")
    print(f"  base model on site B, before LoRA:           {result['base_on_siteB_dice']:.4f}")
    print(f"  after LoRA fine-tuning on site B:            {result['lora_on_siteB_dice']:.4f}")
    print(f"  runs: {base_run}  {lora_run}   ({result['seconds']} s)")
    return result


def run_segvlm_demo(out: Path, fast: bool = False) -> dict:
    """A tiny segmenting VLM (InternVL-style language model + SAM 2 decoder, random init, built from configs) learns
    the synthetic vessels from a text prompt: Dice before/after (teacher-forced "It is [SEG]."), then one freely
    generated answer with its mask file."""
    from medtune.predict import predict_images

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    steps = 40 if fast else SEGVLM_DEMO_STEPS
    cfg = build_config({}, [
        "run.name=segvlm", f"run.output_dir={out}", "run.seed=0",
        "data.layout=synthetic", f"data.path={out / 'data'}", "data.synthetic.domain=A",
        "data.synthetic.n_images=24", "data.synthetic.size=128", "data.sampling=whole_image", "data.patch_size=64",
        "data.batch_size=4", "data.split.val_fraction=0.17", "data.split.test_fraction=0.25",
        "model.family=segvlm", "model.config={preset: tiny, vlm: internvl}", "model.finetune=full",
        "task.class_name=blood vessel", "optim.lr=3e-3", "optim.warmup_steps=20", f"optim.max_steps={steps}",
        f"train.eval_every={max(steps // 4, 1)}", f"train.save_every={steps}", "train.log_every=20",
        "train.trackers=[]", "eval.bootstrap=200", "task.max_new_tokens=8",
    ])
    print(f"[1/3] a tiny segmenting VLM, random init, trained {steps} steps to answer "
          f"{cfg.task.prompt.format(class_name=cfg.task.class_name)!r} with {cfg.task.answer!r} + a mask")
    run = train(cfg)
    device = default_device()
    print("[2/3] before / after on the test split (teacher-forced prompt, threshold calibrated on val)")
    before_model = build_run_model(cfg).to(device).eval()  # the run's initial weights, before any step
    before, *_ = evaluate_model(before_model, task_for(cfg), cfg, run, "test", device,
                                checkpoint_name="initial weights")
    after = evaluate_run(run)
    print("[3/3] free generation on one test image")
    test_image = _first_test_image(run, cfg)
    predict_images(run, [test_image], out / "predict")
    answer = json.loads((out / "predict" / "predict.json").read_text())["answers"][str(test_image)]
    result = {
        "dice_before": before["pooled@cal"]["dice"], "dice_after": after["pooled@cal"]["dice"],
        "dice_after_free_generation": after["free_generation"]["pooled@cal"]["dice"],
        "generated_answer": answer, "mask_file": str(out / "predict" / f"{test_image.stem}_seg0_mask.png"),
        "no_seg_rate": after.get("generation", {}).get("no_seg_rate"), "run": str(run),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    print("\nmedtune demo segvlm: a segmenting VLM learns vessels from a text prompt (pooled Dice, test split)")
    print(f"  before training: {result['dice_before']:.4f}")
    print(f"  after training:  {result['dice_after']:.4f} (teacher-forced), "
          f"{result['dice_after_free_generation']:.4f} (free generation, as predict runs it)")
    print(f"  generated answer: {answer!r}  mask: {result['mask_file']}")
    print(f"  run: {run}   ({result['seconds']} s)")
    return result


def _first_test_image(run: Path, cfg) -> Path:
    from medtune.data.run_split import prepare_split

    data = prepare_split(cfg, run)
    return Path(data.samples[data.split["test"][0]].image)


# `medtune demo video`: synthetic angiography runs, a tiny SAM 2 video model, video training vs image-only training.
# 24 runs split 12 / 6 / 6: six test videos is the fewest on which a paired Wilcoxon test over videos can reach p < 0.05
# (with five, even five wins out of five give p = 0.0625); CIs are over videos, the independent unit.
VIDEO_DEMO = {"n_videos": 24, "n_frames": 24, "size": 64, "annotate_every": 4, "seed": 0}
VIDEO_DEMO_STEPS, VIDEO_DEMO_FAST_STEPS = 150, 20
VIDEO_DEMO_CLIP = 8  # frames per training clip of the video run
# Object pointers the demo model's memory attention reads: the conditioning frame's and the previous frame's, not SAM
# 2's 16. With 16 (32 pointer tokens next to 16-112 spatial memory tokens) the randomly initialised model's memory
# attention saturates onto the pointer tokens within 40 steps at the demo's lr: the spatial memories get a weight of
# exactly 0 and the memory encoder a gradient of exactly 0 (the dead-gradient watch names it), so the memory never
# learns what the vessels looked like (bench/RESULTS.md, "Video demo").
VIDEO_DEMO_POINTERS = 2
VIDEO_DEMO_BATCH = 4  # clips per step of the video run
# The image-only run sees as many annotated frames per step as the video run's clips hold (clip_length /
# annotate_every per clip), so the two differ in what the frames are trained as, not in how much supervision they get.
IMAGE_ONLY_BATCH_FACTOR = VIDEO_DEMO_CLIP // VIDEO_DEMO["annotate_every"]
VIDEO_DEMO_ROWS = [("dice", "per-frame Dice"), ("jf", "J&F"),
                   ("change_error", "change error |pred - true change|"),
                   ("flicker", "flicker (pred change per frame)"),
                   # on the dense test videos pred_change is the flicker; the true change is its reference
                   ("gt_change", "true change per frame")]
# what the paired tests compare (the true change is context: no better or worse)
VIDEO_DEMO_TESTED = ("dice", "jf", "change_error", "flicker")
VIDEO_DEMO_BOOTSTRAP = 1000  # resamples of the test videos for the CIs of the paired differences
VIDEO_DEMO_DENSE = "test-dense"  # the test videos with every frame annotated: RUN/eval/data-test-dense/


def _video_demo_cfg(name: str, out: Path, steps: int, clip_length: int, batch_size: int, extra: list[str]):
    return build_config({}, [
        f"run.name={name}", f"run.output_dir={out}", "run.seed=0",
        "data.layout=video_frames", f"data.path={out / 'data'}", "data.channels=1", "data.patch_size=64",
        f"data.batch_size={batch_size}", f"data.video.clip_length={clip_length}", "data.video.clips_per_video=4",
        "data.split.val_fraction=0.25", "data.split.test_fraction=0.25", "data.augment.enabled=false",
        "model.family=sam2_video", f"model.config={{preset: tiny, max_object_pointers_in_encoder: {VIDEO_DEMO_POINTERS}}}",
        "model.finetune=full",
        "optim.lr=3e-3", "optim.warmup_steps=10", f"optim.max_steps={steps}",
        f"train.eval_every={max(steps // 2, 1)}", f"train.save_every={steps}", "train.log_every=10",
        "train.trackers=[]", "eval.bootstrap=200", *extra,
    ])


def _dense_test_videos(out: Path, run: Path) -> Path:
    """The run's test videos again with every frame annotated (the generator knows the truth of every frame):
    per-frame Dice over all frames, and temporal stability on consecutive frames against the true change."""
    import shutil

    from medtune.data.layouts import VIDEO_FRAME_DIR, VIDEO_MASK_DIR
    from medtune.data.synthetic_video import write_synthetic_video_dataset

    dense = out / VIDEO_DEMO_DENSE
    shutil.rmtree(dense, ignore_errors=True)
    write_synthetic_video_dataset(dense, **{**VIDEO_DEMO, "annotate_every": 1})
    test = set(json.loads((run / "split.json").read_text())["test"])
    for folder in (VIDEO_FRAME_DIR, VIDEO_MASK_DIR):
        for video in (dense / folder).iterdir():
            if video.name not in test:
                shutil.rmtree(video)
    return dense


def run_video_demo(out: Path, fast: bool = False) -> dict:
    """A tiny SAM 2 video model (random init, built from a config) learns the vessels of synthetic angiography runs
    (contrast filling the tree, cardiac motion, noise, every 4th frame annotated) on clips through its memory, and
    the same model trained image-only (one-frame clips: nothing trains the memory, which stays as initialised and
    frozen) is the baseline. All are measured the same way: the test videos propagated whole, threshold calibrated
    on the (sparsely annotated) validation videos, scored on every frame of the test videos (the generator's
    truth): the initial weights, the video-trained model, the video-trained model with its memory off (every frame
    segmented alone: how much of what it does comes from the memory) and the image-only one. The differences are
    paired over the test videos, with CIs over videos and a Wilcoxon test (``medtune.stats.compare_metric``)."""
    from medtune.data.synthetic_video import write_synthetic_video_dataset
    from medtune.tasks.video import evaluate_model as evaluate_video_model

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    steps = VIDEO_DEMO_FAST_STEPS if fast else VIDEO_DEMO_STEPS
    write_synthetic_video_dataset(out / "data", **VIDEO_DEMO)
    batch = VIDEO_DEMO_BATCH
    video_cfg = _video_demo_cfg("video", out, steps, VIDEO_DEMO_CLIP, batch, [])
    image_cfg = _video_demo_cfg("image-only", out, steps, 1, batch * IMAGE_ONLY_BATCH_FACTOR, [
        "model.video.memory_attention=frozen", "model.video.memory_encoder=frozen",
        "model.video.object_pointers=frozen"])

    print(f"[1/3] {VIDEO_DEMO['n_videos']} synthetic angiography runs of {VIDEO_DEMO['n_frames']} frames, every "
          f"{VIDEO_DEMO['annotate_every']}th annotated; a tiny SAM 2 video model trained {steps} steps on "
          f"{VIDEO_DEMO_CLIP}-frame clips through its memory")
    video_run = train(video_cfg)
    dense = _dense_test_videos(out, video_run)
    device = default_device()
    summaries = {"initial": evaluate_video_model(
        build_run_model(video_cfg).to(device).eval(), video_cfg, video_run, "test", checkpoint_name="initial weights",
        data_file=dense, out_dir=video_run / "eval" / "initial-weights")}
    summaries["video"] = evaluate_run(video_run, data_file=dense)
    cfg, model, ckpt = load_run_model(video_run, "best", device)
    summaries["video_memory_off"] = evaluate_video_model(
        model, cfg, video_run, "test", checkpoint_name=f"{ckpt.name}, memory off", data_file=dense,
        out_dir=video_run / "eval" / "memory-off", memory=False)
    print(f"[2/3] the same model trained image-only ({steps} steps, every frame its own one-frame clip, "
          f"{IMAGE_ONLY_BATCH_FACTOR}x the batch: the same annotated frames per step)")
    image_run = train(image_cfg)
    summaries["image_only"] = evaluate_run(image_run, data_file=dense)
    print("[3/3] test videos propagated whole, every frame scored, threshold calibrated on the validation videos\n")
    print(format_summary(summaries["video"]))
    result = {name: {key: _ci_of(s["per_video@cal"][key]) for key, _ in VIDEO_DEMO_ROWS}
              for name, s in summaries.items()}
    rows = {"video": _per_video(video_run / "eval" / f"data-{VIDEO_DEMO_DENSE}"),
            "video_memory_off": _per_video(video_run / "eval" / "memory-off"),
            "image_only": _per_video(image_run / "eval" / f"data-{VIDEO_DEMO_DENSE}")}
    result["paired"] = {f"video - {other}": {key: _paired(rows["video"], rows[other], key) for key in VIDEO_DEMO_TESTED}
                        for other in ("image_only", "video_memory_off")}
    result.update(runs={"video": str(video_run), "image_only": str(image_run)},
                  n_test_videos=summaries["video"]["n_videos"], seconds=round(time.perf_counter() - started, 1))
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    _print_video_demo(result)
    return result


def _ci_of(block: dict) -> dict:
    return {k: block[k] for k in ("mean", "lo", "hi")}


def _per_video(eval_dir: Path) -> dict[str, dict]:
    import csv

    with open(eval_dir / "per_video.csv", newline="") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def _paired(a: dict[str, dict], b: dict[str, dict], key: str) -> dict:
    """a - b on ``key`` over the same test videos: the paired difference, its CI over videos, the Wilcoxon p and the
    verdict of ``medtune.stats.compare_metric`` (a difference only when both agree)."""
    from medtune.stats import LOWER_IS_BETTER, compare_metric

    ids = sorted(a)
    col = f"{key}@cal"
    res = compare_metric([float(a[i][col]) for i in ids], [float(b[i][col]) for i in ids],
                         higher_is_better=key not in LOWER_IS_BETTER, n_boot=VIDEO_DEMO_BOOTSTRAP)
    verdict = {"A better": "better", "B better": "worse"}.get(res["verdict"], "no significant difference")
    return {"diff": res["mean_diff"], "lo": res["lo"], "hi": res["hi"], "p": res["p_wilcoxon"], "verdict": verdict}


def _print_video_demo(result: dict) -> None:
    columns = (("initial", "initial"), ("video", "video"), ("video_memory_off", "video, memory off"),
               ("image_only", "image-only"))
    print(f"\nmedtune demo video: training through the memory vs image-only training of the same model "
          f"({result['n_test_videos']} test videos, every frame scored; mean over videos [95% CI over videos])")
    print(f"  {'':<38}" + "".join(f"{title:>21}" for _, title in columns))
    for key, label in VIDEO_DEMO_ROWS:
        cells = [result[name][key] for name, _ in columns]
        print(f"  {label:<38}" + "".join(f"{c['mean']:>7.3f} [{c['lo']:.3f},{c['hi']:.3f}]" for c in cells))
    for pair, tests in result["paired"].items():
        print(f"  {pair.replace('_', ' ')}, paired over the test videos:")
        for key in VIDEO_DEMO_TESTED:
            d = tests[key]
            print(f"    {dict(VIDEO_DEMO_ROWS)[key]:<36}{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]  "
                  f"Wilcoxon p {d['p']:.3f}: {d['verdict']}")
    print("  lower change error is steadier; flicker has no target of its own (the heart moves the vessels): a mask "
          "thicker than the vessels changes less per frame, so read it next to the true change")
    print(f"  runs: {result['runs']['video']}  {result['runs']['image_only']}   ({result['seconds']} s)")
