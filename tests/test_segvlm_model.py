"""Family segvlm (the plain VLM + a SAM mask head via [SEG]): placement and trainability of LoRA, the teacher-forced
forward, the chat codec's multi-turn conversations, generation, round trips of adapters and merged exports, and the
one-line errors (tiny models, CPU). Every tiny VLM kind of the plain VLM (LLaVA, InternVL, Qwen2.5-VL, Qwen3-VL)
carries the mask head."""
from __future__ import annotations

import json
import pickle
import re
import shutil
from unittest import mock

import pytest
import torch
from helpers import REPO

from medtune.config import build_config
from medtune.errors import UserError
from medtune.models.lora import export_merged, load_trainable, save_trainable
from medtune.models.registry import build_model
from medtune.models.vlm.logits import ALL_POSITIONS, LOGITS_AT
from medtune.models.vlm.seg.model import collate
from medtune.models.vlm.tiny import KINDS

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

QUESTION = "Please segment the vessel in this image."
ANSWER = "It is [SEG]."
TWO_SEG = "Sure, [SEG] and [SEG]."


def _cfg(channels: int = 3, lora: dict | None = None, **model):
    return build_config({"data": {"channels": channels}, "model": {"family": "segvlm", **model},
                         "lora": {"r": 4, **(lora or {})}})


def _parts_cfg(parts, channels: int = 3, lora: dict | None = None, **model):
    vlm_path, sam_path = parts
    vlm = {"vlm_path": str(vlm_path), "sam_path": str(sam_path), **model.pop("vlm", {})}
    return _cfg(channels, lora, vlm=vlm, **model)


def _batch(seg, pairs, size=(40, 48), channels=3, seed=0):
    """A collated batch like the segvlm task's: one random image per (question(s), answer(s)) pair, encoded by the
    model (the VLM processor's tokens and pixels, the mask head's input)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(len(pairs), channels, *size, generator=g)
    return collate([seg.encode(images[i], q, a, f"s{i}") for i, (q, a) in enumerate(pairs)])


def _supervised_text(seg, item) -> str:
    """The supervised tokens as text, special tokens kept (so the end-of-turn token shows)."""
    return seg.text_codec().tokenizer.decode(item["input_ids"][item["labels"] != -100], skip_special_tokens=False)


def _lora_layers(seg):
    from peft.tuners.lora import LoraLayer

    return [n for n, m in seg.base_network.named_modules() if isinstance(m, LoraLayer)]


def _perturb(seg, seed=0):
    """Move LoRA-B (zero at init), the fully trained copies and the [SEG] rows away from the base weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in seg.net.named_parameters():
            if ".lora_B." in name or ".modules_to_save." in name or "trainable_tokens_delta" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


# the mask head each tiny kind is tested with (both SAM generations covered), and whether its embeddings are tied
TINY_SAM = {"llava": "sam", "internvl": "sam2", "qwen2_5_vl": "sam2", "qwen3_vl": "sam"}
TIED = {"internvl": True}


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    """kind -> (vlm folder, sam folder) of the tiny plain VLM of that kind + a tiny SAM / SAM 2, written once."""
    from medtune.models.vlm.seg.tiny import save_tiny_parts

    made = {}

    def get(kind):
        if kind not in made:
            made[kind] = save_tiny_parts(tmp_path_factory.mktemp(kind), vlm=kind, sam=TINY_SAM[kind],
                                         tie_word_embeddings=TIED.get(kind, False))
        return made[kind]

    return get


@pytest.fixture(scope="module")
def internvl_parts(tiny_parts):
    return tiny_parts("internvl")


@pytest.fixture(scope="module")
def llava_parts(tiny_parts):
    return tiny_parts("llava")


@pytest.fixture(scope="module")
def internvl_lora(internvl_parts):
    torch.manual_seed(0)
    return build_model(_parts_cfg(internvl_parts)).eval()


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


# ------------------------------------------------------------------------------------------------ text codec
def test_codec_supervises_exactly_the_answer_and_end_of_turn(internvl_lora):
    seg = internvl_lora
    codec = seg.text_codec()
    image = torch.rand(3, 40, 48)
    item = seg.encode(image, QUESTION, ANSWER)
    ids, labels = item["input_ids"], item["labels"]
    assert ids.shape == labels.shape == item["attention_mask"].shape and ids.dtype == torch.long
    # the plain VLM's supervision: the answer and its end-of-turn token; [SEG] is answer text, not the end of turn
    assert _supervised_text(seg, item) == ANSWER + "<|im_end|>"
    assert codec.decode(ids[labels != -100]) == ANSWER  # decoded answers keep [SEG]
    image_id = seg.base_network.vlm.config.image_token_id
    assert (labels != -100).nonzero().min() > (ids == image_id).nonzero().max()  # answer after the image
    # the image placeholder expanded by the VLM's own processor to its image token count, once; one [SEG] id
    assert int((ids == image_id).sum()) == 4 and int((ids == seg.seg_token_id).sum()) == 1
    assert item["pixel_values"].shape[0] == 1 and item["sam_image"].dtype == torch.uint8
    text = codec.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\n<img>") and QUESTION in text
    assert text.endswith("<|im_end|>")  # the conversation ends at the last end-of-turn token (Sa2VA's)

    prompt = seg.encode(image, QUESTION, None)
    assert (prompt["labels"] == -100).all()
    assert torch.equal(prompt["input_ids"], ids[: len(prompt["input_ids"])])  # generation continues this prefix
    assert codec.tokenizer.decode(prompt["input_ids"]).endswith("<|im_start|>assistant\n")

    clone = pickle.loads(pickle.dumps(codec))  # DataLoader workers
    turns = [{"role": "user", "content": "<image>" + QUESTION}, {"role": "assistant", "content": TWO_SEG}]
    from PIL import Image

    pil = Image.new("RGB", (40, 48))
    assert torch.equal(clone.encode(turns, pil, "a")["labels"], codec.encode(turns, pil, "a")["labels"])
    with pytest.raises(ValueError, match=re.escape("[SEG]")):
        seg.encode(image, "segment [SEG] please", ANSWER)
    short = pickle.loads(pickle.dumps(codec))
    short.max_length = len(ids) - 1
    with pytest.raises(ValueError, match="max_length"):
        short.encode(turns, pil, "a")


