"""Family vlm: LoRA placement, projector training, assistant-only labels, truncation refusal, batching, generation,
adapter / merged parity, bad-input lines. Tiny LLaVA, InternVL, Qwen2.5-VL and Qwen3-VL, built offline, CPU, seconds."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from medtune.config import build_config
from medtune.data.types import DataError
from medtune.models.registry import build_model
from medtune.models.vlm.logits import ALL_POSITIONS, LOGITS_AT

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

KINDS = ("llava", "internvl", "qwen2_5_vl", "qwen3_vl")  # every tiny kind the vlm family builds
TURNS = [{"role": "user", "content": "<image>\nIs the lesion benign or malignant?"},
         {"role": "assistant", "content": "benign"},
         {"role": "user", "content": "Are you sure?"},
         {"role": "assistant", "content": "Yes, it is benign."}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from medtune.models.vlm.tiny import save_tiny_vlm

    root = tmp_path_factory.mktemp("vlm")
    return {kind: save_tiny_vlm(root / kind, kind, seed=0) for kind in KINDS}


def _cfg(folder, **vlm):
    lora = vlm.pop("lora", {"r": 4})
    model = {"family": "vlm", "path": str(folder), "vlm": vlm}
    model.update(vlm.pop("model", {}))
    return build_config({"model": model, "lora": lora})


def _image(seed=0, h=40, w=50):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def _batch(seg, conversations, for_generation=False):
    from medtune.models.vlm.model import collate

    items = [seg.codec.encode(turns, _image(i), f"s{i}", for_generation=for_generation)
             for i, turns in enumerate(conversations)]
    return collate(items, "left" if for_generation else "right")


def _lora_layers(seg):
    from peft.tuners.lora import LoraLayer

    return [n for n, m in seg.base_network.named_modules() if isinstance(m, LoraLayer)]


def _perturb(seg, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in seg.net.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------------- LoRA placement
@pytest.mark.parametrize("kind", KINDS)
def test_lora_lands_in_the_language_model_only_and_projector_trains_when_asked(folders, kind):
    seg = build_model(_cfg(folders[kind]))
    landed = _lora_layers(seg)
    assert landed and all(n.startswith("model.language_model.layers.") for n in landed)
    assert {n.rsplit(".", 1)[1] for n in landed} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"}
    trainable = [n for n, _ in seg.trainable_named_parameters()]
    assert trainable and all(re.search(r"\.lora_[AB]\.", n) for n in trainable)

    with_projector = build_model(_cfg(folders[kind], train_projector=True))
    names = [n for n, _ in with_projector.trainable_named_parameters()]
    # LLaVA / InternVL: multi_modal_projector; Qwen-VL: the merger at the end of its vision tower (model.visual.merger)
    projector_name, vision_name = with_projector.parts.projector, with_projector.parts.vision
    assert projector_name.rsplit(".", 1)[-1] in ("multi_modal_projector", "merger")
    projector = [n for n in names if f"{projector_name}." in n]
    assert projector and all(".modules_to_save." in n for n in projector)
    assert not any(f"{vision_name}." in n and f"{projector_name}." not in n for n in names)
    # trainable after wrapping, and it really learns: one step moves the projector copy, not the original
    before = {n: p.detach().clone() for n, p in with_projector.net.named_parameters() if f"{projector_name}." in n}
    opt = torch.optim.SGD([p for _, p in with_projector.trainable_named_parameters()], lr=0.1)
    with_projector(batch=_batch(with_projector, [TURNS])).lm_loss.backward()
    opt.step()
    after = dict(with_projector.net.named_parameters())
    moved = [n for n, v in before.items() if not torch.equal(v, after[n].detach())]
    assert moved and all(".modules_to_save." in n for n in moved)


def test_suffix_targets_would_hit_the_vision_tower_and_are_refused(folders):
    # PEFT's usual list of suffixes matches CLIP's attention too (pitfall 5): refused with one clear line
    with pytest.raises(ValueError, match="LoRA landed in the vision tower") as err:
        build_model(_cfg(folders["llava"], lora={"r": 4, "target_modules": r"^.*\.(?:q_proj|k_proj|v_proj)$"}))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="projector"):
        build_model(_cfg(folders["llava"], lora={"r": 4, "target_modules": r"^.*(?:linear_1|q_proj)$"}))


def test_gradient_checkpointing_still_reaches_every_adapter(folders):
    """Non-reentrant checkpointing with input grads enabled: frozen embeddings do not cut the graph (pitfall 3)."""
    seg = build_model(_cfg(folders["llava"], model={"gradient_checkpointing": True}, train_projector=True))
    _perturb(seg)  # LoRA-B away from 0 so that LoRA-A gets gradient too
    seg.train()(batch=_batch(seg, [TURNS])).lm_loss.backward()
    grads = {n: p.grad for n, p in seg.trainable_named_parameters()}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_vision_lora_on_request(folders):
    seg = build_model(_cfg(folders["llava"], vision_lora=True))
    landed = _lora_layers(seg)
    assert any(n.startswith("model.vision_tower.") for n in landed)
    assert any(n.startswith("model.language_model.") for n in landed)
    assert not any("multi_modal_projector" in n for n in landed)


def test_full_finetuning_freezes_exactly_the_parameters_the_forward_never_uses(tmp_path):
    from medtune.models.lora import load_trainable, save_trainable

    cfg = build_config({"model": {"family": "vlm", "config": {"preset": "tiny", "vlm": "llava"}}})
    seg = build_model(cfg)
    assert not seg.is_peft
    frozen = [n for n, p in seg.net.named_parameters() if not p.requires_grad]
    # LLaVA reads CLIP's hidden states before its final layer norm
    assert frozen and all("post_layernorm" in n for n in frozen)
    seg(batch=_batch(seg, [TURNS])).lm_loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in seg.trainable_named_parameters())
    # a full checkpoint round trip (save_pretrained writes LLaVA under its legacy key names)
    _perturb(seg)
    save_trainable(seg, tmp_path / "ckpt")
    other = build_model(cfg).eval()
    load_trainable(other, tmp_path / "ckpt")
    batch = _batch(seg, [TURNS])
    with torch.no_grad():
        assert torch.allclose(other(batch=batch).token_logits, seg.eval()(batch=batch).token_logits, atol=1e-5)


# ------------------------------------------------------------------------------------------------ labels / batches
@pytest.mark.parametrize("kind", KINDS)
def test_only_assistant_answers_and_end_of_turn_are_supervised(folders, kind):
    seg = build_model(_cfg(folders[kind]))
    item = seg.codec.encode(TURNS, _image(), "s0")
    labels, ids = item["labels"], item["input_ids"]
    supervised = (labels != -100).nonzero().flatten().tolist()
    assert torch.equal(labels[supervised], ids[supervised])
    spans, current = [], [supervised[0]]
    for pos in supervised[1:]:
        if pos == current[-1] + 1:
            current.append(pos)
        else:
            spans.append(current)
            current = [pos]
    spans.append(current)
    decoded = [seg.codec.tokenizer.decode(ids[s]) for s in spans]
    assert decoded == ["benign<|im_end|>", "Yes, it is benign.<|im_end|>"]
    # no image token is ever a label, and every image token is in the input
    image_ids = seg.codec.image_token_ids
    assert not any(int(t) in image_ids for t in labels[supervised])
    assert sum(int(t) in image_ids for t in ids) >= 4


def test_labels_agree_with_transformers_assistant_mask(folders):
    """Cross-check with transformers' own {% generation %} mask on a template that has the markers."""
    from medtune.models.vlm.tiny import tiny_chat_template

    template = tiny_chat_template().replace(
        "{%- if message['content'] is string -%}",
        "{%- if message['role'] == 'assistant' -%}{% generation %}{{ message['content'][0]['text'] + '<|im_end|>' }}"
        "{% endgeneration %}{{ '\\n' }}{%- elif message['content'] is string -%}"
    )
    seg = build_model(_cfg(folders["llava"], chat_template=template))
    from medtune.models.vlm.model import _messages

    ref = seg.processor.apply_chat_template(
        [_messages(TURNS)], chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
        images=[[_image()]], processor_kwargs={"add_special_tokens": False}, return_tensors="pt")
    ours = seg.codec.encode(TURNS, _image(), "s0")
    assert torch.equal(ref["input_ids"][0], ours["input_ids"])
    assert torch.equal(ref["assistant_masks"][0].bool(), ours["labels"] != -100)


