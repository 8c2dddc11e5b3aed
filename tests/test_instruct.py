"""Task instruct: dataset refusal, global-token loss normalisation, generation-based validation / evaluation."""
from __future__ import annotations

import pytest
import torch
from vlm_helpers import instruct_cfg, write_vqa

from medtune.data.layouts import discover
from medtune.data.loading import load_all
from medtune.data.types import DataError
from medtune.models.registry import build_model

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from medtune.models.vlm.tiny import save_tiny_vlm

    root = tmp_path_factory.mktemp("instruct")
    data = write_vqa(root / "data", n=8)
    folder = save_tiny_vlm(root / "llava", "llava", seed=0)
    cfg = instruct_cfg(root, data=data, model=folder)
    samples = load_all(discover(cfg.data), cfg.data)
    return root, data, folder, cfg, samples


def test_dataset_refuses_every_sample_that_would_be_truncated(setup):
    from medtune.tasks.instruct import train_dataset

    root, data, folder, cfg, samples = setup
    short = instruct_cfg(root, "model.vlm.max_length=10", data=data, model=folder)
    with pytest.raises(DataError) as err:
        train_dataset(samples[:3], short, build_model(short))
    message = str(err.value)
    assert message.startswith("3 problem(s)") and all(f"sample case{i}:" in message for i in range(3))
    assert "image tokens" in message
    dataset = train_dataset(samples, cfg, build_model(cfg))
    item = dataset[(5, 0)]
    assert item["id"] == "case5" and item["input_ids"].ndim == 1


def test_loss_is_normalised_by_the_global_number_of_supervised_tokens(setup):
    from medtune.models.vlm.logits import ALL_POSITIONS, LOGITS_AT
    from medtune.models.vlm.model import token_loss
    from medtune.tasks.instruct import make_loss, train_collate, train_dataset

    _, _, _, cfg, samples = setup
    model = build_model(cfg)
    dataset = train_dataset(samples, cfg, model)
    long = dataset[0]
    long["labels"][:-3] = -100  # fewer supervised tokens in one sample: per-sample means would differ
    items = [long, dataset[1], dataset[2], dataset[3]]
    full = train_collate(items)
    loss, parts = make_loss(cfg)(model, full)
    logits = model(batch={**full, LOGITS_AT: ALL_POSITIONS}).token_logits
    n = (full["labels"][:, 1:] != -100).sum()
    assert torch.allclose(loss, token_loss(logits, full["labels"], n), atol=1e-6)
    # what two processes with half the batch each contribute: sum_i / (n_global / 2), averaged by DDP
    halves = [{**train_collate(items[:2]), LOGITS_AT: ALL_POSITIONS},
              {**train_collate(items[2:]), LOGITS_AT: ALL_POSITIONS}]
    two = sum(token_loss(model(batch=h).token_logits, h["labels"], n / 2) for h in halves) / 2
    assert torch.allclose(two, loss, atol=1e-5)
    per_process_mean = sum(token_loss(model(batch=h).token_logits, h["labels"]) for h in halves) / 2
    assert not torch.allclose(per_process_mean, loss, atol=1e-4)  # the naive average is a different loss
    assert parts["lm"] == pytest.approx(float(loss))


def test_validation_answers_by_generation_and_counts_invalid_answers(setup):
    from medtune.tasks.instruct import generate_answers, validate

    _, _, _, cfg, samples = setup
    model = build_model(cfg)
    answers = generate_answers(model, samples[:3], cfg, "cpu", batch_size=2)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    val = validate(model, samples, cfg, "cpu")
    assert set(val) == {"val_accuracy", "val_macro_f1", "val_invalid_rate", "val_lm_loss"}
    assert 0 < val["val_lm_loss"] < 20
    # an untrained model writes noise: every answer is invalid and none is guessed into a label
    assert val["val_invalid_rate"] == 1.0 and val["val_accuracy"] == 0.0
    assert model.training  # validation restores the mode


