"""The segmenting VLM through the whole pipeline: task data (one [SEG] per referring expression), the recipes
(preflight, train, resume, RL), evaluation, predict with generated text, export -> reload. Tiny random models."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_logs_mfu
from PIL import Image

from medtune.config import build_config
from medtune.data.layouts import discover
from medtune.data.loading import load_sample
from medtune.data.types import DataError
from medtune.models.registry import build_model
from medtune.runs.files import read_metrics
from medtune.tasks import task_for
from medtune.tasks.segvlm import SegVLMDataset, collate, mask_targets


def segvlm_cfg(out: Path, name: str, steps: int = 6, extra: tuple[str, ...] = ()):
    return build_config({}, [
        f"run.name={name}", f"run.output_dir={out / 'runs'}", "run.seed=0",
        "data.layout=synthetic", f"data.path={out / 'data'}", "data.synthetic.n_images=10", "data.synthetic.size=48",
        "data.sampling=whole_image", "data.patch_size=48", "data.batch_size=2",
        "data.split.val_fraction=0.2", "data.split.test_fraction=0.2",
        "model.family=segvlm", "model.config={preset: tiny, vlm: internvl}", "model.finetune=lora", "lora.r=4",
        "task.class_name=blood vessel", "task.max_new_tokens=6", "optim.lr=1e-3", "optim.warmup_steps=1",
        f"optim.max_steps={steps}", "train.eval_every=3", "train.save_every=3", "train.keep_last=5",
        "train.log_every=1", "train.trackers=[]", "eval.bootstrap=20", *extra,
    ])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from medtune.train import train

    out = tmp_path_factory.mktemp("segvlm")
    cfg = segvlm_cfg(out, "sv")
    return out, cfg, train(cfg)


def test_training_passes_the_preflight_and_validates_by_dice(trained):
    _, _, run = trained
    preflight = json.loads((run / "preflight.json").read_text())
    assert preflight["passed"] and preflight["n_trainable"] > 0
    records = read_metrics(run)
    assert [r["step"] for r in records if "val_dice" in r] == [3, 6]
    assert all("loss_lm" in r for r in records if "loss" in r)  # the LM term is trained and logged
    assert (run / "checkpoints" / "best" / "adapter" / "adapter_model.safetensors").is_file()
    assert_logs_mfu(run)


def test_a_loaded_run_is_the_trained_model_including_the_weights_it_did_not_save(trained):
    """LoRA on a preset built from a config: the checkpoint holds the adapters, not the random frozen base, which
    every load builds again. Built under the run's seed in training and in every load (whatever the caller drew from
    the RNG before), the loaded model reproduces the validation metrics training logged for that checkpoint (AUC:
    threshold-free, so any change of the masks shows)."""
    from medtune.data.run_split import load_split_samples, prepare_split
    from medtune.runs.load import load_run_model
    from medtune.tasks import task_for

    _, cfg, run = trained
    logged = {r["step"]: r for r in read_metrics(run) if "val_dice" in r}
    torch.manual_seed(1234)
    torch.rand(1000)  # the caller's RNG state must not matter
    cfg, model, ckpt = load_run_model(run, "last", "cpu")
    step = json.loads((ckpt / "meta.json").read_text())["step"]
    val = load_split_samples(cfg, prepare_split(cfg, run), "val", run)
    again = task_for(cfg).validate(model, val, cfg, "cpu")
    for key in ("val_dice", "val_auc"):
        assert again[key] == pytest.approx(logged[step][key], abs=1e-6), key


@pytest.mark.parametrize("vlm", ["qwen2_5_vl"])
def test_medtune_train_of_a_qwen_vl_segmenting_vlm(vlm, tmp_path):
    """The segmenting VLM is the plain VLM + the mask head: a tiny Qwen2.5-VL (dynamic resolution, per-image
    ``image_grid_thw``, multimodal RoPE) trains through `medtune train`, its preflight passing."""
    from medtune.cli import main

    cfg = segvlm_cfg(tmp_path, "qwen", steps=2, extra=(f"model.config={{preset: tiny, vlm: {vlm}}}",
                                                       "train.eval_every=2", "train.save_every=2"))
    config = tmp_path / "qwen.yaml"
    config.write_text(cfg.to_yaml())
    assert main(["train", str(config)]) == 0
    run = tmp_path / "runs" / "qwen"
    assert json.loads((run / "preflight.json").read_text())["passed"]
    records = read_metrics(run)
    assert len([r for r in records if "loss" in r]) == 2 and all("loss_lm" in r for r in records if "loss" in r)
    assert [r["step"] for r in records if "val_dice" in r] == [2]


def test_training_never_calls_generate(tmp_path, monkeypatch):
    """Training through generate() (no_grad) is how LISA/Sa2VA fine-tunes learned nothing: make it impossible."""
    from transformers.generation.utils import GenerationMixin

    from medtune.train import train

    def refuse(*args, **kwargs):
        raise AssertionError("generate() called during training")

    monkeypatch.setattr(GenerationMixin, "generate", refuse)
    run = train(segvlm_cfg(tmp_path, "no-generate", steps=3))
    assert json.loads((run / "preflight.json").read_text())["passed"]


def test_mask_path_alone_trains_every_language_model_lora_tensor(tmp_path):
    """lambda = 0: the preflight proves every LoRA tensor of the LM receives gradient through [SEG] -> mask."""
    from medtune.train import train

    run = train(segvlm_cfg(tmp_path, "lm0", steps=1, extra=("task.lm_weight=0",)))
    report = json.loads((run / "preflight.json").read_text())
    assert report["passed"]
    model = build_model(segvlm_cfg(tmp_path, "lm0", extra=("task.lm_weight=0",)))
    lm_lora = [n for n, p in model.named_parameters() if "language_model" in n and "lora_" in n and p.requires_grad]
    assert lm_lora and report["n_trainable"] >= len(lm_lora)


def test_resume_gives_the_uninterrupted_weights(trained, tmp_path):
    from safetensors.torch import load_file

    from medtune.train import train

    out, cfg, full = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "last")
    shutil.copytree(full / "checkpoints" / "step-3", resumed / "checkpoints" / "last")
    train(cfg, resume=resumed)
    a = load_file(str(full / "checkpoints" / "last" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "last" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_predict_export(trained, tmp_path):
    from medtune.evaluate import evaluate_run, format_summary
    from medtune.models.lora import export_merged
    from medtune.predict import predict_images
    from medtune.report.compare import compare_runs
    from medtune.report.html import write_report
    from medtune.runs.load import load_run_model

    out, cfg, run = trained
    summary = evaluate_run(run)
    test_ids = json.loads((run / "split.json").read_text())["test"]
    assert summary["n_images"] == len(test_ids) and 0.0 <= summary["pooled@cal"]["dice"] <= 1.0
    assert 0.0 <= summary["generation"]["no_seg_rate"] <= 1.0 and summary["generation"]["n"] == len(test_ids)
    # free generation measured like teacher forcing: same blocks, CIs, the same (teacher-forced val) threshold
    free = summary["free_generation"]
    assert free["n_images"] == len(test_ids) and free["threshold"] == summary["threshold"]
    for block in ("pooled@t050", "pooled@cal"):
        assert 0.0 <= free[block]["dice"] <= 1.0
    for block in ("per_image@t050", "per_image@cal"):
        ci = free[block]["dice"]
        assert ci["lo"] <= ci["mean"] <= ci["hi"]
    with open(run / "eval" / "test" / "per_image_free_generation.csv", newline="") as f:
        free_rows = list(csv.DictReader(f))
    assert sorted(r["id"] for r in free_rows) == sorted(test_ids)
    assert all(int(r["n_seg"]) == r["answer"].count("[SEG]") for r in free_rows)
    text = format_summary(summary)
    assert "teacher-forced" in text and "free generation (what predict does" in text
    assert text.count("per-image dice") == 4  # two thresholds x (teacher-forced, free generation)
    report = write_report(run).read_text()
    assert "Free generation" in report and "Metrics on test" in report
    compared = compare_runs([run, run])  # teacher-forced rows as before, plus free generation's Dice
    assert "dice (free generation)" in compared and "pooled dice" in compared

    # predict: a generated answer for each image, one mask per [SEG] it holds, answers without [SEG] reported
    image = discover(cfg.data)[0].image
    predict_images(run, [image], tmp_path / "pred", prompt="Please segment the blood vessel in this image.")
    info = json.loads((tmp_path / "pred" / "predict.json").read_text())
    answer = info["answers"][str(image)]
    assert (tmp_path / "pred" / f"{Path(image).stem}_answer.txt").read_text().strip() == answer.strip()
    n_seg = answer.count("[SEG]")
    assert len(list((tmp_path / "pred").glob("*_mask.png"))) == n_seg
    assert (str(image) in info["answers_without_seg"]) == (n_seg == 0)
    # several prompts: one turn each, the masks of each turn listed with it
    two = ["Please segment the blood vessel in this image.", "Please segment the optic disc in this image."]
    predict_images(run, [image], tmp_path / "pred2", prompt=two)
    turns = json.loads((tmp_path / "pred2" / "predict.json").read_text())["turns"][str(image)]
    assert [t["question"] for t in turns] == two
    assert [len(t["masks"]) for t in turns] == [t["answer"].count("[SEG]") for t in turns]
    assert len(list((tmp_path / "pred2").glob("*_mask.png"))) == sum(len(t["masks"]) for t in turns)

    # export: the merged, composed folder loads back through model.path and gives the same masks
    _, model, _ = load_run_model(run, "best", "cpu")
    export_merged(model, tmp_path / "merged")
    merged_cfg = build_config(cfg.model_dump(mode="json"), [f"model.path={tmp_path / 'merged'}", "model.config={}",
                                                            "model.finetune=lora"])
    merged = build_model(merged_cfg).eval()
    x = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    question, answer = "Please segment the blood vessel in this image.", "It is [SEG]."
    with torch.no_grad():
        adapted_masks = model.teacher_forced_masks(x, question, answer)
        with merged.adapters_disabled():
            merged_masks = merged.teacher_forced_masks(x, question, answer)
    assert adapted_masks.shape == (1, 48, 48)
    assert torch.allclose(adapted_masks, merged_masks, atol=1e-4)


def _scripted_generation(model, answer: str):
    """Patch the VLM's generate() to answer every turn with ``answer`` (then the end-of-turn token)."""
    from unittest import mock

    codec = model.text_codec()
    ids = codec.tokenizer(answer, add_special_tokens=False)["input_ids"] + [codec.end_of_turn_id]

    def generate(input_ids, **kwargs):
        return torch.cat([input_ids, torch.tensor([ids], device=input_ids.device)], dim=1)

    return mock.patch.object(type(model.base_network.vlm), "generate", side_effect=generate)