@pytest.mark.parametrize("kind", KINDS)
def test_truncation_is_refused_with_the_sample_id(folders, kind):
    seg = build_model(_cfg(folders[kind]))
    full = len(seg.codec.encode(TURNS, _image(), "s0")["input_ids"])
    assert seg.codec.encode(TURNS, _image(), "fits") is not None
    short = build_model(_cfg(folders[kind], max_length=6))
    with pytest.raises(DataError, match=r"sample case-12: \d+ tokens > model.vlm.max_length=6; truncation would cut "
                                        r"\d+ of its \d+ image tokens"):
        short.codec.encode(TURNS, _image(), "case-12")
    answer_cut = build_model(_cfg(folders[kind], max_length=full - 3))
    with pytest.raises(DataError, match="answer tokens") as err:
        answer_cut.codec.encode(TURNS, _image(), "case-13")
    # the image's share is named, with where the image size is set
    ids = answer_cut.codec.encode(TURNS, _image(), "x", check_length=False)["input_ids"].tolist()
    n_image = sum(t in answer_cut.codec.image_token_ids for t in ids)
    assert n_image > 0 and f"make the images smaller ({n_image} of the {full} tokens are image tokens; " in str(err.value)
    assert "preprocessor_config.json" in str(err.value) and "\n" not in str(err.value)


