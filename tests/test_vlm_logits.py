"""Token logits only where a loss or a sample needs them (models/vlm/logits.py): the LM loss of the instruct family,
GRPO's completion log-probs and the segmenting VLM's LM loss equal the full-logits computation (value and gradients
of every trainable tensor), the output head runs on those rows only, and a model without ``logits_to_keep`` falls
back to full logits with a note. Tiny models, CPU."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from medtune.config import build_config
from medtune.models.base import ModelOutput
from medtune.models.registry import build_model
from medtune.models.vlm.logits import ALL_POSITIONS, LOGITS_AT, forward_logits_at, token_loss
from medtune.models.vlm.model import SEQUENCE_KEYS, collate

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

KINDS = ("llava", "internvl", "qwen2_5_vl", "qwen3_vl")  # every tiny kind the vlm family builds
TURNS = [{"role": "user", "content": "<image>\nIs the lesion benign or malignant?"},
         {"role": "assistant", "content": "benign"},
         {"role": "user", "content": "Are you sure?"},
         {"role": "assistant", "content": "Yes, it is benign."}]
LOSS_ATOL = 1e-6  # what the issue asks: the same loss as from the full logits
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-5  # float32 rounding of the same sums in another order
PERTURB = 0.3  # moves LoRA-B (zero at init) and the trained copies away from the base weights
COMPLETION_TOKENS = 5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from medtune.models.vlm.tiny import save_tiny_vlm

    root = tmp_path_factory.mktemp("vlm-logits")
    return {kind: save_tiny_vlm(root / kind, kind, seed=0) for kind in KINDS}


def _image(seed, h=40, w=50):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def _instruct(folder, lora_targets: str | None = None):
    """LoRA on the language model (or on ``lora_targets``) + the projector trained fully (modules_to_save), moved
    off their init, eval mode (no dropout: two forwards must be comparable)."""
    lora = {"r": 4, **({"target_modules": lora_targets} if lora_targets else {})}
    cfg = build_config({"model": {"family": "vlm", "path": str(folder), "vlm": {"train_projector": True}},
                        "lora": lora})
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.add_(PERTURB * torch.randn(p.shape, generator=g))
    return model


def _head_rows(model_net):
    """Records the number of rows (positions x batch) each call of the output head projects."""
    rows: list[int] = []
    handle = model_net.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: rows.append(int(np.prod(args[0].shape[:-1]))))
    return rows, handle


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.trainable_named_parameters() if p.grad is not None}


def _assert_same_grads(got, expected):
    assert got.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=name)


# ------------------------------------------------------------------------------------------------ instruct LM loss
@pytest.mark.parametrize("kind", KINDS)
def test_instruct_loss_and_gradients_equal_full_logits_with_the_head_on_answer_rows_only(folders, kind):
    model = _instruct(folders[kind])
    items = [model.codec.encode(turns, _image(i), f"s{i}") for i, turns in enumerate([TURNS, TURNS[:2]])]
    batch = collate(items)
    labels = batch["labels"]
    b, t = labels.shape
    rows, handle = _head_rows(model.base_network)
    full_loss, full_grads = _loss_and_grads(model, lambda: model(batch={**batch, LOGITS_AT: ALL_POSITIONS}).lm_loss)
    loss, grads = _loss_and_grads(model, lambda: model(batch=batch).lm_loss)
    handle.remove()
    assert abs(float(loss) - float(full_loss)) <= LOSS_ATOL and float(loss) > 0
    _assert_same_grads(grads, full_grads)
    assert any(".modules_to_save." in n for n in grads) and any(".lora_B." in n for n in grads)
    # the head ran on every position before, now on the positions that predict an answer token (in any row)
    needed = (labels[:, 1:] != -100).any(0)
    assert rows == [b * t, b * int(needed.sum())] and int(needed.sum()) < t // 2
    out = model(batch=batch)
    image_ids = torch.tensor(sorted(model.codec.image_token_ids))
    assert not torch.isin(batch["input_ids"][:, out.logit_positions], image_ids).any()
    assert out.token_logits.shape == (b, int(needed.sum()), model.base_network.config.get_text_config().vocab_size)


def test_lora_on_the_output_head_gets_the_same_gradients(folders):
    """A user's LoRA on lm_head runs on the kept rows only and still learns exactly what it learnt before."""
    model = _instruct(folders["llava"], r"^(?:model\.language_model\.layers\.\d+\.self_attn\.q_proj|lm_head)$")
    batch = collate([model.codec.encode(TURNS, _image(0), "s0")])
    full_loss, full_grads = _loss_and_grads(model, lambda: model(batch={**batch, LOGITS_AT: ALL_POSITIONS}).lm_loss)
    loss, grads = _loss_and_grads(model, lambda: model(batch=batch).lm_loss)
    assert abs(float(loss) - float(full_loss)) <= LOSS_ATOL
    _assert_same_grads(grads, full_grads)
    head = [n for n in grads if "lm_head.lora_" in n]
    assert len(head) == 2 and all(grads[n].abs().sum() > 0 for n in head)


