"""Hulu-Med as published, loaded by medtune's own implementation (no trust_remote_code, no code from the folder),
against reference tensors Hulu-Med's own code computed on the fixture ``shared/fixtures/hulumed-tiny`` (its README
lists the upstream behaviours and the tolerances used here). Reference tensors are fed to the model first, the
processor's outputs second, so a mismatch points at one side."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from helpers import REPO

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

FIXTURE = REPO.parent / "shared" / "fixtures" / "hulumed-tiny"
MODEL = FIXTURE / "model"
pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(),
                                reason=f"Hulu-Med fixture not found at {FIXTURE} (shared/fixtures beside the clone)")

SAMPLES = ("benign", "malignant")
QUESTION = "<image>\nIs the lesion benign or malignant?"
# the fixture README's tolerances (fp32, measured there: eager vs sdpa, float64 compute)
FEATURE_TOL = {"atol": 1e-4, "rtol": 1e-5}
LOSS_ATOL = 1e-5
PIXEL_ATOL = 1e-6
N_NEW_TOKENS = 8  # the reference generation's length


@pytest.fixture(scope="module")
def ref():
    from safetensors.torch import load_file

    arrays = load_file(str(FIXTURE / "reference.safetensors"))
    meta = json.loads((FIXTURE / "reference.json").read_text())
    out = {s: {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(s + ".")} for s in SAMPLES}
    for s in SAMPLES:
        out[s]["modals"] = meta["modals"][s]
        out[s]["numpy_input_grid_sizes"] = meta["samples"][s]["numpy_input_grid_sizes"]
    out["inv_freq"] = meta["vision_rotary_inv_freq_expected"]
    return out


@pytest.fixture(scope="module")
def net():
    from medtune.models.vlm.hulumed.modeling import load_hulumed

    return load_hulumed(MODEL, "hulumed_qwen3").eval()


@pytest.fixture(scope="module")
def codec():
    from medtune.models.vlm.hulumed.processing import load_processor
    from medtune.models.vlm.model import ChatCodec

    return ChatCodec(load_processor(MODEL))


def _image(sample):
    from PIL import Image

    return Image.open(FIXTURE / "images" / f"{sample}.png").convert("RGB")


def _turns(sample):
    return [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": sample}]


def _image_inputs(r):
    return {"pixel_values": r["pixel_values"], "grid_sizes": r["grid_sizes"], "merge_sizes": r["merge_sizes"],
            "modals": r["modals"]}


def _close(got, want, **tol):
    assert got.shape == want.shape
    assert torch.allclose(got, want, **(tol or FEATURE_TOL)), f"max |diff| {(got - want).abs().max().item():.3g}"


# ---------------------------------------------------------------------------------------------- processor / codec
@pytest.mark.parametrize("sample", SAMPLES)
def test_chat_codec_with_the_hulumed_processor_reproduces_ids_labels_and_patches(codec, ref, sample):
    r = ref[sample]
    item = codec.encode(_turns(sample), _image(sample), sample)
    # medtune's codec supervises the answer and <|im_end|> (not the newline after it): Hulu-Med's per-message labels
    assert torch.equal(item["input_ids"], r["input_ids"])
    assert torch.equal(item["labels"], r["labels"])
    assert torch.equal(item["attention_mask"], torch.ones_like(r["input_ids"]))
    assert torch.allclose(item["pixel_values"], r["pixel_values"], rtol=0, atol=PIXEL_ATOL)
    assert torch.equal(item["grid_sizes"], r["grid_sizes"]) and torch.equal(item["merge_sizes"], r["merge_sizes"])
    assert item["modals"] == r["modals"]
    question = codec.encode(_turns(sample), _image(sample), sample, for_generation=True)
    assert torch.equal(question["input_ids"], r["q_input_ids"])
    assert torch.equal(question["attention_mask"], r["q_attention_mask"])
    assert codec.stop_ids == [codec.tokenizer.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.parametrize("sample", SAMPLES)
def test_the_length_check_without_the_image_counts_as_encode_does(codec, sample):
    """Dynamic resolution: the image tokens depend on the size, which instruction tuning reads from the file header."""
    image = _image(sample)
    for size in (image.size, (image.width // 3, image.height // 2)):
        resized = image.resize(size)
        assert codec.length(_turns(sample), (size[1], size[0]), sample) == codec.encode(
            _turns(sample), resized, sample)["input_ids"].shape[0]


@pytest.mark.parametrize("sample", SAMPLES)
def test_image_processor_keeps_hulumeds_pil_width_height_swap(codec, ref, sample):
    image_processor = codec.processor.image_processor
    pil = _image(sample)
    width, height = pil.size
    grid = image_processor([pil])["grid_sizes"][0].tolist()
    # a PIL image is resized to its transposed aspect; an (H, W, C) array the right way round (as Hulu-Med does)
    patch = image_processor.patch_size
    assert grid == [1, round(width / patch), round(height / patch)]
    assert image_processor([np.asarray(pil)])["grid_sizes"].tolist() == ref[sample]["numpy_input_grid_sizes"]


def test_processor_refuses_a_prompt_whose_images_do_not_match(codec):
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        codec.processor(text=["<image>\nq"], images=[_image("benign"), _image("malignant")])


# -------------------------------------------------------------------------------------------------------- network
def test_rotary_buffers_are_computed_not_loaded(net, ref):
    vision = net.model.vision_encoder.encoder.rotary_pos_emb
    assert torch.equal(vision.inv_freq, torch.tensor(ref["inv_freq"], dtype=torch.float32))
    head_dim, theta = net.config.head_dim, net.config.rope_parameters["rope_theta"]
    expected = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
    assert torch.equal(net.model.rotary_emb.inv_freq, expected)
    # what a transformers 5 load can leave behind (uninitialised memory) is overwritten on every load
    saved = vision.inv_freq.clone()
    vision.inv_freq.fill_(float("nan"))
    net.model.rotary_emb.inv_freq.fill_(float("nan"))
    net.reset_computed_buffers()
    assert torch.equal(vision.inv_freq, saved) and torch.equal(net.model.rotary_emb.inv_freq, expected)


@pytest.mark.parametrize("sample", SAMPLES)
def test_features_logits_and_loss_match_hulumed_from_reference_inputs(net, ref, sample):
    r = ref[sample]
    with torch.no_grad():
        vision = net.model.vision_encoder(r["pixel_values"], r["grid_sizes"], r["merge_sizes"])
        _close(vision, r["vision_features"])
        _close(net.encode_images(r["pixel_values"], r["grid_sizes"], r["merge_sizes"]), r["mm_features"])
        out = net(input_ids=r["input_ids"][None], labels=r["labels"][None], **_image_inputs(r))
    _close(out.logits[0], r["logits"])
    assert abs(out.loss.item() - r["loss"].item()) < LOSS_ATOL
    supervised = r["supervised_positions"]
    loss = torch.nn.functional.cross_entropy(out.logits[0, supervised], r["labels"][supervised + 1])
    assert abs(loss.item() - r["loss"].item()) < LOSS_ATOL  # the loss is the mean over the supervised tokens


@pytest.mark.parametrize("sample", SAMPLES)
def test_greedy_generation_matches_hulumed_ids_and_scores(net, ref, sample):
    r = ref[sample]
    out = net.generate(input_ids=r["q_input_ids"][None], attention_mask=r["q_attention_mask"][None],
                       max_new_tokens=N_NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
                       output_scores=True, **_image_inputs(r))
    # only the new tokens come back (Hulu-Med's generate passes inputs_embeds alone)
    assert torch.equal(out.sequences[0], r["generated_ids"])
    _close(torch.stack(out.scores)[:, 0], r["generated_scores"])


@pytest.mark.parametrize("sample", SAMPLES)
def test_processor_outputs_give_the_reference_logits_and_generation(net, codec, ref, sample):
    from medtune.models.vlm.model import IGNORE_INDEX

    r = ref[sample]
    item = codec.encode(_turns(sample), _image(sample), sample)
    with torch.no_grad():
        out = net(input_ids=item["input_ids"][None], attention_mask=item["attention_mask"][None],
                  pixel_values=item["pixel_values"], grid_sizes=item["grid_sizes"], merge_sizes=item["merge_sizes"],
                  modals=item["modals"], labels=item["labels"][None])
    _close(out.logits[0], r["logits"])
    assert abs(out.loss.item() - r["loss"].item()) < LOSS_ATOL
    assert (item["labels"] != IGNORE_INDEX).sum() == len(r["supervised_positions"])
    q = codec.encode(_turns(sample), _image(sample), sample, for_generation=True)
    new = net.generate(input_ids=q["input_ids"][None], attention_mask=q["attention_mask"][None],
                       pixel_values=q["pixel_values"], grid_sizes=q["grid_sizes"], merge_sizes=q["merge_sizes"],
                       modals=q["modals"], max_new_tokens=N_NEW_TOKENS, do_sample=False)
    assert torch.equal(new[0], r["generated_ids"])


def test_a_batch_of_two_works_with_token_compression_on(net, ref):
    """The fixture's config has use_token_compression=true (as the hub configs): for images it drops nothing, so a
    right-padded batch of both samples gives each sample's reference logits (Hulu-Med's own code asserts here)."""
    assert net.config.use_token_compression
    rows = [ref[s] for s in SAMPLES]
    length = max(len(r["input_ids"]) for r in rows)
    pad = net.config.eos_token_id
    ids = torch.stack([torch.cat([r["input_ids"], torch.full((length - len(r["input_ids"]),), pad)]) for r in rows])
    mask = torch.stack([torch.arange(length) < len(r["input_ids"]) for r in rows]).long()
    with torch.no_grad():
        logits = net(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([r["pixel_values"] for r in rows]),
                     grid_sizes=torch.cat([r["grid_sizes"] for r in rows]),
                     merge_sizes=torch.cat([r["merge_sizes"] for r in rows]),
                     modals=[m for r in rows for m in r["modals"]]).logits
    for row, r in zip(logits, rows):
        _close(row[:len(r["input_ids"])], r["logits"])


def test_bad_multimodal_inputs_are_one_line(net, ref):
    from medtune.errors import UserError

    r = ref["benign"]
    with pytest.raises(UserError, match="images only") as err:
        net(input_ids=r["input_ids"][None], **{**_image_inputs(r), "modals": ["video"]})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="one per image"):  # a per-image key padded like a token sequence
        net(input_ids=r["input_ids"][None], **{**_image_inputs(r), "merge_sizes": torch.ones(5, dtype=torch.long)})
    ids = r["input_ids"]
    first_image = int((ids == net.config.image_token_index).nonzero()[0])
    cut = torch.cat([ids[:first_image], ids[first_image + 1:]])  # one image token lost (e.g. a truncation)
    with pytest.raises(ValueError, match="269 <image> tokens but 270 image features"):
        net(input_ids=cut[None], **_image_inputs(r))


def test_a_folder_whose_weights_do_not_fit_is_refused_in_one_line(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from medtune.errors import UserError
    from medtune.models.vlm.hulumed.modeling import load_hulumed

    folder = tmp_path / "broken"
    shutil.copytree(MODEL, folder)
    weights = load_file(str(MODEL / "model.safetensors"))
    weights.pop("model.mm_projector.readout.2.bias")
    weights["model.vision_encoder.extra.weight"] = torch.zeros(1)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"missing \['model\.mm_projector\.readout\.2\.bias'\]") as err:
        load_hulumed(folder, "hulumed_qwen3")
    assert "model.vision_encoder.extra.weight" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ medtune family
def _cfg(path, **vlm):
    from medtune.config import build_config

    return build_config({"model": {"family": "vlm", "path": str(path), "vlm": vlm}, "lora": {"r": 4}})


def _batch(seg, samples=SAMPLES):
    from medtune.models.vlm.model import collate

    items = [seg.codec.encode(_turns(s), _image(s), s) for s in samples]
    batch = collate(items)
    assert torch.equal(batch["merge_sizes"], torch.cat([it["merge_sizes"] for it in items]))  # per image, not padded
    return batch


def test_lora_lands_in_the_language_model_only_and_a_step_trains_the_adapters(ref):
    from peft.tuners.lora import LoraLayer

    from medtune.models.registry import build_model

    seg = build_model(_cfg(MODEL))  # the fixture folder as published: auto_map, no trust_remote_code
    assert (seg.parts.vision, seg.parts.projector) == ("model.vision_encoder", "model.mm_projector")
    landed = [n for n, m in seg.base_network.named_modules() if isinstance(m, LoraLayer)]
    assert landed and all(re.fullmatch(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj", n) for n in landed)
    assert len(landed) == 7 * seg.base_network.config.num_hidden_layers
    trainable = dict(seg.trainable_named_parameters())
    assert trainable and all(re.search(r"\.lora_[AB]\.", n) for n in trainable)

    batch = _batch(seg, ["benign"])
    with torch.no_grad():  # the adapter starts as the identity: the reference loss
        assert abs(seg.eval()(batch=batch).lm_loss.item() - ref["benign"]["loss"].item()) < LOSS_ATOL
    frozen = {n: p.detach().clone() for n, p in seg.net.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.SGD(list(trainable.values()), lr=0.1)
    seg.train()(batch=batch).lm_loss.backward()
    opt.step()
    moved = [n for n, p in trainable.items() if not torch.equal(p.detach(), before[n])]
    assert moved and any(".lora_B." in n for n in moved)
    assert all(torch.equal(p.detach(), frozen[n]) for n, p in seg.net.named_parameters() if n in frozen)

    with_projector = build_model(_cfg(MODEL, train_projector=True))
    names = [n for n, _ in with_projector.trainable_named_parameters()]
    assert any(".modules_to_save." in n and "mm_projector" in n for n in names)
    assert not any("vision_encoder" in n for n in names)


def test_export_is_a_hulumed_folder_that_loads_back(tmp_path):
    from safetensors import safe_open

    from medtune.models.registry import build_model

    seg = build_model(_cfg(MODEL, train_projector=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the adapters and the projector copy away from the base
        for _, p in seg.trainable_named_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    batch = _batch(seg)
    with torch.no_grad():
        expected = seg.eval()(batch=batch).token_logits
    out = seg.save_base(tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    source = json.loads((MODEL / "config.json").read_text())
    assert config["model_type"] == "hulumed_qwen3" and config["architectures"] == ["HulumedQwen3ForCausalLM"]
    for key in ("auto_map", "rope_theta", "vision_encoder_config", "image_token_index", "mm_projector_type",
                "use_token_compression", "tie_word_embeddings", "vocab_size"):
        assert config[key] == source[key], key
    with safe_open(str(out / "model.safetensors"), "pt") as f, safe_open(str(MODEL / "model.safetensors"), "pt") as g0:
        assert set(f.keys()) == set(g0.keys())  # Hulu-Med's key names, lm_head tied (not stored)
    for name in ("preprocessor_config.json", "processor_config.json", "chat_template.json"):
        saved, published = (json.loads((d / name).read_text()) for d in (out, MODEL))
        assert saved == published, name

    again = build_model(_cfg(out)).eval()
    assert again.codec.template == seg.codec.template
    with torch.no_grad():
        _close(again(batch=batch).token_logits, expected)
    # a full fine-tuning checkpoint's weights load into a model built from the published folder
    from medtune.config import build_config
    from medtune.models.vlm.model import build_vlm

    full = build_vlm(build_config({"model": {"family": "vlm", "path": str(MODEL), "finetune": "full"}})).eval()
    full.load_base_weights(out)
    with torch.no_grad():
        _close(full(batch=batch).token_logits, expected)


# ------------------------------------------------------------------------------------------------------------ CLI
N_CASES = 10  # 6 / 2 / 2 after the split


def _write_vqa(root):
    """root/train.json (llava_json) + images: crops of the fixture's two BUSI images, so no two images are equal."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    entries = []
    for i in range(N_CASES):
        label = SAMPLES[i % 2]
        image = Image.open(FIXTURE / "images" / f"{label}.png")
        w, h = image.size
        image.crop((4 * i, 3 * i, w - 2 * i, h - i)).resize((w // 2, h // 2)).save(root / "images" / f"case{i}.png")
        entries.append({"id": f"case{i}", "image": f"images/case{i}.png", "label": label,
                        "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": label}]})
    (root / "train.json").write_text(json.dumps(entries))
    return root / "train.json"