def test_too_long_names_the_image_processor_knob_of_a_dynamic_resolution_model(folders):
    from medtune.models.vlm.model import ChatCodec

    seg = build_model(_cfg(folders["llava"]))
    processor = seg.codec.processor
    processor.image_processor.max_tokens = 16384  # Hulu-Med's image processor bounds its image tokens so
    codec = ChatCodec(processor, max_length=6)
    with pytest.raises(DataError, match=r"of the \d+ tokens are image tokens; lower the image processor's "
                                        r"max_tokens=16384: model.vlm.image_processor.max_tokens=...\)"):
        codec.encode(TURNS, _image(), "case-14")


def test_image_processor_settings_bound_the_image_tokens_and_travel_with_the_export(folders, tmp_path):
    """model.vlm.image_processor sets the folder's image processor (Qwen-VL's size.longest_edge here, in pixels;
    Hulu-Med's max_tokens, InternVL's max_patches): fewer image tokens for a large image, kept in the export; a name
    the image processor does not have is one line listing the ones it has."""
    from medtune.errors import UserError

    image = _image(h=120, w=120)
    default = build_model(_cfg(folders["qwen2_5_vl"]))
    unit = 14 * 2  # patch x merge: the pixels of one image token along each side
    small = build_model(_cfg(folders["qwen2_5_vl"], image_processor={"size": {"longest_edge": (2 * unit) ** 2}}))
    n_default, n_small = (sum(t in m.codec.image_token_ids for t in m.codec.encode(TURNS, image, "x")["input_ids"]
                              .tolist()) for m in (default, small))
    assert n_small == 4 < n_default
    small.save_base(tmp_path / "export")
    saved = json.loads((tmp_path / "export" / "processor_config.json").read_text())
    saved = saved.get("image_processor", saved)
    assert saved["size"]["longest_edge"] == (2 * unit) ** 2 and saved["size"]["shortest_edge"] > 0
    with pytest.raises(UserError, match=r"model.vlm.image_processor: \w+ has no setting max_tokns; its settings: .*"
                                        r"resample") as err:
        build_model(_cfg(folders["llava"], image_processor={"max_tokns": 64}))
    assert "\n" not in str(err.value)


