"""Family sam2_video: the differentiable clip forward against transformers' own video inference, gradient through the
memory, LoRA placement, the bounded memory bank, and the weight round trip (tiny model, CPU, no network)."""
from __future__ import annotations

import re

import pytest
import torch

from medtune.config import LossCfg, build_config
from medtune.errors import ConfigError
from medtune.losses import ComboLoss
from medtune.models.lora import adapter_summary
from medtune.models.registry import build_model
from medtune.train.preflight import run_preflight

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

from medtune.models.video import (  # noqa: E402
    VideoPrompt,
    clip_loss,
    init_from_config,
    memory_bank_bytes,
    memory_bank_frames,
    memory_reach,
    prompt_mask_input,
    propagate,
    propagate_without_memory,
    tiny_sam2_video_config,
    upsample_logits,
)

# Composed training forward vs transformers' session API, eval mode, on the opinionated tiny model below: max |delta|
# of mask probabilities measured 2.2e-5 (none) and 7.3e-6 (mask) on CPU float32 (the clip's frames go through the
# vision encoder as one batch, the session's one at a time); propagate() vs the session: 0. Changing only the images
# of the frames before frame 5 moves frame 5+ probabilities by > 0.5 through the memory (checked below), so a wrong
# memory, pointer or prompt cannot hide under this bound.
PARITY_ATOL = 1e-4
MEMORY_EFFECT = 0.1
SIZE = 48  # frames differ from the model's 64x64 input, so both resizes are exercised


def _cfg(**model):
    model.setdefault("family", "sam2_video")
    data = {"channels": 1, "sampling": "whole_image"}
    return build_config({"data": data, "model": model})


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    """A tiny Sam2VideoModel saved like a pretrained checkpoint (model.path)."""
    from transformers import Sam2VideoModel

    torch.manual_seed(0)
    net = Sam2VideoModel(tiny_sam2_video_config())
    _opinionated(net)
    folder = tmp_path_factory.mktemp("sam2video") / "tiny-sam2-video"
    net.save_pretrained(folder)
    return folder


