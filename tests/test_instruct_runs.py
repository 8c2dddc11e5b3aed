"""Instruction tuning end to end, from the shipped configs, on tiny LLaVA and tiny InternVL (CPU, seconds):
preflight, training, exact resume, generation-based eval, report, compare, export parity, predict, GRPO, and the
bad-input lines of `medtune train`."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import REPO, assert_logs_mfu
from vlm_helpers import write_vqa

from medtune.cli import main
from medtune.config import load_config
from medtune.models.vlm.logits import ALL_POSITIONS, LOGITS_AT
from medtune.runs.files import read_metrics
from medtune.train import train

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

KINDS = ("llava", "internvl")
FULL_STEPS = 30  # enough for the tiny model trained fully from its config to answer bright/dark right, any seed
LORA_STEPS = 8


def full_cfg(root, kind, *overrides, name=None):
    """The shipped config as is: the tiny VLM built from model.config and trained fully."""
    return load_config(REPO / "configs" / f"vlm_{kind}_tiny.yaml", [
        f"run.name={name or kind}", f"run.output_dir={root / 'runs'}", f"data.path={root / 'data' / 'train.json'}",
        f"optim.max_steps={FULL_STEPS}", "optim.lr=0.01", "optim.warmup_steps=3", "train.eval_every=15",
        "train.save_every=15", "train.keep_last=5", "train.log_every=1", "train.trackers=[]", "eval.bootstrap=100",
        "task.max_new_tokens=4", *overrides,
    ])


def sft_cfg(root, kind, *overrides, name=None):
    """The shipped config with model.path = a saved tiny VLM: LoRA on its language model, projector trained."""
    return full_cfg(root, kind, f"model.path={root / f'base-{kind}'}", "model.config={}",
                    f"optim.max_steps={LORA_STEPS}", "optim.lr=0.02", "train.eval_every=4", "train.save_every=4",
                    *overrides, name=name or f"{kind}-lora")


def grpo_cfg(root, parent, *overrides, name="grpo"):
    return load_config(REPO / "configs" / "vlm_grpo.yaml", [
        f"run.name={name}", f"run.output_dir={root / 'runs'}", f"rl.init_from={parent}", "optim.max_steps=4",
        "optim.warmup_steps=1", "train.eval_every=4", "train.save_every=2", "train.keep_last=5", "train.log_every=1",
        "train.trackers=[]", "rl.group_size=4", "lora.r=4", *overrides,
    ])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per tiny VLM, from the shipped configs, on bright (benign) / dark (malignant) images: a full fine-tuning run
    from the model's config (it learns the task) and a LoRA run on a saved base (the usual user set-up)."""
    from medtune.models.vlm.tiny import save_tiny_vlm

    root = tmp_path_factory.mktemp("instruct-runs")
    write_vqa(root / "data", n=12)
    out = {"root": root}
    for kind in KINDS:
        save_tiny_vlm(root / f"base-{kind}", kind, seed=0)
        out[kind] = train(full_cfg(root, kind))
        out[f"{kind}-lora"] = train(sft_cfg(root, kind))
    return out


def _swap_in_checkpoint(run, step, name):
    copy = run.parent / name
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "last")
    shutil.copytree(run / "checkpoints" / f"step-{step}", copy / "checkpoints" / "last")
    return copy