def test_codec_puts_each_question_in_its_own_turn_and_supervises_every_answer(internvl_lora):
    """Two referring expressions: two user turns (the image in the first only, as Sa2VA's data), each answered;
    the prompt of turn 2 is the teacher-forced sequence up to it, and turn by turn it is what generation builds."""
    seg = internvl_lora
    codec = seg.text_codec()
    image = torch.rand(3, 40, 48)
    q1, q2 = "Please segment the left blob in this image.", "Please segment the right blob in this image."
    item = seg.encode(image, [q1, q2], [ANSWER, ANSWER])
    ids, labels = item["input_ids"], item["labels"]
    text = codec.tokenizer.decode(ids, skip_special_tokens=False)
    assert text == (f"<|im_start|>user\n<img>{'<IMG_CONTEXT>' * 4}</img>{q1}<|im_end|>\n<|im_start|>assistant\n"
                    f"{ANSWER}<|im_end|>\n<|im_start|>user\n{q2}<|im_end|>\n<|im_start|>assistant\n{ANSWER}<|im_end|>")
    assert int((ids == seg.seg_token_id).sum()) == 2
    supervised = (labels != -100).int()
    # two supervised spans, each exactly "It is [SEG].<|im_end|>", and nothing of the second question among them
    starts = ((supervised[1:] - supervised[:-1]) == 1).nonzero().flatten() + 1
    ends = ((supervised[1:] - supervised[:-1]) == -1).nonzero().flatten() + 1
    spans = [codec.tokenizer.decode(ids[a:b], skip_special_tokens=False)
             for a, b in zip(starts.tolist(), ends.tolist() + [len(ids)])]
    assert spans == [ANSWER + "<|im_end|>"] * 2
    assert torch.equal(labels[labels != -100], ids[labels != -100])

    # the prompt for turn 2 is the training sequence's prefix, and the first turn + continuation_ids builds it
    first = seg.encode(image, q1, ANSWER)["input_ids"]
    prompt2 = seg.encode(image, [q1, q2], [ANSWER])
    assert (prompt2["labels"][len(first):] == -100).all()
    assert torch.equal(prompt2["input_ids"], ids[: len(prompt2["input_ids"])])
    turns = [{"role": "user", "content": "<image>" + q1}, {"role": "assistant", "content": ANSWER},
             {"role": "user", "content": q2}]
    assert first.tolist() + codec.continuation_ids(turns, "a") == prompt2["input_ids"].tolist()
    # a single question is unchanged by the multi-turn conversation (same ids as a one-element list)
    assert torch.equal(first, seg.encode(image, [q1], [ANSWER])["input_ids"])
    with pytest.raises(ValueError, match="2 questions need 2 answers"):
        seg.encode(image, [q1, q2], [ANSWER, ANSWER, ANSWER])


def test_generate_turns_matches_the_teacher_forced_conversation(internvl_lora):
    """Turn-by-turn generation (each turn continuing the generated history) gives, for a scripted model that
    answers like training, the teacher-forced masks of the two-turn conversation; the masks are split per answer,
    and an answer without [SEG] gets none."""
    seg = internvl_lora
    codec = seg.text_codec()
    q1, q2 = "Please segment the left blob in this image.", "Please segment the right blob in this image."
    image = torch.rand(1, 3, 36, 44, generator=torch.Generator().manual_seed(1))
    script = iter([ANSWER, ANSWER, ANSWER, "There is no object."])

    def scripted_generate(input_ids, **kwargs):
        answer = codec.tokenizer(next(script), add_special_tokens=False)["input_ids"] + [codec.end_of_turn_id]
        return torch.cat([input_ids, torch.tensor([answer])], dim=1)

    vlm = seg.base_network.vlm
    with mock.patch.object(type(vlm), "generate", side_effect=scripted_generate), torch.no_grad():
        answers, masks = seg.generate_turns(image, [q1, q2], max_new_tokens=16)
        teacher = seg.teacher_forced_masks(image, [q1, q2], [ANSWER, ANSWER])
        answers_none, masks_none = seg.generate_turns(image, [q1, q2], max_new_tokens=16)
    assert answers == [ANSWER, ANSWER] and [m.shape for m in masks] == [(1, 36, 44)] * 2
    # relative tolerances: the tiny random SAM 2 gives logits of ~1e-5
    assert torch.allclose(torch.cat(masks), teacher, rtol=1e-4, atol=1e-10)
    assert not torch.allclose(teacher[0], teacher[1], rtol=1e-2, atol=1e-10)  # the two turns' [SEG] differ
    assert answers_none == [ANSWER, "There is no object."] and [m.shape[0] for m in masks_none] == [1, 0]
    assert torch.allclose(masks_none[0], teacher[0:1], rtol=1e-3, atol=1e-10)  # turn 1 never sees turn 2


def test_llava_codec_uses_the_real_processor_expansion(llava_parts):
    seg = build_model(_parts_cfg(llava_parts))
    assert type(seg.processor).__name__ == "LlavaProcessor"
    vlm = seg.base_network.vlm
    item = seg.encode(torch.rand(3, 40, 48), QUESTION, ANSWER)
    assert int((item["input_ids"] == vlm.config.image_token_id).sum()) == 16  # 4 x 4 patches of 8 px
    assert _supervised_text(seg, item) == "It is [SEG].<|im_end|>"