def test_cli_trains_evaluates_predicts_and_exports_the_published_folder(tmp_path, capsys):
    from medtune.cli import main
    from medtune.models.registry import build_model
    from medtune.runs.files import read_metrics

    data = _write_vqa(tmp_path / "data")
    run = tmp_path / "runs" / "hulumed"
    assert main(["train", str(REPO / "configs" / "vlm_llava_tiny.yaml"), "run.name=hulumed",
                 f"run.output_dir={tmp_path / 'runs'}", f"data.path={data}", f"model.path={MODEL}", "model.config={}",
                 "data.batch_size=2", "optim.max_steps=4", "optim.lr=0.02", "optim.warmup_steps=1",
                 "train.eval_every=4", "train.save_every=4", "train.log_every=1", "train.trackers=[]",
                 "eval.bootstrap=50", "task.max_new_tokens=4"]) == 0
    assert json.loads((run / "preflight.json").read_text())["passed"]
    assert len([r for r in read_metrics(run) if "loss" in r]) == 4
    assert (run / "checkpoints" / "best" / "adapter" / "adapter_model.safetensors").is_file()

    assert main(["eval", str(run)]) == 0
    summary = json.loads((run / "eval" / "test" / "summary.json").read_text())
    assert summary["task"] == "instruct" and summary["n_samples"] == 2
    import csv

    with open(run / "eval" / "test" / "answers.csv", newline="") as f:
        answers = [row["answer"] for row in csv.DictReader(f)]
    assert len(answers) == 2 and all(answers)  # generated text, not the empty cut of a prompt-less output

    image = tmp_path / "data" / "images" / "case0.png"
    assert main(["predict", str(run), str(image), "--question", "Is the lesion benign or malignant?",
                 "--out", str(tmp_path / "pred")]) == 0
    saved = json.loads((tmp_path / "pred" / "answers.json").read_text())["answers"]
    assert saved[0]["image"] == str(image) and saved[0]["answer"]

    export = tmp_path / "export"
    assert main(["export", str(run), "--out", str(export)]) == 0
    assert json.loads((export / "config.json").read_text())["model_type"] == "hulumed_qwen3"
    assert (export / "preprocessor_config.json").is_file() and (export / "processor_config.json").is_file()
    assert build_model(_cfg(export)).codec.processor.image_processor.patch_size == 14