def test_score_rows_and_labels(setup):
    from medtune.tasks.instruct import resolve_labels, score

    _, _, _, cfg, samples = setup
    assert resolve_labels(cfg, samples) == ["benign", "malignant"]
    rows = score(samples[:3], ["Benign.", "It looks benign", "no idea"], ["benign", "malignant"], cfg)
    assert [r["answer_label"] for r in rows] == ["benign", "benign", "invalid answer"]
    assert [r["correct"] for r in rows] == [1, 0, 0]
    assert rows[0]["question"] == "Is the lesion benign or malignant?" and rows[1]["reference"] == "malignant"
    no_labels = [s for s in samples]
    for s in no_labels:
        s.label = None
    try:
        assert resolve_labels(cfg, no_labels) == ["benign", "malignant"]  # few distinct answers: they are the labels
    finally:
        for i, s in enumerate(no_labels):
            s.label = "benign" if i % 2 == 0 else "malignant"


def test_evaluation_with_only_empty_answers_is_an_error_not_an_accuracy_of_zero(setup, caplog):
    from medtune.errors import UserError
    from medtune.tasks.instruct import evaluate_model, validate

    root, _, _, cfg, samples = setup
    model = build_model(cfg)
    stop = model.codec.stop_ids[0]
    # a model that ends every answer at once (or a generate() output read at the wrong place)
    model.generate = lambda batch, max_new_tokens, **kw: torch.full((len(batch["ids"]), 2), stop)
    run_dir = root / "empty_run"
    run_dir.mkdir()
    with pytest.raises(UserError, match=r"generation produced no text: all \d+ answers \(split 'test'\) are empty") \
            as err:
        evaluate_model(model, cfg, run_dir, "test", "cpu")
    assert "\n" not in str(err.value) and "model.vlm.chat_template" in str(err.value)
    with caplog.at_level("WARNING", logger="medtune"):
        val = validate(model, samples[:2], cfg, "cpu")  # training goes on, with the reason in the log
    assert val["val_invalid_rate"] == 1.0 and "generation produced no text" in caplog.text
    model.generate = lambda batch, max_new_tokens, **kw: torch.tensor(  # one answer with text: scored as usual
        [model.codec.tokenizer("benign", add_special_tokens=False).input_ids[:1] + [stop]]
        + [[stop, stop]] * (len(batch["ids"]) - 1))
    summary, rows = evaluate_model(model, cfg, run_dir, "test", "cpu")
    assert summary["n_samples"] == len(rows) >= 1 and any(r["answer"] for r in rows)


@pytest.mark.parametrize("kind", ["llava", "internvl", "qwen2_5_vl"])
def test_dataset_is_built_without_decoding_and_its_length_check_counts_as_encode_does(tmp_path, kind):
    """The training dataset reads conversations and header sizes only; the token count it refuses by is the count
    encode gives (text + the image tokens of that image size), for fixed- and dynamic-resolution processors."""
    from medtune.data.loading import LazySamples
    from medtune.models.vlm.processing import to_pil
    from medtune.tasks.instruct import train_dataset

    data = write_vqa(tmp_path / "data", n=4, size=40)
    cfg = instruct_cfg(tmp_path, data=data, kind=kind)
    lazy = LazySamples(discover(cfg.data), cfg.data)
    model = build_model(cfg)
    dataset = train_dataset(lazy, cfg, model)
    assert lazy.decodes == 0
    codec = model.text_codec()
    for i, s in enumerate(load_all(discover(cfg.data), cfg.data)):
        item = codec.encode(s.conversations, to_pil(s.image), s.id)
        assert codec.length(s.conversations, s.image.shape[-2:], s.id) == item["input_ids"].shape[0]
        assert torch.equal(dataset[(i, 0)]["input_ids"], item["input_ids"])
    assert lazy.decodes == 4  # one decode per item used