# ------------------------------------------------------------------------------------------------ GRPO log-probs
@pytest.mark.parametrize("kind", KINDS)
def test_grpo_completion_logprobs_and_gradients_equal_full_logits(folders, kind):
    from medtune.text_policy import token_logprobs
    from medtune.train.rl_answers import completion_logits

    model = _instruct(folders[kind])
    codec = model.codec
    items = [codec.encode(turns, _image(i), f"s{i}", for_generation=True) for i, turns in enumerate([TURNS, TURNS[:2]])]
    prompts = collate(items, "left")  # prompts of different lengths: left padding
    assert (prompts["attention_mask"][:, 0] == 0).any()
    g = torch.Generator().manual_seed(1)
    allowed = torch.tensor(sorted(set(range(len(codec.tokenizer))) - set(codec.suppress_ids)))
    completions = allowed[torch.randint(len(allowed), (2, COMPLETION_TOKENS), generator=g)]
    mask = torch.ones(2, COMPLETION_TOKENS)
    mask[1, 3:] = 0  # the second answer stopped early
    temperature = 0.7

    t_prompt = prompts["input_ids"].shape[1]

    def full_then_sliced(batch):  # what completion_logits computed before: every position, then the slice
        out = model(batch={**batch, LOGITS_AT: ALL_POSITIONS})
        return ModelOutput(token_logits=out.token_logits[:, t_prompt - 1: t_prompt - 1 + COMPLETION_TOKENS])

    def objective(policy):
        logp = token_logprobs(completion_logits(policy, prompts, completions, mask), completions, temperature,
                              codec.suppress_ids)
        return (logp * mask).sum()

    rows, handle = _head_rows(model.base_network)
    full, full_grads = _loss_and_grads(model, lambda: objective(full_then_sliced))
    kept, grads = _loss_and_grads(model, lambda: objective(model))
    handle.remove()
    assert torch.isfinite(full) and abs(float(kept) - float(full)) <= LOSS_ATOL * COMPLETION_TOKENS * 2
    _assert_same_grads(grads, full_grads)
    assert rows == [2 * (t_prompt + COMPLETION_TOKENS), 2 * COMPLETION_TOKENS]
    with torch.no_grad():
        per_token = token_logprobs(completion_logits(model, prompts, completions, mask), completions, temperature,
                                   codec.suppress_ids)
        reference = token_logprobs(completion_logits(full_then_sliced, prompts, completions, mask), completions,
                                   temperature, codec.suppress_ids)
    torch.testing.assert_close(per_token, reference, atol=LOSS_ATOL, rtol=0)