# ----------------------------------------------------------------------------------------------------- Qwen2 kind
def test_a_qwen2_hulumed_folder_loads_natively_by_name(tmp_path):
    """Hulu-Med-7B / 32B are hulumed_qwen2 (Qwen2 LM, biased q/k/v): a random-weight folder in that layout, with the
    fixture's tokenizer and processor files, loads through build_model and gives the saved model's logits."""
    import shutil

    from medtune.models.registry import build_model
    from medtune.models.vlm.hulumed.config import HulumedQwen2Config
    from medtune.models.vlm.hulumed.modeling import HulumedQwen2ForCausalLM

    meta = json.loads((MODEL / "config.json").read_text())
    for key in ("model_type", "architectures", "auto_map", "head_dim", "transformers_version", "torch_dtype"):
        meta.pop(key)
    torch.manual_seed(0)
    source = HulumedQwen2ForCausalLM(HulumedQwen2Config(**meta)).eval()
    folder = tmp_path / "qwen2"
    source.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                 "chat_template.json"):
        shutil.copy(MODEL / name, folder / name)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "hulumed_qwen2" and saved["rope_theta"] == meta["rope_theta"]

    from medtune.models.vlm.logits import ALL_POSITIONS, LOGITS_AT

    seg = build_model(_cfg(folder)).eval()
    base = seg.base_network
    assert type(base).__name__ == "HulumedQwen2ForCausalLM" and base.model.layers[0].self_attn.q_proj.bias is not None
    assert torch.equal(base.model.vision_encoder.encoder.rotary_pos_emb.inv_freq,
                       source.model.vision_encoder.encoder.rotary_pos_emb.inv_freq)
    batch = _batch(seg, ["malignant"])
    with torch.no_grad():
        expected = source(**seg.model_inputs(batch)).logits
        _close(seg(batch={**batch, LOGITS_AT: ALL_POSITIONS}).token_logits, expected)


def test_image_token_budget_is_a_config_setting():
    """Hulu-Med's long image-token sequences: model.vlm.image_processor.max_tokens bounds them (the published
    processor allows 16384), no folder editing."""
    from PIL import Image

    from medtune.config import build_config
    from medtune.models.registry import build_model

    budget = 64
    seg = build_model(build_config({"model": {"family": "vlm", "path": str(MODEL),
                                              "vlm": {"image_processor": {"max_tokens": budget}}}}))
    image = Image.open(FIXTURE / "images" / "benign.png").convert("RGB")
    grid = seg.codec.encode(_turns("benign"), image, "b")["grid_sizes"][0]
    assert 0 < int(grid.prod()) <= budget < 270  # 270 image tokens with the published budget