@pytest.mark.parametrize("kind", KINDS)
def test_supervised_runs_preflight_learning_and_exact_resume(runs, kind):
    run, lora = runs[kind], runs[f"{kind}-lora"]
    assert json.loads((run / "preflight.json").read_text())["passed"]
    pre = json.loads((lora / "preflight.json").read_text())
    assert pre["passed"] and pre["zero_grad_first_step"] and all("lora_A" in n for n in pre["zero_grad_first_step"])
    assert (lora / "checkpoints" / "best" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / "best" / "model" / "model.safetensors").is_file()
    assert_logs_mfu(run)
    records = read_metrics(run)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == FULL_STEPS and losses[-1] < 0.2 * losses[0]
    val = [r for r in records if "val_accuracy" in r]
    # the generation-based validation sees the learning: right answers, all of them parsed
    assert len(val) == 2 and val[-1]["val_accuracy"] == 1.0 and val[-1]["val_invalid_rate"] == 0.0
    assert val[-1]["val_lm_loss"] < val[0]["val_lm_loss"]

    resumed = _swap_in_checkpoint(run, 15, f"{kind}-resumed")
    train(load_config(resumed / "config.yaml"), resume=resumed)
    keys = ("loss", "grad_norm")
    expected = [r[k] for r in records if "loss" in r for k in keys]
    got = [r[k] for r in read_metrics(resumed) if "loss" in r for k in keys]
    assert [r["step"] for r in read_metrics(resumed) if "loss" in r] == list(range(1, FULL_STEPS + 1))
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_eval_report_export_parity_and_predict(runs, kind, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    from medtune.models.vlm.model import collate
    from medtune.models.vlm.processing import load_processor, to_pil
    from medtune.runs.load import load_run_model

    run = runs[f"{kind}-lora"]
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "majority class" in out and "confusion" in out
    summary = json.loads((run / "eval" / "test" / "summary.json").read_text())
    split = json.loads((run / "split.json").read_text())
    assert summary["task"] == "instruct" and summary["n_samples"] == len(split["test"])
    assert summary["classification"]["labels"] == ["benign", "malignant"]
    answers = (run / "eval" / "test" / "answers.csv").read_text()
    assert answers.startswith("id,question,reference,answer,reference_label,answer_label,correct")
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert "Confusion matrix" in html and "majority class" in html and "PASSED" in html

    # export: a standalone folder that plain from_pretrained loads and that answers like the adapter does
    merged_dir = tmp_path / "merged"
    assert main(["export", str(run), "--out", str(merged_dir)]) == 0
    cfg, model, _ = load_run_model(run, "best", "cpu")
    assert model.is_peft
    merged = AutoModelForImageTextToText.from_pretrained(str(merged_dir)).eval()
    processor = load_processor(merged_dir, cfg)
    if kind == "llava":  # InternVL's own processor needs torchvision (absent here); load_processor stands in
        from transformers import AutoProcessor

        assert type(AutoProcessor.from_pretrained(str(merged_dir))).__name__ == "LlavaProcessor"
    from medtune.data.layouts import discover
    from medtune.data.loading import load_all

    samples = load_all([s for s in discover(cfg.data) if s.id in split["test"] + split["val"]], cfg.data)
    items = [model.codec.encode(s.conversations, to_pil(s.image), s.id, for_generation=True) for s in samples]
    prompts = collate(items, "left")
    from medtune.models.vlm.model import ChatCodec

    merged_codec = ChatCodec(processor)
    merged_prompts = collate([merged_codec.encode(s.conversations, to_pil(s.image), s.id, for_generation=True)
                              for s in samples], "left")
    assert torch.equal(merged_prompts["input_ids"], prompts["input_ids"])
    with torch.no_grad():
        adapter_logits = model(batch={**prompts, LOGITS_AT: ALL_POSITIONS}).token_logits
        merged_logits = merged(**model.model_inputs(prompts)).logits
        assert torch.allclose(adapter_logits, merged_logits, atol=1e-4)
        adapter_answers = model.generate(prompts, 4)
        merged_answers = merged.generate(**model.model_inputs(prompts), max_new_tokens=4, do_sample=False,
                                         eos_token_id=merged_codec.stop_ids, pad_token_id=merged_codec.pad_token_id)
    assert torch.equal(adapter_answers, merged_answers[:, prompts["input_ids"].shape[1]:])

    image = run.parents[1] / "data" / "images" / "case0.png"
    assert main(["predict", str(run), str(image), "--question", "Is the lesion benign or malignant?",
                 "--out", str(tmp_path / "pred")]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "pred" / "answers.json").read_text())["answers"]
    assert saved[0]["image"] == str(image) and saved[0]["answer"] in printed
    assert saved[0]["label"] in ("benign", "malignant", "invalid answer")  # labels from the earlier eval