def test_collate_keeps_every_processor_key_and_pads_sequence_keys(folders):
    from medtune.models.vlm.model import collate

    seg = build_model(_cfg(folders["llava"]))
    processor = seg.codec.processor
    original = type(processor).__call__

    class ExtraKeys(type(processor)):
        """A processor that, like Qwen2-VL's, also returns a per-token key and a per-image key."""

        def __call__(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            out["mm_token_type_ids"] = (out["input_ids"] == self.image_token_id).long()
            out["image_grid_thw"] = torch.tensor([[1, 4, 4]] * out["pixel_values"].shape[0])
            out["modals"] = ["image"] * out["pixel_values"].shape[0]  # Hulu-Med's processor returns such a list
            return out

    processor.__class__ = ExtraKeys
    try:
        a = seg.codec.encode(TURNS, _image(0), "a")
        b = seg.codec.encode(TURNS[:2], _image(1), "b")
    finally:
        processor.__class__ = type(processor).__mro__[1]
    assert {"mm_token_type_ids", "image_grid_thw", "pixel_values", "modals"} <= a.keys()
    batch = collate([a, b])
    assert batch["modals"] == ["image", "image"]
    n = len(a["input_ids"])
    assert batch["ids"] == ["a", "b"] and batch["input_ids"].shape == (2, n)
    assert batch["image_grid_thw"].shape == (2, 3) and batch["pixel_values"].shape[0] == 2
    assert torch.equal(batch["mm_token_type_ids"][1, len(b["input_ids"]):], torch.zeros(n - len(b["input_ids"]),
                                                                                        dtype=torch.long))
    assert (batch["labels"][1, len(b["input_ids"]):] == -100).all()
    assert (batch["attention_mask"][1, len(b["input_ids"]):] == 0).all()
    left = collate([a, b], "left")
    assert torch.equal(left["input_ids"][1, n - len(b["input_ids"]):], b["input_ids"])


def test_collate_keeps_per_image_keys_per_image_whatever_their_length(folders):
    """Hulu-Med-style per-image keys (grid_sizes [n, 3], merge_sizes [n]) and a 1-D per-patch key whose length equals
    the prompt length by chance: concatenated per image, never padded as token rows."""
    from medtune.models.vlm.model import SEQUENCE_KEYS, collate

    seg = build_model(_cfg(folders["llava"]))
    processor = seg.codec.processor
    original = type(processor).__call__

    class PerImageKeys(type(processor)):
        def __call__(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            n_images, t0 = out["pixel_values"].shape[0], out["input_ids"].shape[1]
            out["grid_sizes"] = torch.tensor([[1, 4, 4]] * n_images)
            out["merge_sizes"] = torch.ones(n_images, dtype=torch.long)
            out["patch_ids"] = torch.arange(t0) + 100  # one value per patch; t0 patches by chance
            return out

    questions = [[TURNS[0]], [{"role": "user", "content": "<image>\nBenign?"}]]
    processor.__class__ = PerImageKeys
    try:
        items = [seg.codec.encode(turns, _image(i), f"s{i}", for_generation=True) for i, turns in enumerate(questions)]
    finally:
        processor.__class__ = type(processor).__mro__[1]
    lengths = [len(it["input_ids"]) for it in items]
    assert lengths[0] != lengths[1] and [len(it["patch_ids"]) for it in items] == lengths  # the same length as T
    assert set(items[0][SEQUENCE_KEYS]) == {"input_ids", "attention_mask", "labels"}
    for side in ("left", "right"):
        batch = collate(items, side)
        assert batch["input_ids"].shape == (2, max(lengths))
        assert torch.equal(batch["merge_sizes"], torch.tensor([1, 1]))  # [1] + [1], not padded to [2, T]
        assert torch.equal(batch["grid_sizes"], torch.tensor([[1, 4, 4], [1, 4, 4]]))
        assert torch.equal(batch["patch_ids"], torch.cat([torch.arange(n) + 100 for n in lengths]))
        assert batch[SEQUENCE_KEYS] == items[0][SEQUENCE_KEYS] and SEQUENCE_KEYS not in seg.model_inputs(batch)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_greedy_generation_equals_one_by_one(folders, kind):
    seg = build_model(_cfg(folders[kind])).eval()
    _perturb(seg)
    conversations = [TURNS, TURNS[:2], [{"role": "user", "content": "<image> Describe."},
                                        {"role": "assistant", "content": "x"}]]
    together = seg.generate(_batch(seg, conversations, for_generation=True), max_new_tokens=6)
    for i, turns in enumerate(conversations):
        from medtune.models.vlm.model import collate

        alone = seg.generate(collate([seg.codec.encode(turns, _image(i), f"s{i}", for_generation=True)], "left"), 6)
        assert seg.codec.decode(together[i]) == seg.codec.decode(alone[0])


def test_generation_returns_the_new_tokens_whether_or_not_the_model_echoes_the_prompt(folders):
    """transformers' VLMs echo the prompt; Hulu-Med's generate (inputs_embeds alone) returns only the new tokens."""
    from medtune.errors import UserError

    seg = build_model(_cfg(folders["llava"])).eval()
    _perturb(seg)
    prompts = _batch(seg, [TURNS, TURNS[:2]], for_generation=True)
    t = prompts["input_ids"].shape[1]
    real = seg.net.generate
    echoed = real(**seg.model_inputs(prompts), max_new_tokens=6, do_sample=False, temperature=None, top_k=None,
                  top_p=None, eos_token_id=seg.codec.stop_ids, pad_token_id=seg.codec.pad_token_id)
    assert torch.equal(echoed[:, :t], prompts["input_ids"])  # this model echoes
    answers = seg.generate(prompts, max_new_tokens=6)
    assert torch.equal(answers, echoed[:, t:]) and answers.shape[1] >= 1
    seg.net.generate = lambda **kwargs: real(**kwargs)[:, kwargs["input_ids"].shape[1]:]  # the stand-in
    try:
        assert torch.equal(seg.generate(prompts, max_new_tokens=6), answers)
        seg.net.generate = lambda **kwargs: torch.zeros(2, t + 3, dtype=torch.long)  # neither: refused
        with pytest.raises(UserError, match=r"returned \d+ tokens per sample for a \d+-token prompt") as err:
            seg.generate(prompts, max_new_tokens=6)
        assert "\n" not in str(err.value)
    finally:
        del seg.net.generate


def test_generation_prompt_is_the_training_prompt(folders):
    seg = build_model(_cfg(folders["llava"]))
    train = seg.codec.encode(TURNS, _image(), "s0")
    prompt = seg.codec.encode(TURNS, _image(), "s0", for_generation=True)
    last_answer = (train["labels"] != -100).nonzero().flatten().tolist()
    start = max(p for p in last_answer if p - 1 not in last_answer)
    assert torch.equal(prompt["input_ids"], train["input_ids"][:start])


# --------------------------------------------------------------------------------------- adapters / merged parity
@pytest.mark.parametrize("kind", KINDS)
def test_adapter_parity_disabled_is_base_peft_loads_and_merged_folder_answers_the_same(folders, kind, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from medtune.models.lora import load_trainable, save_trainable
    from medtune.models.vlm.processing import load_processor

    cfg = _cfg(folders[kind], train_projector=True)
    seg = build_model(cfg).eval()
    # logits at every position, to compare with plain transformers / PEFT forwards
    batch = {**_batch(seg, [TURNS, TURNS[:2]]), LOGITS_AT: ALL_POSITIONS}
    prompts = _batch(seg, [TURNS, TURNS[:2]], for_generation=True)
    base = AutoModelForImageTextToText.from_pretrained(str(folders[kind])).eval()
    with torch.no_grad():
        base_logits = base(**seg.model_inputs(batch)).logits
        assert torch.allclose(seg(batch=batch).token_logits, base_logits, atol=1e-5)  # LoRA-B = 0 at init
        _perturb(seg)
        adapted = seg(batch=batch).token_logits
        with seg.adapters_disabled():
            assert torch.allclose(seg(batch=batch).token_logits, base_logits, atol=1e-5)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    answers = seg.generate(prompts, max_new_tokens=6)

    ckpt = save_trainable(seg, tmp_path / "ckpt")  # PEFT format: plain PEFT loads it onto the plain base
    peft_model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(str(folders[kind])), ckpt).eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(**seg.model_inputs(batch)).logits, adapted, atol=1e-5)
    again = build_model(cfg).eval()
    load_trainable(again, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.allclose(again(batch=batch).token_logits, adapted, atol=1e-5)

    merged_dir = seg.save_base(tmp_path / "merged")
    assert seg.is_peft  # the live model keeps its adapters
    merged = AutoModelForImageTextToText.from_pretrained(str(merged_dir)).eval()
    processor = load_processor(merged_dir, cfg)
    assert processor.chat_template == seg.codec.template
    with torch.no_grad():
        assert torch.allclose(merged(**seg.model_inputs(batch)).logits, adapted, atol=1e-4)
    merged_seg = build_model(_cfg(merged_dir, model={"finetune": "full"})).eval()
    merged_prompts = _batch(merged_seg, [TURNS, TURNS[:2]], for_generation=True)
    assert torch.equal(merged_prompts["input_ids"], prompts["input_ids"])
    assert torch.equal(merged_seg.generate(merged_prompts, max_new_tokens=6), answers)


# ------------------------------------------------------------------------------------------------------ bad input
def test_remote_code_folder_needs_opt_in_and_qlora_needs_cuda(folders, tmp_path):
    import shutil

    remote = tmp_path / "remote"
    shutil.copytree(folders["llava"], remote)
    meta = json.loads((remote / "config.json").read_text())
    meta["auto_map"] = {"AutoModelForCausalLM": "modeling_hulu.HuluMedForCausalLM"}
    (remote / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model.trust_remote_code=true") as err:
        build_model(_cfg(remote))
    assert "\n" not in str(err.value)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU") as err:
            build_model(_cfg(folders["llava"], model={"quantize_4bit": True}))
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="preset: tiny"):
        build_model(build_config({"model": {"family": "vlm"}}))


def test_remote_code_processor_with_missing_imports_is_one_line_naming_the_packages(folders, tmp_path):
    """A remote-code processor that imports packages this environment lacks (Hulu-Med's imports cv2 / decord /
    ffmpeg at module level): one line naming what to pip install (cv2 is opencv-python-headless), with the opt-in
    given; transformers' own hint would say `pip install cv2`."""
    import shutil

    from medtune.errors import UserError
    from medtune.models.vlm.processing import load_processor

    remote = tmp_path / "remote-processor"
    shutil.copytree(folders["llava"], remote)
    (remote / "processing_medvlm.py").write_text(
        "import cv2\nimport medtune_absent_package\nfrom transformers import ProcessorMixin\n\n\n"
        "class MedProcessor(ProcessorMixin):\n    pass\n")
    config = json.loads((remote / "processor_config.json").read_text())
    config["auto_map"] = {"AutoProcessor": "processing_medvlm.MedProcessor"}
    (remote / "processor_config.json").write_text(json.dumps(config))
    cfg = build_config({"model": {"family": "vlm", "path": str(remote), "trust_remote_code": True}})
    with pytest.raises(UserError, match=r"imports cv2, medtune_absent_package, not installed here; `pip install "
                                        r"opencv-python-headless medtune_absent_package`") as err:
        load_processor(remote, cfg)
    assert "\n" not in str(err.value) and str(remote) in str(err.value)


# ------------------------------------------------------------------------------------------ non-persistent buffers
@pytest.mark.parametrize("kind", KINDS)
def test_build_recomputes_non_persistent_buffers_the_loader_left_uninitialised(folders, kind, monkeypatch):
    """As with remote code: transformers' loader materialises non-persistent buffers with empty_like and only the
    model's own _init_weights writes them again. With that hook silenced (for every sub-model) and the memory
    poisoned, the family's loader still gives the values a fresh construction computes."""
    from medtune.models.vlm.tiny import tiny_vlm

    eager, _ = tiny_vlm(kind, seed=0)
    expected = {n: b for n, b in eager.named_buffers()}
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like",
                        lambda t, *a, **k: real(t, *a, **k).fill_(float("nan") if t.is_floating_point() else -7))
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "_initialize_weights", lambda self, module, is_custom_code=False: None)
    seg = build_model(_cfg(folders[kind]))
    loaded = dict(seg.base_network.named_buffers())
    assert any(n.endswith("inv_freq") for n in loaded)
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name