def test_free_generation_scores_an_answer_without_seg_as_an_empty_mask(trained):
    """A model that never says [SEG] segments nothing in use: free-generation Dice 0 for every target, while the
    teacher-forced masks of the same model score > 0. And a model that answers as trained gets exactly the
    teacher-forced numbers (the generated conversation is the training one)."""
    from medtune.runs.load import load_run_model
    from medtune.tasks import task_for
    from medtune.tasks.mask_eval import evaluate_model

    _, cfg, run = trained
    _, model, _ = load_run_model(run, "best", "cpu")
    with _scripted_generation(model, "There is no object."):
        summary, rows, _, _, free_rows = evaluate_model(model, task_for(cfg), cfg, run, "test", "cpu")
    free = summary["free_generation"]
    assert summary["pooled@cal"]["dice"] > 0 and summary["per_image@cal"]["dice"]["mean"] > 0
    assert free["pooled@cal"]["dice"] == 0 and free["pooled@t050"]["dice"] == 0
    assert free["per_image@cal"]["dice"]["mean"] == free["per_image@cal"]["dice"]["hi"] == 0
    assert all(r["n_seg"] == 0 and r["dice@cal"] == 0 and r["recall@cal"] == 0 for r in free_rows)
    assert summary["generation"]["no_seg_rate"] == summary["generation"]["answers_without_seg_rate"] == 1.0

    with _scripted_generation(model, cfg.task.answer):
        summary, rows, _, _, free_rows = evaluate_model(model, task_for(cfg), cfg, run, "test", "cpu")
    assert summary["generation"]["wrong_seg_count_rate"] == 0.0
    assert [r["id"] for r in free_rows] == [r["id"] for r in rows]
    for teacher, free in zip(rows, free_rows):
        assert free["dice@cal"] == pytest.approx(teacher["dice@cal"], abs=1e-6)
        assert free["auc@cal"] == pytest.approx(teacher["auc@cal"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.ci
def test_rl_recipe_runs_on_segvlm_and_reaches_the_language_model(trained):
    """The mask RL recipe unchanged: policy over the decoded mask, KL to the adapters-disabled model; its preflight
    proves the policy gradient reaches the language model's LoRA through [SEG]."""
    from medtune.train import train

    out, _, parent = trained
    cfg = segvlm_cfg(out, "sv-rl", steps=2, extra=("objective=rl", f"rl.init_from={parent}", "rl.group_size=4",
                                                  "train.eval_every=2", "train.save_every=2"))
    run = train(cfg)
    report = json.loads((run / "preflight.json").read_text())
    assert report["passed"]
    assert_logs_mfu(run)
    model = build_model(json_cfg(run))
    lm_lora = [n for n, p in model.named_parameters() if "language_model" in n and "lora_" in n and p.requires_grad]
    assert lm_lora  # the fresh RL adapter sits in the language model, and the preflight saw all of it move
    assert [r for r in read_metrics(run) if "val_reward" in r]


def json_cfg(run: Path):
    from medtune.runs.files import load_run_config

    return load_run_config(run)


# ---------------------------------------------------------------------------------------------- task data
def _two_expression_data(root: Path) -> Path:
    root.mkdir(parents=True)
    img = np.zeros((48, 48, 3), dtype=np.uint8)
    img[4:20, 4:20] = 200
    img[28:44, 28:44] = 120
    Image.fromarray(img).save(root / "a.png")
    left, right = [[4, 4, 20, 4, 20, 20, 4, 20]], [[28, 28, 44, 28, 44, 44, 28, 44]]
    (root / "annotations.json").write_text(json.dumps(
        [{"image": "a.png", "mask": [left, right], "text": ["the bright square", "the dim square"]}]))
    return root


def _two_expression_cfg(root: Path):
    return build_config({}, [f"data.path={root}", "data.patch_size=48", "data.augment.enabled=false",
                             "model.family=segvlm", "model.config={preset: tiny, vlm: internvl}", "lora.r=4",
                             "model.finetune=lora"])


def test_two_expressions_give_two_targets_and_two_seg_tokens(tmp_path):
    root = _two_expression_data(tmp_path / "data")
    cfg = _two_expression_cfg(root)
    model = build_model(cfg)
    loaded = [load_sample(s, cfg.data) for s in discover(cfg.data)]
    item = SegVLMDataset(loaded, cfg, model.text_codec(), model.image_prep, model.seg_token_id)[(0, 0)]
    assert item["mask"].shape == (2, 48, 48)  # two targets, not one union
    assert int((item["input_ids"] == model.seg_token_id).sum()) == 2
    assert item["mask"][0, 10, 10] == 1 and item["mask"][0, 35, 35] == 0 and item["mask"][1, 35, 35] == 1
    batch = collate([item, item])
    out = model(batch=batch)
    logits, target, fov = mask_targets(out, batch)
    assert logits.shape == target.shape == fov.shape == (4, 1, 48, 48)
    loss, parts = task_for(cfg).make_loss(cfg)(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and "lm" in parts
    preds = task_for(cfg).target_probabilities(model, loaded[0], cfg, "cpu")
    assert [p.id for p in preds] == ["a#0", "a#1"] and preds[1].mask[35, 35] == 1

    # a batch whose [SEG] count differs from its target count stops, naming the sample
    broken = dict(batch, target_valid=batch["target_valid"].clone())
    broken["target_valid"][1, 1] = False
    with pytest.raises(ValueError, match=r"sample a: 2 \[SEG\] token\(s\) .* but 1 target"):
        mask_targets(out, broken)


def test_each_expression_is_its_own_question_without_a_doubled_article():
    from medtune.tasks.segvlm import conversation

    cfg = build_config({}, ["model.family=segvlm", "task.class_name=blood vessel"])
    questions, answers = conversation(["the larger lesion", "The smaller lesion.", "an opacity", "left kidney", None],
                                      cfg)
    assert questions == ["Please segment the larger lesion in this image.",
                         "Please segment The smaller lesion in this image.",
                         "Please segment an opacity in this image.",
                         "Please segment the left kidney in this image.",
                         "Please segment the blood vessel in this image."]
    assert answers == ["It is [SEG]."] * 5
    # a prompt without an article before the name keeps the expression's own
    bare = build_config({}, ["model.family=segvlm", "task.prompt=Where is {class_name}?"])
    assert conversation(["the cyst"], bare)[0] == ["Where is the cyst?"]
    # "theca" is no article
    assert conversation(["theca cells"], cfg)[0] == ["Please segment the theca cells in this image."]


def _left_right_data(root: Path, n: int, size: int) -> Path:
    """Images with a blob in each half on a textured background (all in the FOV), annotated "the left blob" and
    "the right blob", in alternating order: the turn position alone does not tell which blob is meant."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    entries = []
    for i in range(n):
        img = rng.integers(40, 80, (size, size, 3)).astype(np.uint8)
        polygons = []
        for half in (0, 1):
            w = int(rng.integers(size // 5, size // 3))
            y = int(rng.integers(0, size - w))
            x = int(rng.integers(0, size // 2 - w)) + half * (size // 2)
            img[y:y + w, x:x + w] = 200
            polygons.append([[x, y, x + w, y, x + w, y + w, x, y + w]])
        texts = ["the left blob", "the right blob"]
        if i % 2:
            polygons, texts = polygons[::-1], texts[::-1]
        Image.fromarray(img).save(root / f"b{i}.png")
        entries.append({"image": f"b{i}.png", "mask": polygons, "text": texts})
    (root / "annotations.json").write_text(json.dumps(entries))
    return root


OVERFIT_STEPS = 200
OVERFIT_LR = 3e-3  # 1e-2 separates the masks and then diverges back to one union mask on some seeds


@pytest.mark.slow
@pytest.mark.ci
def test_two_expressions_learn_two_different_masks(tmp_path):
    """Each expression in its own turn: a tiny model overfit on two-blob images segments the left blob for "the
    left blob" and the right one for "the right blob", through the task's own dataset, collate, loss and
    evaluation path.

    The language model is frozen (LoRA and the [SEG] row left out of the optimiser; projection and SAM's decoder
    train): trained from random init at this learning rate, the tiny LM collapses both [SEG] states onto one
    direction (cosine 1 - 1e-5) within ~25 steps, before the decoder has learnt to read them, whatever the
    conversation format. SAM rather than the tiny SAM 2, whose random decoder barely responds to its prompt within
    this budget."""
    size = 32
    root = _left_right_data(tmp_path / "data", 4, size)
    cfg = build_config({}, [f"data.path={root}", f"data.patch_size={size}", "data.augment.enabled=false",
                            "run.seed=0", "model.family=segvlm", "model.config={preset: tiny, vlm: internvl, sam: sam}",
                            "model.finetune=lora", "lora.r=4", "task.lm_weight=0"])
    torch.manual_seed(0)
    model = build_model(cfg)
    task = task_for(cfg)
    loaded = [load_sample(s, cfg.data) for s in discover(cfg.data)]
    dataset = SegVLMDataset(loaded, cfg, model.text_codec(), model.image_prep, model.seg_token_id)
    loss_fn = task.make_loss(cfg)
    params = [p for n, p in model.named_parameters() if p.requires_grad and ".vlm." not in n]
    assert params and len(params) < sum(p.requires_grad for p in model.parameters())
    optimiser = torch.optim.AdamW(params, lr=OVERFIT_LR)
    batch = collate([dataset[(i, 0)] for i in range(len(dataset))])
    model.train()
    for _ in range(OVERFIT_STEPS):
        loss, _ = loss_fn(model, batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)

    for sample in loaded:
        first, second = task.target_probabilities(model, sample, cfg, "cpu")
        m1, m2 = first.prob > 0.5, second.prob > 0.5
        g1, g2 = first.mask > 0, second.mask > 0
        assert dice(m1, m2) < 0.3, sample.id  # two masks, not one twice
        assert dice(m1, g1) > dice(m1, g2) + 0.4 and dice(m2, g2) > dice(m2, g1) + 0.4, sample.id


def test_answer_without_seg_is_one_clear_line(tmp_path):
    root = _two_expression_data(tmp_path / "data")
    cfg = build_config({}, [f"data.path={root}", "model.family=segvlm", "model.config={preset: tiny}",
                            "model.finetune=lora", "task.answer=It is here."])
    model = build_model(cfg)
    loaded = [load_sample(s, cfg.data) for s in discover(cfg.data)]
    with pytest.raises(DataError, match=r"sample a: the target answer .* holds 0 \[SEG\] token\(s\) for 2 target"):
        SegVLMDataset(loaded, cfg, model.text_codec(), model.image_prep, model.seg_token_id)


def test_segvlm_loss_defaults_are_recorded_in_the_resolved_config():
    import yaml

    cfg = build_config({}, ["model.family=segvlm"])
    assert (cfg.loss.bce, cfg.loss.dice, cfg.loss.focal) == (2.0, 0.5, 0.0)  # Sa2VA / LISA
    assert build_config(yaml.safe_load(cfg.to_yaml())).loss == cfg.loss  # a resumed run trains the same loss
    assert build_config({}, ["model.family=segvlm", "loss.dice=1"]).loss.bce == 0.5  # an explicit loss is kept


@pytest.mark.slow
@pytest.mark.ci
def test_segvlm_demo_fast_mode_runs_end_to_end(tmp_path):
    from medtune.demo import run_segvlm_demo

    result = run_segvlm_demo(tmp_path / "demo", fast=True)
    assert 0.0 <= result["dice_before"] <= 1.0 and 0.0 <= result["dice_after"] <= 1.0
    assert isinstance(result["generated_answer"], str)
    assert (tmp_path / "demo" / "demo_result.json").is_file()


@pytest.mark.slow
@pytest.mark.ci
def test_rl_from_a_parent_composed_from_folders_with_an_untied_head(tmp_path):
    """A real-data parent is composed from vlm_path + sam_path (here LLaVA-style, untied lm_head): RL adopts the
    exported reference, the parent's task (its prompt) and loss, and its preflight passes (no LM term in RL, so the
    untied [SEG] output row is not trained)."""
    from medtune.models.vlm.seg.tiny import save_tiny_parts
    from medtune.runs.files import load_run_config
    from medtune.train import train

    vlm_path, sam_path = save_tiny_parts(tmp_path / "parts", vlm="llava", sam="sam2", tie_word_embeddings=False)
    parts = ("model.config={}", f"model.vlm.vlm_path={vlm_path}", f"model.vlm.sam_path={sam_path}")
    parent = train(segvlm_cfg(tmp_path, "parent", steps=2, extra=parts + ("train.eval_every=2",)))
    rl_cfg = build_config({}, [
        "objective=rl", "run.name=rl", f"run.output_dir={tmp_path / 'runs'}", f"rl.init_from={parent}",
        "rl.group_size=2", "optim.max_steps=1", "train.eval_every=1", "train.trackers=[]", "lora.r=4"])
    run = train(rl_cfg)
    adopted = load_run_config(run)
    assert adopted.task.class_name == "blood vessel" and adopted.loss.bce == 2.0
    assert adopted.model.vlm.vlm_path is None and adopted.model.path.endswith("reference-model")
    assert json.loads((run / "preflight.json").read_text())["passed"]


def test_the_training_dataset_decodes_no_image_when_built(tmp_path):
    """Targets are counted from the annotations (Sample.targets), not from decoded masks; each item decodes once."""
    from medtune.data.loading import LazySamples

    root = _two_expression_data(tmp_path / "data")
    cfg = _two_expression_cfg(root)
    model = build_model(cfg)
    lazy = LazySamples(discover(cfg.data), cfg.data)
    dataset = SegVLMDataset(lazy, cfg, model.text_codec(), model.image_prep, model.seg_token_id)
    assert lazy.decodes == 0
    eager = SegVLMDataset([load_sample(s, cfg.data) for s in discover(cfg.data)], cfg, model.text_codec(),
                          model.image_prep, model.seg_token_id)
    a, b = dataset[(0, 0)], eager[(0, 0)]
    assert lazy.decodes == 1 and a["mask"].shape == (2, 48, 48)
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
    bad = build_config({}, [f"data.path={root}", "model.family=segvlm", "model.config={preset: tiny}",
                            "model.finetune=lora", "task.answer=It is here."])
    with pytest.raises(DataError, match=r"sample a: .* holds 0 \[SEG\] token\(s\) for 2 target"):
        SegVLMDataset(LazySamples(discover(bad.data), bad.data), bad, model.text_codec(), model.image_prep,
                      model.seg_token_id)