@pytest.mark.parametrize("kind", KINDS)
def test_grpo_from_the_supervised_run_and_compare(runs, kind, capsys):
    from medtune.evaluate import evaluate_run

    parent = runs[kind]
    run = train(grpo_cfg(runs["root"], parent, name=f"grpo-{kind}"))
    assert json.loads((run / "parent.json").read_text())["parent_run"] == str(parent)
    assert json.loads((run / "split.json").read_text()) == json.loads((parent / "split.json").read_text())
    assert json.loads((run / "preflight.json").read_text())["passed"]
    assert_logs_mfu(run)
    records = [r for r in read_metrics(run) if "reward_mean" in r]
    assert len(records) == 4
    assert {"kl", "clip_fraction", "reward_correct", "reward_format", "answers_finished"} <= set(records[0])
    cfg = load_config(run / "config.yaml")
    assert cfg.task.labels == ["benign", "malignant"] and cfg.model.path.endswith("reference-model")
    summary = evaluate_run(run)
    assert summary["task"] == "instruct"
    if not (parent / "eval" / "test" / "summary.json").is_file():
        evaluate_run(parent)
    capsys.readouterr()
    assert main(["compare", str(parent), str(run)]) == 0
    text = capsys.readouterr().out
    assert "McNemar p" in text and "paired over the" in text

    if kind == "llava":  # exact resume of GRPO: same sampled answers, rewards and losses after step 2
        resumed = _swap_in_checkpoint(run, 2, "grpo-resumed")
        train(load_config(resumed / "config.yaml"), resume=resumed)
        keys = ("loss", "reward_mean", "kl", "pg_loss")
        assert [r[k] for r in read_metrics(resumed) if "reward_mean" in r for k in keys] == pytest.approx(
            [r[k] for r in records for k in keys], rel=1e-6, abs=1e-7)


def _train_error(capsys, *argv) -> str:
    assert main(["train", *map(str, argv)]) == 2
    err = capsys.readouterr().err.replace("\r", "\n")  # progress bars and log lines may come before the error
    assert err.count("medtune train: error: ") == 1, err
    message = err.split("medtune train: error: ", 1)[1].strip()
    assert message and "\n" not in message, err
    return message


def test_bad_input_is_one_clear_line(runs, tmp_path, capsys):
    root = runs["root"]
    config = REPO / "configs" / "vlm_llava_tiny.yaml"
    base = [f"run.output_dir={tmp_path}", f"model.path={root / 'base-llava'}", "model.config={}"]

    def data(entries, name):
        path = root / "data" / name
        path.write_text(json.dumps(entries))
        return f"data.path={path}"

    turn = {"from": "human", "value": "Benign or malignant?"}
    answer = {"from": "gpt", "value": "benign"}
    err = _train_error(capsys, config, *base, data([{"image": "images/case0.png", "conversations": [turn, answer]}],
                                                   "noimage.json"))
    assert "no '<image>' placeholder" in err
    err = _train_error(capsys, config, *base, data([{"image": "images/case0.png", "conversations": [
        {"from": "human", "value": "<image>\nBenign?"}]}], "noanswer.json"))
    assert "no assistant turn" in err
    err = _train_error(capsys, config, *base, data([{"image": "../../escape.png", "conversations": [
        {"from": "human", "value": "<image>\nBenign?"}, answer]}], "escape.json"))
    assert "escapes the image root" in err

    remote = tmp_path / "remote"
    shutil.copytree(root / "base-llava", remote)
    meta = json.loads((remote / "config.json").read_text())
    meta["auto_map"] = {"AutoModelForCausalLM": "modeling_hulu.HuluMedForCausalLM"}
    (remote / "config.json").write_text(json.dumps(meta))
    good = f"data.path={root / 'data' / 'train.json'}"
    err = _train_error(capsys, config, f"run.output_dir={tmp_path}", f"model.path={remote}", good)
    assert "model.trust_remote_code=true" in err
    if not torch.cuda.is_available():
        err = _train_error(capsys, config, *base, good, "model.quantize_4bit=true")
        assert "needs a CUDA GPU" in err


def _uneven_answers(runs, tmp_path):
    """The training set with answers of 1 to 9 tokens: a per-micro-batch (or per-process) token mean then weighs
    tokens unequally, so equalities between batchings below hold only with the global token normalisation."""
    root = runs["root"]
    entries = json.loads((root / "data" / "train.json").read_text())
    for i, e in enumerate(entries):
        if i % 3 == 1:
            e["conversations"][1]["value"] = f"The lesion is {e['label']}, I think, on this image."
    data = tmp_path / "train.json"
    data.write_text(json.dumps(entries))

    def cfg(name, *overrides):
        return sft_cfg(root, "llava", f"run.output_dir={tmp_path / 'runs'}", f"data.path={data}",
                       f"data.image_root={root / 'data'}", "lora.dropout=0.0", "train.preflight=false",
                       "optim.max_steps=3", "train.eval_every=100", "train.save_every=3", *overrides, name=name)

    return cfg


def _same_training(one, two):
    from medtune.runs.load import load_run_model

    losses = [[r["loss"] for r in read_metrics(run) if "loss" in r] for run in (one, two)]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5)
    m1, m2 = load_run_model(one, "last", "cpu")[1], load_run_model(two, "last", "cpu")[1]
    for (n1, p1), (n2, p2) in zip(m1.trainable_named_parameters(), m2.trainable_named_parameters()):
        assert n1 == n2 and torch.allclose(p1, p2, atol=1e-5), n1