def test_token_compression_with_more_than_one_sample_per_forward_is_a_config_error(folders, tmp_path):
    """Hulu-Med's hub configs set use_token_compression: true, which its forward supports at batch size 1 only."""
    import shutil

    from medtune.errors import UserError

    folder = tmp_path / "compressing"
    shutil.copytree(folders["llava"], folder)
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "use_token_compression": True}))
    cfg = _cfg(folder)
    cfg.data.batch_size = 4
    with pytest.raises(UserError, match=r"config.json sets use_token_compression: true, .* batches 4 "
                                        r"\(data.batch_size=4\); set use_token_compression to false .* or set "
                                        r"data.batch_size=1") as err:
        build_model(cfg)
    assert "\n" not in str(err.value)
    cfg.objective = "rl"
    cfg.data.batch_size = 1
    with pytest.raises(UserError, match=r"batches \d+ \(data.batch_size=1 x rl.group_size=\d+ answers per "
                                        r"prompt\)"):
        build_model(cfg)
    cfg.objective = "supervised"
    assert build_model(cfg).codec is not None  # one sample per forward: fine


def test_published_hulumed_config_with_a_batch_is_refused_before_loading():
    """The published Hulu-Med config.json (fixture) has use_token_compression: true: the check that guards a
    remote-code forward refuses a batch (medtune's native Hulu-Med takes one: tests/test_hulumed.py)."""
    from helpers import REPO

    from medtune.errors import UserError
    from medtune.models.hf import read_config_json
    from medtune.models.vlm.model import check_token_compression

    folder = REPO.parent / "shared" / "fixtures" / "hulumed-tiny" / "model"
    if not (folder / "config.json").is_file():
        pytest.skip(f"Hulu-Med fixture absent ({folder})")
    cfg = build_config({"model": {"family": "vlm", "path": str(folder), "trust_remote_code": True},
                        "data": {"batch_size": 2}})
    with pytest.raises(UserError, match="use_token_compression: true"):
        check_token_compression(read_config_json(folder), cfg, folder)
    cfg.data.batch_size = 1
    check_token_compression(read_config_json(folder), cfg, folder)