def _opinionated(net) -> None:
    """Unit-gain random weights (transformers' init gives a tiny model logits ~3e-3 and memory effects ~1e-5, too
    small for a comparison to mean anything): logits ~6, and the memory changes later frames' masks."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        init_from_config(net)
        for block in net.memory_encoder.memory_fuser.layers:
            block.scale.fill_(1.0)


def moving_disk_clip(t: int, size: int = SIZE, batch: int = 1, seed: int = 0) -> dict:
    """Clips of a bright disk moving over noise (the contract's clip batch, plain tensors)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    frames = torch.rand(batch, t, 1, size, size, generator=g) * 0.3
    masks = torch.zeros(batch, t, 1, size, size)
    for b in range(batch):
        for i in range(t):
            cx, cy = size * (0.3 + 0.4 * i / max(t - 1, 1)), size * (0.4 + 0.1 * b)
            disk = ((xx - cx) ** 2 + (yy - cy) ** 2) < (size * 0.18) ** 2
            masks[b, i, 0] = disk.float()
            frames[b, i, 0] += 0.6 * disk
    annotated = torch.zeros(batch, t, dtype=torch.bool)
    annotated[:, ::3] = True
    return {"frames": frames.clamp(0, 1), "masks": masks, "annotated": annotated, "fov": torch.ones_like(masks)}


def session_reference(seg, frames: torch.Tensor, prompt_frame: int, mask: torch.Tensor | None) -> torch.Tensor:
    """transformers' own video inference (session + propagate_in_video_iterator, forward then backward from the
    prompted frame) on frames [T, C, H, W]: probabilities [T, H, W]."""
    from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

    net = seg.base_network
    with torch.no_grad():
        pixels = seg._encoder_input(frames)
    session = Sam2VideoInferenceSession(video=pixels, dtype=torch.float32)
    obj = session.obj_id_to_idx(1)
    if mask is not None:
        session.add_mask_inputs(obj, prompt_frame, prompt_mask_input(mask[None, None], seg.image_size))
        session.obj_with_new_inputs = [1]
    else:  # semantic: the frame decoded without a prompt becomes the conditioning frame
        session.obj_with_new_inputs = [1]
        net(session, frame_idx=prompt_frame)
        session.obj_with_new_inputs = []
    probs = {}
    for reverse in (False, True):
        for out in net.propagate_in_video_iterator(session, start_frame_idx=prompt_frame, reverse=reverse):
            probs[out.frame_idx] = torch.sigmoid(upsample_logits(out.pred_masks[:1].clone(), frames.shape[-2:],
                                                                 seg.image_size))[0, 0]
    return torch.stack([probs[i] for i in range(frames.shape[0])])


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("prompt", ["mask", "none"])
def test_clip_forward_matches_transformers_video_inference(video_folder, prompt):
    """The training forward (with gradient) and transformers' inference give the same masks on every frame, for two
    clips in one batch whose prompted frames differ (the second tracked backward as well), and so does propagate()
    with its bounded bank. 16 frames: transformers' non-streaming pointer encoding then equals the streaming one."""
    seg = build_model(_cfg(path=str(video_folder), finetune="full", prompt=prompt)).eval()
    clip = moving_disk_clip(16, batch=2)
    clip["annotated"][1] = False
    clip["annotated"][1, [4, 9]] = True  # clip 1 is prompted on frame 4 (mask mode)
    out = seg(batch=clip)
    assert out.mask_logits.shape == (2, 16, 1, SIZE, SIZE) and out.mask_logits.requires_grad
    probs = torch.sigmoid(out.mask_logits.detach())[:, :, 0]
    # the memory matters: new images on frames 0-4 alone change frames 5+ (which see them only through the memory)
    changed = {**clip, "frames": clip["frames"].clone()}
    changed["frames"][:, :5] = torch.rand(2, 5, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        moved = (torch.sigmoid(seg(batch=changed).mask_logits[:, 5:, 0]) - probs[:, 5:]).abs().amax()
    assert moved > MEMORY_EFFECT
    for b in range(2):
        k = int(out.prompt_frame[b])
        assert k == (4 * b if prompt == "mask" else 0)
        mask = clip["masks"][b, k, 0] if prompt == "mask" else None
        reference = session_reference(seg, clip["frames"][b], k, mask)
        delta = (probs[b] - reference).abs().max().item()
        assert delta < PARITY_ATOL, f"clip {b}: max |delta prob| {delta:.2e}"
        streamed = dict(propagate(seg, clip["frames"][b], VideoPrompt(frame=k, mask=mask)))
        assert sorted(streamed) == list(range(16))
        streamed = torch.stack([streamed[i] for i in range(16)])
        assert (streamed - reference).abs().max().item() < PARITY_ATOL
    assert out.mask_prompted.sum().item() == (2 if prompt == "mask" else 0)


def test_clips_of_a_batch_decode_and_backpropagate_as_alone(video_folder):
    """A frame's clips go through the mask decoder in one call; each keeps its own best-of-three mask (transformers'
    indexing would pair every clip with the others' choice), so logits and gradients equal one clip at a time. Eval
    mode: the memory attention's dropout draws other random numbers for a batch than for its clips alone."""
    seg = build_model(_cfg(path=str(video_folder), finetune="full")).eval()
    clip = moving_disk_clip(6, batch=3)
    params = [p for p in seg.parameters() if p.requires_grad]

    def logits_and_grads(rows):
        for p in params:
            p.grad = None
        logits = []
        for r in rows:
            out = seg(batch={key: value[r] for key, value in clip.items()})
            out.mask_logits.sigmoid().sum().backward()
            logits.append(out.mask_logits.detach())
        return torch.cat(logits), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    batched, batched_grads = logits_and_grads([slice(0, 3)])
    alone, alone_grads = logits_and_grads([slice(i, i + 1) for i in range(3)])
    # float32: the vision encoder runs 18 frames in one batch against 6 (with transformers' own choice each clip
    # would get a mask per clip of the batch)
    assert (batched.sigmoid() - alone.sigmoid()).abs().max().item() < PARITY_ATOL
    scale = max(g.abs().max().item() for g in alone_grads)
    assert max((a - b).abs().max().item() for a, b in zip(batched_grads, alone_grads)) < PARITY_ATOL * scale


def test_box_prompt_and_single_image(video_folder):
    seg = build_model(_cfg(path=str(video_folder), finetune="full", prompt="box")).eval()
    clip = moving_disk_clip(4)
    with torch.no_grad():
        a = seg(batch=clip).mask_logits
        b = seg(batch={**clip, "box": torch.tensor([[2.0, 2.0, 20.0, 20.0]])}).mask_logits
        single = seg.forward_logits(clip["frames"][:, 0], torch.tensor([[2.0, 2.0, 20.0, 20.0]]))
    assert a.shape == (1, 4, 1, SIZE, SIZE) and not torch.allclose(a, b)
    assert torch.allclose(single, b[:, 0], atol=1e-6)
    with pytest.raises(ValueError, match="box"):
        seg.forward_logits(clip["frames"][:, 0])


def test_propagate_without_memory_segments_every_frame_alone(video_folder):
    """The memory ablation: each frame as the one-frame clip forward gives it (decoded without memory), in frame
    order; with the memory, later frames differ (this model's memory moves them), so the ablation removes it."""
    seg = build_model(_cfg(path=str(video_folder), finetune="full", prompt="none")).eval()
    frames = moving_disk_clip(6)["frames"][0]
    alone = list(propagate_without_memory(seg, frames))
    assert [i for i, _ in alone] == list(range(6))
    with torch.no_grad():
        single = torch.sigmoid(seg.forward_logits(frames))[:, 0]
    assert torch.allclose(torch.stack([p for _, p in alone]), single, atol=PARITY_ATOL)
    tracked = torch.stack([p for _, p in propagate(seg, frames)])
    assert torch.allclose(tracked[0], alone[0][1], atol=PARITY_ATOL)
    assert (tracked[1:] - torch.stack([p for _, p in alone[1:]])).abs().amax() > MEMORY_EFFECT


# ------------------------------------------------------------------------------------------------ gradient
MEMORY_PARTS = ("memory_attention.", "memory_encoder.", "object_pointer_proj.",
                "temporal_positional_encoding_projection_layer.", "memory_temporal_positional_encoding")


def _preflight(seg, clip):
    loss_fn = ComboLoss(LossCfg())
    optimizer = torch.optim.AdamW([p for p in seg.parameters() if p.requires_grad], lr=1e-3)
    return run_preflight(seg, optimizer, lambda: clip_loss(seg(batch=clip), clip, loss_fn)[0], steps=3)


@pytest.mark.parametrize("prompt", ["mask", "none", "box"])
def test_gradient_reaches_every_trainable_memory_tensor(prompt):
    """Full fine-tuning from the tiny config: every trainable tensor (memory attention, memory encoder, object
    pointers included) gets a finite non-zero gradient and moves (train/preflight.py)."""
    torch.manual_seed(1)
    seg = build_model(_cfg(config={"preset": "tiny"}, prompt=prompt))
    trainable = [n for n, _ in seg.trainable_named_parameters()]
    for part in MEMORY_PARTS:
        assert any(part in n for n in trainable), part
    report = _preflight(seg, moving_disk_clip(5, batch=2))
    assert report.passed and report.n_trainable == len(trainable)


def test_frozen_memory_parts_stay_frozen():
    cfg = _cfg(config={"preset": "tiny"}, video={"memory_encoder": "frozen", "object_pointers": "frozen"})
    seg = build_model(cfg)
    names = [n for n, _ in seg.trainable_named_parameters()]
    assert not any("memory_encoder." in n or "object_pointer_proj." in n for n in names)
    assert any("memory_attention." in n for n in names)
    assert _preflight(seg, moving_disk_clip(4)).passed  # frozen tensors bit-identical, the rest trains


def test_clip_loss_skips_unannotated_and_mask_prompted_frames():
    torch.manual_seed(2)
    seg = build_model(_cfg(config={"preset": "tiny"}, prompt="mask"))
    clip = moving_disk_clip(4)  # annotated: frames 0 and 3; frame 0 is the prompt
    out = seg(batch=clip)
    seen = []
    clip_loss(out, clip, lambda logits, target, fov: (seen.append(logits.shape[0]) or logits.mean(), {}))
    assert seen == [1]
    only_prompt = {**clip, "annotated": torch.tensor([[True, False, False, False]])}
    loss, parts = clip_loss(out, only_prompt, ComboLoss(LossCfg()))
    assert loss.item() == 0.0 and loss.requires_grad and parts == {}


# ------------------------------------------------------------------------------------------------ LoRA
def test_lora_defaults_placement_and_frozen_base(video_folder):
    seg = build_model(_cfg(path=str(video_folder), prompt="mask")).train()
    assert seg.is_peft
    from peft.tuners.lora import LoraLayer

    landed = [n for n, m in seg.base_network.named_modules() if isinstance(m, LoraLayer)]
    vision = r"vision_encoder\.backbone\.blocks\.\d+\.attn\.(qkv|proj)"
    memory = r"memory_attention\.layers\.\d+\.(self_attn|cross_attn_image)\.[qkvo]_proj"
    assert all(re.fullmatch(f"{vision}|{memory}", n) for n in landed), landed
    assert set(adapter_summary(seg.net)) == {"vision_encoder", "memory_attention"}
    trainable = [n for n, _ in seg.trainable_named_parameters()]
    assert all(re.search(r"\.lora_[AB]\.", n) or ".modules_to_save." in n for n in trainable), trainable
    for module in ("mask_decoder", "memory_encoder", "object_pointer_proj", "mask_downsample",
                   "temporal_positional_encoding_projection_layer"):
        assert any(f"{module}.modules_to_save." in n for n in trainable), module
    base = [p for n, p in seg.named_parameters() if "lora_" not in n and "modules_to_save" not in n]
    assert base and not any(p.requires_grad for p in base)
    assert _preflight(seg, moving_disk_clip(4)).passed

    # adapters at init are a no-op; perturbed, they change the clip; disabled, the base model is back
    clip = moving_disk_clip(4, seed=3)
    reference = build_model(_cfg(path=str(video_folder), prompt="mask", finetune="full")).eval()
    seg.eval()
    with torch.no_grad():
        expected = reference(batch=clip).mask_logits
        assert torch.allclose(seg(batch=clip).mask_logits, expected, atol=1e-5)
        g = torch.Generator().manual_seed(0)
        for name, p in seg.net.named_parameters():
            if ".lora_B." in name or ".modules_to_save." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        adapted = seg(batch=clip).mask_logits
        with seg.adapters_disabled():
            disabled = seg(batch=clip).mask_logits
    assert torch.allclose(disabled, expected, atol=1e-5)
    assert not torch.allclose(adapted, expected, atol=1e-3)


def test_lora_without_memory_attention(video_folder):
    seg = build_model(_cfg(path=str(video_folder), video={"memory_attention": "frozen", "memory_encoder": "frozen"}))
    assert set(adapter_summary(seg.net)) == {"vision_encoder"}
    assert not any("memory_encoder" in n for n, _ in seg.trainable_named_parameters())


# ------------------------------------------------------------------------------------------------ memory bank
def test_memory_bank_stays_bounded_over_a_long_propagation(video_folder):
    """40 frames: the bank never holds more than the prompted frame plus what the next frame can read, its size in
    bytes is flat once full, and the masks equal transformers' unbounded inference."""
    seg = build_model(_cfg(path=str(video_folder), finetune="full", prompt="mask")).eval()
    clip = moving_disk_clip(40)
    frames, mask = clip["frames"][0], clip["masks"][0, 0, 0]
    _, pointers = memory_reach(seg.base_network, None)
    counts, sizes = [], []

    def measure(session):
        counts.append(memory_bank_frames(session))
        sizes.append(memory_bank_bytes(session))

    probs = dict(propagate(seg, iter(list(frames)), VideoPrompt(frame=0, mask=mask), after_frame=measure))
    assert len(probs) == 40 and max(counts) <= 1 + pointers and counts[-1] == 1 + pointers
    assert sizes[20] == sizes[-1]
    reference = session_reference(seg, frames, 0, mask)
    assert (torch.stack([probs[i] for i in range(40)]) - reference).abs().max().item() < PARITY_ATOL

    counts.clear()
    short = dict(propagate(seg, frames, VideoPrompt(frame=0, mask=mask), memory_frames=3, after_frame=measure))
    assert len(short) == 40 and max(counts) <= 1 + 3

    # prompted on frame 10: forward, then back to frame 0 with the first frames after the prompt kept for it
    counts.clear()
    order = [i for i, _ in propagate(seg, frames, VideoPrompt(frame=10, mask=clip["masks"][0, 10, 0]),
                                     after_frame=measure)]
    assert order == list(range(10, 40)) + list(range(9, -1, -1))
    assert max(counts) <= 1 + 2 * pointers
    with pytest.raises(ValueError, match="random access"):
        next(propagate(seg, iter(list(frames)), VideoPrompt(frame=10, mask=clip["masks"][0, 10, 0])))


# ------------------------------------------------------------------------------------------------ build / save
def test_save_load_round_trip_and_checks(video_folder, tmp_path):
    from medtune.models.lora import load_trainable, save_trainable

    seg = build_model(_cfg(path=str(video_folder), finetune="full")).eval()
    assert type(seg).__name__ == "Sam2VideoSegModel" and seg.family == "sam2_video"
    clip = moving_disk_clip(3)
    with torch.no_grad():
        expected = seg(batch=clip).mask_logits
    folder = seg.save_base(tmp_path / "base")
    again = build_model(_cfg(path=str(folder), finetune="full")).eval()
    with torch.no_grad():
        assert torch.equal(again(batch=clip).mask_logits, expected)
    save_trainable(seg, tmp_path / "ckpt")
    fresh = build_model(_cfg(config={"preset": "tiny"})).eval()
    load_trainable(fresh, tmp_path / "ckpt")
    with torch.no_grad():
        # built from a config, the network may pick another attention kernel than from_pretrained: measured 1.9e-6
        assert torch.allclose(fresh(batch=clip).mask_logits, expected, atol=1e-5)

    with pytest.raises(ConfigError, match="sam2_video"):
        build_model(_cfg(family="sam2", config={"preset": "tiny"}, prompt="mask"))
    with pytest.raises(ConfigError, match="fpn_hidden_size"):
        build_model(_cfg(config={"preset": "tiny", "vision_config": {"fpn_hidden_size": 64}}))
    from transformers import Sam2Model

    from medtune.models.sam import tiny_sam2_config

    Sam2Model(tiny_sam2_config()).save_pretrained(tmp_path / "image-sam2")
    with pytest.raises(ConfigError, match="model.family"):
        build_model(_cfg(path=str(tmp_path / "image-sam2")))