def test_gradient_accumulation_equals_one_big_batch(runs, tmp_path):
    """2 micro-batches of 2 = one batch of 4: same losses and adapter (uneven answer lengths, see _uneven_answers)."""
    cfg = _uneven_answers(runs, tmp_path)
    one = train(cfg("big", "data.batch_size=4", "optim.grad_accum=1"))
    two = train(cfg("accumulated", "data.batch_size=2", "optim.grad_accum=2"))
    _same_training(one, two)


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("batch, accum, port", [(4, 1, 29531), (2, 2, 29532)])
def test_two_process_instruction_tuning_equals_one_process(runs, tmp_path, batch, accum, port):
    """The global batch of 4 on 1 process, and on 2 gloo processes (also as 2 accumulated micro-batches of 2):
    same losses and the same adapter."""
    import os
    import subprocess
    import sys

    cfg = _uneven_answers(runs, tmp_path)
    one = train(cfg("one", "data.batch_size=4"))
    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(cfg("two", f"data.batch_size={batch}", f"optim.grad_accum={accum}").to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "medtune.cli", "train", str(cfg_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _same_training(one, tmp_path / "runs" / "two")


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("deepspeed_zero2", "DEEPSPEED"), ("fsdp", "FSDP")])
def test_shipped_accelerate_configs_load_with_accelerate(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.num_processes >= 2
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 2
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def _cli_error(capsys, *argv) -> str:
    assert main([*map(str, argv)]) == 2
    err = capsys.readouterr().err.replace("\r", "\n")
    marker = f"medtune {argv[0]}: error: "
    assert err.count(marker) == 1, err
    message = err.split(marker, 1)[1].strip()
    assert message and "\n" not in message, err
    return message


def test_eval_on_another_data_file(runs, tmp_path, capsys):
    """`medtune eval RUN --data FILE`: every sample of FILE answered and scored with the run's label set, written to
    RUN/eval/data-<name>; the run's own evaluation stays as it was; image paths still never leave their root."""
    run = runs["llava"]
    assert main(["eval", str(run)]) == 0
    own = (run / "eval" / "test" / "summary.json").read_text()
    external = write_vqa(tmp_path / "site-b", n=6, seed=1).rename(tmp_path / "site-b" / "external.json")
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(external)]) == 0
    out = capsys.readouterr().out
    assert f"data: {external}" in out and "accuracy" in out and str(run / "eval" / "data-external") in out
    summary = json.loads((run / "eval" / "data-external" / "summary.json").read_text())
    assert summary["split"] == "data-external" and summary["data"] == str(external)
    assert summary["n_samples"] == 6 and summary["classification"]["labels"] == ["benign", "malignant"]
    assert summary["classification"]["majority_label"] in ("benign", "malignant")  # the run's training split's
    assert summary["classification"]["accuracy"]["mean"] >= 5 / 6  # the run learned bright / dark: new images too
    answers = (run / "eval" / "data-external" / "answers.csv").read_text().splitlines()
    assert len(answers) == 1 + 6
    assert (run / "eval" / "test" / "summary.json").read_text() == own

    # the run's own training images: scored, with a warning that they are not held out
    with pytest.warns(RuntimeWarning, match="in the run's training split"):
        assert main(["eval", str(run), "--data", str(runs["root"] / "data" / "train.json")]) == 0
    capsys.readouterr()

    err = _cli_error(capsys, "eval", run, "--data", external, "--split", "val")
    assert "give one of them" in err
    err = _cli_error(capsys, "eval", run, "--data", tmp_path / "missing.json")
    assert "no such file" in err
    escape = tmp_path / "site-c" / "escape.json"
    escape.parent.mkdir()
    escape.write_text(json.dumps([{"image": "../site-b/images/case0.png", "conversations": [
        {"from": "human", "value": "<image>\nBenign?"}, {"from": "gpt", "value": "benign"}]}]))
    err = _cli_error(capsys, "eval", run, "--data", escape)
    assert "escapes the image root" in err
    # another file of the same name: refused, the earlier results are kept
    other = write_vqa(tmp_path / "site-d", n=2, seed=2).rename(tmp_path / "site-d" / "external.json")
    err = _cli_error(capsys, "eval", run, "--data", other)
    assert "another file of that name" in err
    assert json.loads((run / "eval" / "data-external" / "summary.json").read_text())["data"] == str(external)