# ------------------------------------------------------------------------------------------------ LoRA placement
def test_lora_only_on_the_language_model_and_the_mask_path_alone_reaches_it(kind, tiny_parts):
    seg = build_model(_parts_cfg(tiny_parts(kind)))
    assert seg.is_peft
    net = seg.base_network
    landed = _lora_layers(seg)
    # every linear of the language model: the ones now wrapped (their base_layer) plus any left plain
    n_lm_linears = sum(1 for n, m in net.named_modules()
                       if n.startswith("vlm.model.language_model.layers.") and isinstance(m, torch.nn.Linear)
                       and not re.search(r"\.lora_[AB](\.|$)", n))
    assert len(landed) == n_lm_linears == 2 * 7
    assert all(n.startswith("vlm.model.language_model.layers.") for n in landed)
    # the trap the anchored regex avoids: vision towers have linears with the language model's names (q_proj in
    # CLIP / InternViT, gate_proj / up_proj in Qwen2.5-VL's); none of the vision tower's linears gets an adapter
    vision = f"vlm.{seg.parts.vision}."
    vision_linears = [n for n, m in net.named_modules() if n.startswith(vision) and isinstance(m, torch.nn.Linear)]
    lm_names = {n.rsplit(".", 1)[-1] for n in landed}
    assert vision_linears and not set(vision_linears) & set(landed)
    assert kind == "qwen3_vl" or {n.rsplit(".", 1)[-1] for n in vision_linears} & lm_names

    trainable = [n for n, _ in seg.trainable_named_parameters()]
    assert all(re.search(r"\.lora_[AB]\.", n) or ".modules_to_save." in n or "trainable_tokens_delta" in n
               for n in trainable), trainable
    assert {n.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for n in trainable if ".modules_to_save." in n} == \
        {"mask_decoder", "seg_projection"}
    tokens = [n for n in trainable if "trainable_tokens_delta" in n]
    tied = net.config.tie_word_embeddings
    # tied: one [SEG] row (the lm_head wrapper shares it); untied: the embedding row and the lm_head row
    assert len(tokens) == (1 if tied else 2) and all(p.numel() == net.vlm.config.get_text_config().hidden_size
                                                   for n, p in seg.trainable_named_parameters() if n in tokens)
    unused = seg.frozen_by_design()
    assert not [n for n in trainable if re.search(unused, n)]
    assert any(re.search(unused, n) for n, _ in seg.named_parameters() if "iou_prediction_head" in n)

    # gradient through the MASK path alone (lm loss weight 0) reaches every adapter of the language model
    seg.train()
    out = seg(batch=_batch(seg, [(QUESTION, ANSWER), (QUESTION, TWO_SEG)]))
    out.mask_logits[out.mask_valid].sigmoid().mean().backward()  # lm loss weight 0: masks only
    grads = {n: p.grad for n, p in seg.trainable_named_parameters()}
    lora_b = {n: g for n, g in grads.items() if ".lora_B." in n}
    assert len(lora_b) == 2 * 7 and all(g is not None and g.abs().sum() > 0 for g in lora_b.values())
    # LoRA-A gets nothing on the first step (B = 0), pitfall 2: a preflight must look at B
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".lora_A." in n)
    reached = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
    for part in ("mask_decoder.modules_to_save", "seg_projection.modules_to_save", "embed_tokens.token_adapter"):
        assert any(part in n for n in reached), part

    # a training step moves the LoRA weights and the [SEG] row, and generation runs turn by turn
    before = {n: p.detach().clone() for n, p in seg.trainable_named_parameters()}
    torch.optim.SGD([p for _, p in seg.trainable_named_parameters()], lr=1.0).step()
    moved = {n for n, p in seg.trainable_named_parameters() if not torch.equal(p.detach(), before[n])}
    assert all(n in moved for n in lora_b) and any("trainable_tokens_delta" in n for n in moved)
    seg.eval()
    with torch.no_grad():
        answers, masks = seg.generate_turns(torch.rand(1, 3, 36, 44), [QUESTION, QUESTION], max_new_tokens=3)
    assert len(answers) == 2 and [m.shape[0] for m in masks] == [a.count("[SEG]") for a in answers]
    # untied: the lm_head's [SEG] row learns from the LM loss only; of SAM 2's three candidate-mask heads (best
    # predicted IoU, as Sa2VA) only the chosen ones learn from a batch
    chosen = seg.selected_by_prediction()
    assert (chosen is not None) == (seg.sam_kind == "sam2")
    if chosen:
        assert any(re.search(chosen, n) for n in reached)
    assert all("lm_head" in n or (chosen and re.search(chosen, n))
               for n in grads if n not in reached and ".lora_A." not in n)


def test_vision_lora_projector_flags_and_stray_adapters_refused(internvl_parts):
    seg = build_model(_parts_cfg(internvl_parts, vlm={"vision_lora": True, "train_projector": True}))
    landed = _lora_layers(seg)
    assert any(n.startswith("vlm.model.vision_tower.") for n in landed)
    assert not any("multi_modal_projector" in n for n in landed)
    assert any("multi_modal_projector.modules_to_save." in n for n, _ in seg.trainable_named_parameters())
    # a user regex reaching into the vision tower without model.vlm.vision_lora is refused after wrapping
    with pytest.raises(ValueError, match="vision_lora"):
        build_model(_parts_cfg(internvl_parts, lora={"target_modules": r".*\.q_proj$"}))
    sam_lora = build_model(_parts_cfg(internvl_parts, vlm={"sam_encoder_lora": True}))
    assert any(n.startswith("sam.vision_encoder.") for n in _lora_layers(sam_lora))


# ------------------------------------------------------------------------------------------------ forward
def test_forward_masks_valid_slots_and_lm_loss(internvl_lora):
    seg = internvl_lora
    batch = _batch(seg, [(QUESTION, ANSWER), (QUESTION, TWO_SEG)], size=(40, 48))
    with torch.no_grad():
        out = seg(batch=batch)
        full = seg(batch={**batch, LOGITS_AT: ALL_POSITIONS})
    assert out.mask_logits.shape == (2, 2, 40, 48)  # K = most [SEG] in one sequence, at the input resolution
    assert out.mask_valid.tolist() == [[True, False], [True, True]]
    assert (out.mask_logits[0, 1] == 0).all() and out.mask_logits[1, 1].abs().sum() > 0
    assert not torch.allclose(out.mask_logits[1, 0], out.mask_logits[1, 1])  # two [SEG], two prompts
    # lm_loss is the CE of the next token on the supervised (answer + end-of-turn) positions only
    logits, labels = full.token_logits, batch["labels"]
    assert logits.shape[:2] == labels.shape
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.lm_loss, expected, atol=1e-5)
    # by default the logits are computed only where the loss reads them (never at the image tokens)
    assert out.logit_positions.tolist() == (labels[:, 1:] != -100).any(0).nonzero().flatten().tolist()
    assert torch.allclose(out.token_logits, logits[:, out.logit_positions], atol=1e-5)
    # a sample's masks do not depend on what else is in the batch (padding is masked)
    with torch.no_grad():
        alone = seg(batch=_batch(seg, [(QUESTION, ANSWER)], size=(40, 48)))
    assert torch.allclose(alone.mask_logits[0, 0], out.mask_logits[0, 0], atol=1e-4)
    with torch.no_grad():
        no_seg = seg(batch=_batch(seg, [(QUESTION, "There is no object.")]))
    assert no_seg.mask_logits.shape == (1, 0, 40, 48) and no_seg.mask_valid.shape == (1, 0)


def test_gradient_checkpointing_and_grayscale_still_train_lora(internvl_parts):
    seg = build_model(_parts_cfg(internvl_parts, channels=1, gradient_checkpointing=True)).train()
    assert seg.base_network.vlm.is_activation_checkpointing
    out = seg(batch=_batch(seg, [(QUESTION, ANSWER)], size=(30, 50), channels=1))
    assert out.mask_logits.shape == (1, 1, 30, 50)
    (out.mask_logits.mean() + out.lm_loss).backward()
    lora_b = [p.grad for n, p in seg.trainable_named_parameters() if ".lora_B." in n]
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b)