def test_completion_batch_extends_exactly_the_sequence_keys():
    """A per-image key that happens to have the prompt's shape stays as it is; a per-token key named in the batch's
    sequence keys gets zeros (the answer is text); labels are dropped; the logits asked for are the completion's."""
    from medtune.train.rl_answers import completion_logits

    seen = {}

    def model(batch):
        seen.update(batch)
        return ModelOutput(token_logits=torch.zeros(2, 3, 7))

    ids = torch.tensor([[0, 5, 6, 7], [4, 5, 6, 7]])
    prompts = {"ids": ["a", "b"], "input_ids": ids, "attention_mask": (ids > 0).long(), "labels": torch.full_like(ids, -100),
               "token_type_ids": torch.ones_like(ids), "image_grid_thw": torch.ones_like(ids),
               SEQUENCE_KEYS: ("token_type_ids", "input_ids", "attention_mask", "labels")}
    completions, mask = torch.tensor([[1, 2, 3], [1, 2, 3]]), torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    completion_logits(model, prompts, completions, mask)
    assert torch.equal(seen["input_ids"], torch.cat([ids, completions], 1))
    assert seen["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]]
    assert seen["token_type_ids"].tolist() == [[1, 1, 1, 1, 0, 0, 0]] * 2
    assert torch.equal(seen["image_grid_thw"], prompts["image_grid_thw"]) and "labels" not in seen
    assert seen[LOGITS_AT].tolist() == [3, 4, 5]


# ------------------------------------------------------------------------------------------------ segmenting VLM
@pytest.mark.parametrize("vlm", ["internvl", "llava"])  # tied embeddings / untied lm_head with its own [SEG] row
def test_segvlm_lm_loss_and_gradients_equal_full_logits(vlm, tmp_path):
    from medtune.models.vlm.seg.tiny import save_tiny_parts

    vlm_path, sam_path = save_tiny_parts(tmp_path, vlm=vlm, sam="sam2" if vlm == "internvl" else "sam")
    cfg = build_config({"model": {"family": "segvlm", "vlm": {"vlm_path": str(vlm_path), "sam_path": str(sam_path)}},
                        "lora": {"r": 4}})
    torch.manual_seed(0)
    seg = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in seg.trainable_named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    from medtune.models.vlm.seg.model import collate as collate_seg

    question = "Please segment the vessel in this image."
    images = torch.rand(2, 3, 40, 48, generator=g)
    batch = collate_seg([seg.encode(images[i], question, a, f"s{i}")
                         for i, a in enumerate(("It is [SEG].", "Sure, [SEG] and [SEG]."))])
    length = batch["input_ids"].shape[1]
    head = seg.base_network.vlm
    rows, handle = _head_rows(head)
    full_loss, full_grads = _loss_and_grads(seg, lambda: seg(batch={**batch, LOGITS_AT: ALL_POSITIONS}).lm_loss)
    loss, grads = _loss_and_grads(seg, lambda: seg(batch=batch).lm_loss)
    assert abs(float(loss) - float(full_loss)) <= LOSS_ATOL and float(loss) > 0
    _assert_same_grads(grads, full_grads)
    if vlm == "llava":  # untied: the lm_head's own [SEG] row (PEFT trainable tokens) learns from the LM loss
        head_rows = [n for n in grads if "lm_head" in n and "trainable_tokens_delta" in n]
        assert head_rows and all(grads[n].abs().sum() > 0 for n in head_rows)
    needed = int((batch["labels"][:, 1:] != -100).any(0).sum())
    assert rows == [2 * length, 2 * needed]
    # masks without labels (prediction, teacher-forced evaluation) need no token logits at all
    rows.clear()
    with torch.no_grad():
        masks = seg.teacher_forced_masks(images[:1], "Please segment the vessel in this image.", "It is [SEG].")
    handle.remove()
    assert rows == [0] and masks.shape == (1, 40, 48)


# ------------------------------------------------------------------------------------------------ fallback
class _LM(nn.Module):
    """An embedding + output head: ``full`` logits, or the transformers-style ``logits_to_keep`` slice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 11)

    def run(self, input_ids, keep=None):
        hidden = self.embed(input_ids)
        return SimpleNamespace(logits=self.head(hidden if keep is None else hidden[:, keep]))


class _Supports(_LM):
    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        return self.run(input_ids, logits_to_keep if torch.is_tensor(logits_to_keep) else None)


class _NoKeyword(_LM):
    def forward(self, input_ids, attention_mask=None):
        return self.run(input_ids)


class _Ignores(_LM):
    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.run(input_ids)


class _Refuses(_LM):
    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self._inner(input_ids, **kwargs)

    def _inner(self, input_ids, num_logits_to_keep=0):  # an older remote-code signature
        return self.run(input_ids)


@pytest.mark.parametrize("cls", [_Supports, _NoKeyword, _Ignores, _Refuses])
def test_models_without_logits_to_keep_fall_back_to_full_logits_with_a_note(cls, caplog):
    net = cls()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])
    labels = torch.tensor([[-100, -100, -100, 7, 8, -100], [-100, -100, -100, -100, 9, 10]])
    positions = torch.tensor([2, 3, 4])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    full = net(**inputs).logits
    for _ in range(2):  # the note once per class
        with caplog.at_level(logging.INFO, logger="medtune.models.vlm.logits"):
            _, logits = forward_logits_at(net, net, inputs, positions)
    assert torch.equal(logits, full[:, positions])
    notes = [r.getMessage() for r in caplog.records if "logits_to_keep" in r.getMessage()]
    assert len(notes) == (0 if cls is _Supports else 1)
    if notes:
        assert notes[0].startswith(cls.__name__) and "sliced afterwards" in notes[0]
    assert torch.allclose(token_loss(logits, labels, positions=positions), token_loss(full, labels), atol=LOSS_ATOL)
    with pytest.raises(ValueError, match="miss supervised position"):
        token_loss(logits[:, :2], labels, positions=positions[:2])