# ------------------------------------------------------------------------------------------------ reference / round trips
def test_a_trained_folder_whose_tokenizer_lost_seg_is_refused_in_one_line(internvl_lora, tmp_path):
    """A composed (trained) segmenting VLM whose tokenizer has no [SEG]: adding the token anew could give it another,
    untrained row without a word, so the folder is refused and re-exporting named."""
    folder = tmp_path / "composed"
    internvl_lora.save_base(folder)
    tokenizer = folder / "vlm" / "tokenizer.json"
    data = json.loads(tokenizer.read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "[SEG]"]
    data["model"]["vocab"].pop("[SEG]", None)
    tokenizer.write_text(json.dumps(data))
    config = folder / "vlm" / "tokenizer_config.json"
    meta = json.loads(config.read_text())
    meta["added_tokens_decoder"] = {k: v for k, v in meta.get("added_tokens_decoder", {}).items()
                                    if v["content"] != "[SEG]"}
    config.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"the tokenizer has no '\[SEG\]'.*export the run again") as err:
        build_model(build_config({"model": {"family": "segvlm", "path": str(folder)}}))
    assert "\n" not in str(err.value)


def test_noop_reference_adapter_round_trips_and_merged_export(kind, tiny_parts, tmp_path):
    from peft import PeftModel

    parts = tiny_parts(kind)
    cfg = _parts_cfg(parts)
    full = _parts_cfg(parts, finetune="full")
    torch.manual_seed(0)  # the grown [SEG] row is sampled: same seed, same base
    seg = build_model(cfg).eval()
    torch.manual_seed(0)
    base = build_model(full).eval()
    batch = _batch(seg, [(QUESTION, TWO_SEG)])
    seg_id = seg.seg_token_id
    with torch.no_grad():
        at_init, reference = seg(batch=batch), base(batch=batch)
    assert torch.allclose(at_init.mask_logits, reference.mask_logits, atol=1e-5)  # B = 0: a no-op
    assert torch.allclose(at_init.token_logits, reference.token_logits, atol=1e-5)
    _perturb(seg)
    with torch.no_grad():
        adapted = seg(batch=batch)
        with seg.adapters_disabled():
            disabled = seg(batch=batch)
    assert torch.allclose(disabled.mask_logits, reference.mask_logits, atol=1e-5)
    assert torch.allclose(disabled.token_logits, reference.token_logits, atol=1e-5)
    assert not torch.allclose(adapted.mask_logits, reference.mask_logits, atol=1e-3)
    # the [SEG] output row trains too (tied: through the embedding row; untied: its own lm_head row)
    assert not torch.allclose(adapted.token_logits[..., seg_id], reference.token_logits[..., seg_id], atol=1e-3)

    ckpt = tmp_path / "ckpt"
    save_trainable(seg, ckpt)
    from safetensors import safe_open

    with safe_open(str(ckpt / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("trainable_tokens_delta" in k for k in keys)
    assert not any(k.endswith(("embed_tokens.weight", "lm_head.weight")) for k in keys)  # rows, not matrices

    # plain PEFT loads our adapter onto a freshly composed base (another seed: the adapter carries [SEG]'s rows)
    torch.manual_seed(1)
    fresh = build_model(full).eval()
    fresh.net = PeftModel.from_pretrained(fresh.net, str(ckpt / "adapter"))
    with torch.no_grad():
        peft_loaded = fresh(batch=batch)
    assert torch.allclose(peft_loaded.mask_logits, adapted.mask_logits, atol=1e-5)
    assert torch.allclose(peft_loaded.token_logits, adapted.token_logits, atol=1e-5)

    torch.manual_seed(2)
    again = build_model(cfg).eval()
    load_trainable(again, ckpt)
    assert again.param_counts()[0] == seg.param_counts()[0] > 0
    with torch.no_grad():
        assert torch.allclose(again(batch=batch).mask_logits, adapted.mask_logits, atol=1e-5)

    merged_dir = export_merged(seg, tmp_path / "merged")
    assert seg.is_peft and seg.param_counts()[0] > 0  # the live model keeps its adapters
    assert sorted(p.name for p in merged_dir.iterdir()) == ["projection.safetensors", "sam", "segvlm.json", "vlm"]
    assert "[SEG]" in (merged_dir / "vlm" / "tokenizer.json").read_text()
    merged = build_model(_cfg(path=str(merged_dir), finetune="full")).eval()
    with torch.no_grad():
        out = merged(batch=batch)
    assert torch.allclose(out.mask_logits, adapted.mask_logits, atol=1e-4)
    assert torch.allclose(out.token_logits, adapted.token_logits, atol=1e-4)
    assert _cfg(path=str(merged_dir)).finetune_mode() == "lora"  # a composed folder is pretrained: auto -> LoRA


def test_full_finetune_tiny_preset_trains_everything_reachable(tmp_path):
    torch.manual_seed(3)
    cfg = _cfg(config={"preset": "tiny", "vlm": "llava", "sam": "sam2"})
    assert cfg.finetune_mode() == "full"
    seg = build_model(cfg).train()
    out = seg(batch=_batch(seg, [(QUESTION, TWO_SEG), (QUESTION, ANSWER)]))
    (out.mask_logits[out.mask_valid].mean() + out.lm_loss).backward()
    trainable = seg.trainable_named_parameters()
    dead = [n for n, p in trainable if p.grad is None or p.grad.abs().sum() == 0]
    # frozen_by_design names exactly what cannot reach the outputs (incl. LLaVA's last CLIP layer); of SAM 2's three
    # candidate-mask heads only those the best predicted IoU picks are reached
    chosen = seg.selected_by_prediction()
    assert chosen and not [n for n in dead if not re.search(chosen, n)]
    assert len([n for n in dead if re.search(chosen, n)]) < len([n for n, _ in trainable if re.search(chosen, n)])
    frozen = [n for n, p in seg.named_parameters() if not p.requires_grad]
    assert any("iou_prediction_head" in n for n in frozen)

    seg.zero_grad(set_to_none=True)
    seg.eval()
    batch = _batch(seg, [(QUESTION, TWO_SEG)])
    save_trainable(seg, tmp_path / "ckpt")
    torch.manual_seed(4)
    other = build_model(cfg).eval()
    load_trainable(other, tmp_path / "ckpt")
    seeded = build_model(_cfg(path=str(tmp_path / "ckpt" / "model"), finetune="full")).eval()
    with torch.no_grad():
        expected = seg(batch=batch).mask_logits
        assert torch.allclose(other(batch=batch).mask_logits, expected, atol=1e-5)
        assert torch.allclose(seeded(batch=batch).mask_logits, expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------ generation
def test_generate_masks_matches_the_teacher_forced_forward(internvl_lora):
    seg = internvl_lora
    image = torch.rand(1, 3, 36, 44)
    answer, masks = seg.generate_masks(image, QUESTION, max_new_tokens=6)
    assert isinstance(answer, str) and masks.shape == (answer.count("[SEG]"), 36, 44)

    # a generation that says "Sure, [SEG] and [SEG]." (the tiny random model rarely does by itself)
    scripted = seg.encode(image[0], QUESTION, TWO_SEG)["input_ids"][None]
    vlm = seg.base_network.vlm
    with mock.patch.object(type(vlm), "generate", return_value=scripted):
        answer, masks = seg.generate_masks(image, QUESTION, max_new_tokens=16)
    assert answer == TWO_SEG and masks.shape == (2, 36, 44)
    with torch.no_grad():
        teacher = seg.teacher_forced_masks(image, QUESTION, TWO_SEG)
    assert torch.allclose(masks, teacher, atol=1e-5)
    assert masks.requires_grad  # the mask forward is not cut: differentiable for the caller who wants it


# ------------------------------------------------------------------------------------------------ bad input
def test_remote_code_vlm_folder_needs_the_flag(internvl_parts, tmp_path):
    vlm_path, sam_path = internvl_parts
    remote = tmp_path / "remote-vlm"
    shutil.copytree(vlm_path, remote)
    meta = json.loads((remote / "config.json").read_text())
    meta["auto_map"] = {"AutoModel": "modeling_internvl_chat.InternVLChatModel"}
    (remote / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError) as err:
        build_model(_parts_cfg((remote, sam_path)))
    assert str(remote) in str(err.value) and "model.trust_remote_code=true" in str(err.value)


def test_wrong_folders_and_sources_are_one_line_errors(internvl_parts, tmp_path):
    vlm_path, sam_path = internvl_parts
    with pytest.raises(ValueError, match="not SAM or SAM 2") as err:
        build_model(_parts_cfg((vlm_path, vlm_path)))
    assert str(vlm_path) in str(err.value) and "model.vlm.sam_path" in str(err.value)
    with pytest.raises(ValueError, match="not a VLM"):
        build_model(_parts_cfg((sam_path, sam_path)))
    with pytest.raises(ValueError, match="model.vlm.sam_path"):
        build_model(_cfg(vlm={"vlm_path": str(vlm_path)}))
    with pytest.raises(ValueError, match="segvlm.json"):
        build_model(_cfg(path=str(vlm_path)))
    with pytest.raises(ValueError, match="not both"):
        build_model(_cfg(path=str(vlm_path), vlm={"vlm_path": str(vlm_path), "sam_path": str(sam_path)}))
    with pytest.raises(ValueError, match="preset"):
        build_model(_cfg())


def test_chat_template_without_image_placeholder(internvl_parts):
    text_only = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                 "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ValueError, match="image placeholder") as err:
        build_model(_parts_cfg(internvl_parts, vlm={"chat_template": text_only}))
    assert "model.vlm.chat_template" in str(err.value)


def test_seg_token_split_into_several_ids_is_refused(internvl_parts, tmp_path):
    vlm_path, sam_path = internvl_parts
    splitting = tmp_path / "splitting-vlm"
    shutil.copytree(vlm_path, splitting)
    tok_cfg = json.loads((splitting / "tokenizer_config.json").read_text())
    tok_cfg["split_special_tokens"] = True  # special tokens then tokenise as plain text
    (splitting / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    with pytest.raises(ValueError, match=r"tokenises to \d+ ids") as err:
        build_model(_parts_cfg((splitting, sam_path)))
    assert str(splitting) in str(err.value) and "seg_token" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_qlora_refused_without_cuda(internvl_parts):
    with pytest.raises(ValueError, match="CUDA GPU and bitsandbytes"):
        build_model(_parts_cfg(internvl_parts, quantize_4bit=True))
    with pytest.raises(ValueError, match="quantises a pretrained VLM"):
        build_model(_cfg(config={"preset": "tiny"}, quantize_4bit=True, finetune="lora"))


def test_sam2_video_checkpoint_is_a_valid_sam_path(internvl_parts, tmp_path):
    from transformers import Sam2VideoModel

    from medtune.models.video import tiny_sam2_video_config

    video = tmp_path / "sam2-video"
    torch.manual_seed(0)
    Sam2VideoModel(tiny_sam2_video_config()).save_pretrained(video)
    seg = build_model(_parts_cfg((internvl_parts[0], video)))
    # loaded whole (its memory kept through training and export), trained on images: the memory stays frozen
    assert type(seg.base_network.sam).__name__ == "Sam2VideoModel"
    assert not any("memory_" in n for n, _ in seg.trainable_named_parameters())
    ref = Sam2VideoModel.from_pretrained(video)
    assert torch.equal(seg.base_network.sam.vision_encoder.neck.convs[0].weight,
                       ref.vision_encoder.neck.convs[0].weight)


# ------------------------------------------------------------------------------------------------ Sa2VA import
# Checkpoint key names of the original modules, from public code that reads real SAM 2 / InternVL / InternLM2
# checkpoints: the fake Sa2VA state dict below must contain them, so the importer is tested against real names.
SAM2_ANCHORS = ["image_encoder.trunk.pos_embed", "image_encoder.trunk.pos_embed_window",
                "image_encoder.trunk.patch_embed.proj.weight", "image_encoder.neck.convs.0.conv.weight", "no_mem_embed",
                "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
                "sam_mask_decoder.transformer.norm_final_attn.weight", "sam_mask_decoder.conv_s0.weight",
                "sam_mask_decoder.mask_tokens.weight", "sam_mask_decoder.output_upscaling.0.weight",
                "sam_mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"]
INTERNVL_ANCHORS = ["vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
                    "vision_model.embeddings.position_embedding", "vision_model.encoder.layers.0.attn.qkv.weight",
                    "vision_model.encoder.layers.0.attn.proj.weight", "vision_model.encoder.layers.0.ls1",
                    "vision_model.encoder.layers.0.norm1.weight", "vision_model.encoder.layers.0.mlp.fc1.weight",
                    "mlp1.0.weight", "mlp1.1.weight", "mlp1.3.weight", "text_hidden_fcs.0.weight",
                    "text_hidden_fcs.2.weight"]
INTERNLM2_ANCHORS = ["language_model.model.tok_embeddings.weight", "language_model.model.layers.0.attention.wqkv.weight",
                     "language_model.model.layers.0.attention.wo.weight",
                     "language_model.model.layers.0.feed_forward.w1.weight",
                     "language_model.model.layers.0.attention_norm.weight",
                     "language_model.model.layers.0.ffn_norm.weight", "language_model.output.weight"]
# memory / video parts of Sa2VA's SAM 2 (kept by the importer in sam/, a Sam2VideoModel checkpoint)
SAM2_VIDEO_ANCHORS = ["memory_attention.layers.0.linear1.weight", "maskmem_tpos_enc", "no_obj_ptr", "no_mem_pos_enc",
                   "obj_ptr_proj.layers.0.weight", "mask_downsample.weight", "memory_encoder.fuser.layers.0.pwconv2.bias"]


def _original_vision(name: str) -> str:
    """transformers InternVL vision name -> InternViT's (written out, not inverted from the importer's map)."""
    n = name.replace("model.vision_tower.", "vision_model.").replace("encoder.layer.", "encoder.layers.")
    n = n.replace("embeddings.cls_token", "embeddings.class_embedding")
    n = n.replace("embeddings.position_embeddings", "embeddings.position_embedding")
    n = n.replace("embeddings.patch_embeddings.projection", "embeddings.patch_embedding")
    n = re.sub(r"\.lambda_(\d)", r".ls\1", n).replace("attention.projection_layer", "attn.proj")
    return n.replace("attention.", "attn.").replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")


def _original_sam2(name: str) -> str:
    """Sam2Model / Sam2VideoModel name -> the SAM 2 repository's (Sa2VA's)."""
    rules = [(r"^memory_encoder\.mask_downsampler\.layers\.(\d+)\.conv\.",
              lambda m: f"memory_encoder.mask_downsampler.encoder.{3 * int(m.group(1))}."),
             (r"^memory_encoder\.mask_downsampler\.layers\.(\d+)\.layer_norm\.",
              lambda m: f"memory_encoder.mask_downsampler.encoder.{3 * int(m.group(1)) + 1}."),
             (r"^memory_encoder\.mask_downsampler\.final_conv\.", "memory_encoder.mask_downsampler.encoder.12."),
             (r"^memory_encoder\.feature_projection\.", "memory_encoder.pix_feat_proj."),
             (r"^memory_encoder\.projection\.", "memory_encoder.out_proj."),
             (r"^memory_encoder\.memory_fuser\.layers\.(\d+)\.scale$", r"memory_encoder.fuser.layers.\1.g_weight"),
             (r"^memory_encoder\.memory_fuser\.", "memory_encoder.fuser."), (r"\.depthwise_conv\.", ".dwconv."),
             (r"\.pointwise_conv(\d)\.", r".pwconv\1."), (r"^memory_temporal_positional_encoding$", "maskmem_tpos_enc"),
             (r"^no_memory_positional_encoding$", "no_mem_pos_enc"), (r"^no_object_pointer$", "no_obj_ptr"),
             (r"^object_pointer_proj\.proj_in\.", "obj_ptr_proj.layers.0."),
             (r"^object_pointer_proj\.layers\.0\.", "obj_ptr_proj.layers.1."),
             (r"^object_pointer_proj\.proj_out\.", "obj_ptr_proj.layers.2."),
             (r"^vision_encoder\.backbone\.", "image_encoder.trunk."),
             (r"^vision_encoder\.neck\.convs\.(\d+)\.", r"image_encoder.neck.convs.\1.conv."),
             (r"^prompt_encoder\.", "sam_prompt_encoder."), (r"^mask_decoder\.", "sam_mask_decoder."),
             (r"^no_memory_embedding$", "no_mem_embed"),
             (r"shared_embedding\.positional_embedding", "pe_layer.positional_encoding_gaussian_matrix"),
             (r"mask_embed\.conv1", "mask_downscaling.0"), (r"mask_embed\.layer_norm1", "mask_downscaling.1"),
             (r"mask_embed\.conv2", "mask_downscaling.3"), (r"mask_embed\.layer_norm2", "mask_downscaling.4"),
             (r"mask_embed\.conv3", "mask_downscaling.6"), (r"patch_embed\.projection", "patch_embed.proj"),
             (r"upscale_conv1", "output_upscaling.0"), (r"upscale_layer_norm", "output_upscaling.1"),
             (r"upscale_conv2", "output_upscaling.3"),
             (r"\.mlp\.proj_in\.", ".mlp.layers.0."), (r"\.mlp\.proj_out\.", ".mlp.layers.1."),
             (r"(head|mlps\.\d+)\.layers\.0\.", r"\1.layers.1."), (r"(head|mlps\.\d+)\.proj_in\.", r"\1.layers.0."),
             (r"(head|mlps\.\d+)\.proj_out\.", r"\1.layers.2."),
             (r"\.layer_norm", ".norm"), (r"\.o_proj\.", ".out_proj.")]
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def _fake_sa2va(vlm, sam, projection, llama: bool) -> dict:
    """A Sa2VA-named state dict holding the given parts' weights, in the original modules' layouts."""
    state, text = {}, vlm.config.text_config
    sd = {k: v.clone() for k, v in vlm.state_dict().items()}
    head_dim = text.hidden_size // text.num_attention_heads
    groups = text.num_attention_heads // text.num_key_value_heads
    for name in list(sd):
        if ".attention.q_proj." in name and name.startswith("model.vision_tower."):  # InternViT fuses q, k, v
            q, k, v = (sd.pop(name.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj"))
            state[_original_vision(name.replace("attention.q_proj", "attention.qkv"))] = torch.cat([q, k, v])
        elif name.startswith("model.vision_tower.") and name in sd and not re.search(r"\.[kv]_proj\.", name):
            state[_original_vision(name)] = sd.pop(name)
    projector = {"layer_norm": "mlp1.0", "linear_1": "mlp1.1", "linear_2": "mlp1.3"}
    for name in [n for n in sd if n.startswith("model.multi_modal_projector.")]:
        part, rest = name.split(".")[2], ".".join(name.split(".")[3:])
        state[f"{projector[part]}.{rest}"] = sd.pop(name)
    for name in [n for n in sd if n.startswith("model.language_model.") or n == "lm_head.weight"]:
        if name not in sd:
            continue
        value = sd.pop(name)
        if not llama:
            state["language_model.lm_head.weight" if name == "lm_head.weight"
                  else name.replace("model.language_model.", "language_model.model.")] = value
            continue
        if ".self_attn.q_proj." in name:  # InternLM2 wqkv: per KV head, its query heads then its key and value
            q, k, v = value, sd.pop(name.replace("q_proj", "k_proj")), sd.pop(name.replace("q_proj", "v_proj"))
            rows = []
            for h in range(text.num_key_value_heads):
                rows += [q[(h * groups + g) * head_dim:(h * groups + g + 1) * head_dim] for g in range(groups)]
                rows += [k[h * head_dim:(h + 1) * head_dim], v[h * head_dim:(h + 1) * head_dim]]
            name, value = name.replace("self_attn.q_proj", "attention.wqkv"), torch.cat(rows)
        for new, old in (("tok_embeddings", "embed_tokens"), ("attention.wo", "self_attn.o_proj"),
                         ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w2", "mlp.down_proj"),
                         ("feed_forward.w3", "mlp.up_proj"), ("attention_norm", "input_layernorm"),
                         ("ffn_norm", "post_attention_layernorm")):
            name = name.replace(old, new)
        state["language_model.output.weight" if name == "lm_head.weight"
              else name.replace("model.language_model.", "language_model.model.")] = value
    assert not sd, sorted(sd)
    for name, value in sam.state_dict().items():
        if name == "shared_image_embedding.positional_embedding":
            continue  # the original has one copy, in the prompt encoder
        if name == "prompt_encoder.point_embed.weight":
            for i in range(value.shape[0]):
                state[f"grounding_encoder.sam2_model.sam_prompt_encoder.point_embeddings.{i}.weight"] = value[i:i + 1]
            continue
        state[f"grounding_encoder.sam2_model.{_original_sam2(name)}"] = value.clone()
    for name, value in projection.state_dict().items():
        state[f"text_hidden_fcs.{name}"] = value.clone()
    state["vp_extractor.weight"] = torch.zeros(2)  # a part segvlm has no place for: reported, not loaded
    return state


def _tiny_sa2va_sam2_video(sam):
    """A Sam2VideoModel around the tiny SAM 2 ``sam`` (its weights), with a Sa2VA-like (SAM 2.0) memory: no temporal
    encoding of object pointers, no occlusion embedding; memories 16 channels wide."""
    from transformers import Sam2VideoConfig, Sam2VideoModel

    from medtune.models.video import fit_memory_width

    image = sam.config.to_dict()
    config = Sam2VideoConfig(
        vision_config=image["vision_config"], prompt_encoder_config=image["prompt_encoder_config"],
        mask_decoder_config=image["mask_decoder_config"], image_size=64, memory_attention_rope_feat_sizes=[4, 4],
        memory_attention_hidden_size=32, memory_attention_num_layers=1, memory_attention_feed_forward_hidden_size=64,
        memory_encoder_hidden_size=32, memory_encoder_output_channels=16, mask_downsampler_embed_dim=32,
        memory_fuser_embed_dim=32, memory_fuser_intermediate_dim=128, enable_occlusion_spatial_embedding=False,
        enable_temporal_pos_encoding_for_object_pointers=False)
    video = Sam2VideoModel(config)
    fit_memory_width(video)
    with torch.no_grad():
        for p in video.parameters():  # nothing zero or one: a mis-mapped tensor shows
            p.copy_(torch.randn_like(p) * 0.1)
    video.load_state_dict(sam.state_dict(), strict=False)
    return video


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_sa2va_import_maps_every_weight(llm, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText, LlamaConfig

    from medtune.models.vlm.sa2va_import import import_sa2va
    from medtune.models.vlm.seg.model import new_projection
    from medtune.models.vlm.seg.tiny import tiny_sam
    from medtune.models.vlm.tiny import tiny_tokenizer, tiny_vlm_config

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer("internvl")
    tokenizer.add_tokens(["[SEG]"], special_tokens=True)
    # Sa2VA-1B-like: 56 px tiles of 14 px patches
    config = tiny_vlm_config("internvl", tokenizer, {"image_size": 56, "vision_config": {"patch_size": [14, 14]}})
    text_size = {k: getattr(config.text_config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                           "num_attention_heads", "num_key_value_heads")}
    if llm == "internlm2":
        config.text_config = LlamaConfig(**text_size, vocab_size=len(tokenizer), tie_word_embeddings=False)
    config.vision_config.attention_bias = True  # InternViT-300M has qkv biases
    vlm = AutoModelForImageTextToText.from_config(config)
    sam, projection = tiny_sam("sam2"), new_projection(text_size["hidden_size"], 32)
    # SAM 2 has one positional Gaussian matrix (the prompt encoder's pe_layer); transformers keeps two equal copies
    sam.shared_image_embedding.positional_embedding.copy_(sam.prompt_encoder.shared_embedding.positional_embedding)
    video = _tiny_sa2va_sam2_video(sam)
    state = _fake_sa2va(vlm, video, projection, llama=llm == "internlm2")
    sam_keys = [k.removeprefix("grounding_encoder.sam2_model.") for k in state]
    assert set(SAM2_ANCHORS + SAM2_VIDEO_ANCHORS) <= set(sam_keys) and set(INTERNVL_ANCHORS) <= set(state)
    assert llm != "internlm2" or set(INTERNLM2_ANCHORS) <= set(state)

    src = tmp_path / "Sa2VA-tiny"
    tokenizer.save_pretrained(src)
    save_file(state, str(src / "model.safetensors"))
    vision = config.vision_config
    llm_config = {**config.text_config.to_dict(), "architectures": [
        "InternLM2ForCausalLM" if llm == "internlm2" else "Qwen2ForCausalLM"]}
    (src / "config.json").write_text(json.dumps({
        "architectures": ["Sa2VAChatModel"], "auto_map": {"AutoModel": "modeling_sa2va_chat.Sa2VAChatModel"},
        "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 32,
                          "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                          "image_size": 56, "patch_size": 14, "qkv_bias": True, "qk_normalization": False,
                          "norm_type": "layer_norm", "layer_norm_eps": vision.layer_norm_eps, "drop_path_rate": 0.0,
                          "use_flash_attn": False, "hidden_act": "gelu", "initializer_factor": 0.1},
        "llm_config": llm_config, "downsample_ratio": 0.5, "select_layer": -1, "ps_version": "v2",
        "template": "qwen_chat", "force_image_size": 56,
    }))
    out = import_sa2va(src, tmp_path / "composed", sam_config=sam.config)
    meta = json.loads((out / "segvlm.json").read_text())
    assert meta["unused_keys"] == ["vp_extractor.weight"]

    seg = build_model(_cfg(path=str(out), finetune="full")).eval()
    net = seg.base_network
    # the mask head is the whole SAM 2 (a Sam2VideoModel: the image path + the memory a video run trains)
    for got, want in ((net.vlm, vlm), (net.sam, video), (net.seg_projection, projection)):
        got_sd, want_sd = got.state_dict(), want.state_dict()
        assert set(got_sd) == set(want_sd)
        assert all(torch.equal(got_sd[k], want_sd[k]) for k in want_sd), [k for k in want_sd
                                                                           if not torch.equal(got_sd[k], want_sd[k])]
    # sam/ holds the whole SAM 2 (a Sam2VideoModel): memory included, every tensor as in the source
    from medtune.models.video import load_sam2_video

    got_sd, want_sd = load_sam2_video(out / "sam").state_dict(), video.state_dict()
    assert set(got_sd) == set(want_sd) and all(torch.equal(got_sd[k], want_sd[k]) for k in want_sd)
    item = seg.encode(torch.rand(3, 40, 48), QUESTION, ANSWER)
    # Sa2VA's tiling (1..12 tiles + thumbnail); per 56 px tile 4 x 4 patches, pixel-shuffled to 4 image tokens
    assert item["pixel_values"].shape[0] > 1
    assert int((item["input_ids"] == net.vlm.config.image_token_id).sum()) == 4 * item["pixel_values"].shape[0]
    with torch.no_grad():
        assert seg(batch=_batch(seg, [(QUESTION, ANSWER)])).mask_logits.shape == (1, 1, 40, 48)


# ------------------------------------------------------------------------------------------------ mask output
def test_mask_output_best_iou_by_default_for_sam2_and_single_head_on_request(internvl_parts):
    """SAM 2 (Sa2VA): the three multimask outputs, per prompt the one with the highest predicted IoU; ``single``
    (LISA, and the default for SAM): the single-mask head, token 0."""
    torch.manual_seed(0)
    best = build_model(_parts_cfg(internvl_parts)).eval()
    torch.manual_seed(0)
    single = build_model(_parts_cfg(internvl_parts, vlm={"mask_output": "single"})).eval()
    assert best.mask_output == "best_iou" and single.mask_output == "single"
    sam = best.base_network.sam
    pixels = torch.randn(2, 3, *best.image_prep.sam_size)
    prompts = torch.randn(2, 3, sam.config.prompt_encoder_config.hidden_size)  # 3 prompts per image
    with torch.no_grad():
        features = best._sam_features(sam, pixels)
        chosen = best._decode_masks(sam, features, prompts)
        head = single._decode_masks(single.base_network.sam, features, prompts)
        points = torch.zeros(2, 3, 1, 2)
        sparse, dense = sam.prompt_encoder(input_points=points, input_labels=-torch.ones(2, 3, 1, dtype=torch.int32),
                                           input_boxes=None, input_masks=None)
        positional = sam.get_image_wide_positional_embeddings().repeat(2, 1, 1, 1)
        all_masks = sam.mask_decoder(
            image_embeddings=features["image_embedding"], image_positional_embeddings=positional,
            sparse_prompt_embeddings=torch.cat([sparse, prompts[:, :, None]], dim=2), dense_prompt_embeddings=dense,
            multimask_output=False, high_resolution_features=features["high_res"])[0]
    assert chosen.candidates.shape[2] == 3 and head.candidates.shape[2] == 1
    for b in range(2):
        for k in range(3):
            i = int(chosen.iou_scores[b, k].argmax())
            assert int(chosen.index[b, k]) == i
            assert torch.equal(chosen.low_res[b, k], chosen.candidates[b, k, i])
    assert torch.allclose(head.low_res, all_masks[:, :, 0], atol=1e-6)  # token 0 (single-mask head)
    # the single-mask head trains only with "single"; the three candidate heads only with best_iou
    assert re.search(best.frozen_by_design(), "sam.mask_decoder.output_hypernetworks_mlps.0.proj_in.weight")
    assert not re.search(single.frozen_by_design(), "sam.mask_decoder.output_hypernetworks_mlps.0.proj_in.weight")
    assert re.search(single.frozen_by_design(), "sam.mask_decoder.output_hypernetworks_mlps.2.proj_in.weight")
    assert single.selected_by_prediction() is None


# ------------------------------------------------------------------------------------------------ Hulu-Med + SAM 2
HULUMED = REPO.parent / "shared" / "fixtures" / "hulumed-tiny" / "model"


@pytest.mark.skipif(not (HULUMED / "config.json").is_file(), reason=f"Hulu-Med fixture absent ({HULUMED})")
def test_native_hulumed_carries_the_mask_head_and_trains(internvl_parts):
    """The published Hulu-Med layout (medtune's own implementation, no remote code) + a tiny SAM 2: the VLM's own
    processor keys (grid_sizes, merge_sizes, modals) reach its forward, LoRA lands in its language model only, and a
    step through the mask path and the LM loss moves the adapters and the [SEG] row."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    seg = build_model(_parts_cfg((HULUMED, internvl_parts[1]))).train()
    assert (seg.parts.vision, seg.parts.projector) == ("model.vision_encoder", "model.mm_projector")
    landed = [n for n, m in seg.base_network.named_modules() if isinstance(m, LoraLayer)]
    assert landed and all(n.startswith("vlm.model.layers.") for n in landed)
    batch = _batch(seg, [(QUESTION, ANSWER)])
    assert {"grid_sizes", "merge_sizes"} <= set(batch)
    out = seg(batch=batch)
    assert out.mask_logits.shape == (1, 1, 40, 48) and out.lm_loss > 0
    (out.mask_logits.mean() + out.lm_loss).backward()
    before = {n: p.detach().clone() for n, p in seg.trainable_named_parameters()}
    torch.optim.SGD([p for _, p in seg.trainable_named_parameters()], lr=1.0).step()
    moved = {n for n, p in seg.trainable_named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any(".lora_B." in n for n in moved) and any("trainable_tokens_delta" in n for n in moved)
    assert moved and not [n for n in moved if "vlm.model.vision_encoder." in n]  # the vision encoder stays frozen
