"""Frozen-encoder feature cache (train.feature_cache) and model.freeze_image_encoder: tiny SAM / SAM 2, CPU."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from medtune.config import build_config
from medtune.errors import ConfigError, UserError
from medtune.losses import ComboLoss
from medtune.models.feature_cache import ENTRY_SUFFIX, content_digests, use_feature_cache
from medtune.models.registry import build_model

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

DECODER_LORA = [r"lora.target_modules=^mask_decoder\.transformer\..*_proj$", "lora.modules_to_save=[]"]


def _cfg(family: str, *extra: str, cache: str = "memory"):
    return build_config({}, [f"model.family={family}", "model.config={preset: tiny}", "model.finetune=full",
                             "model.freeze_image_encoder=true", "data.sampling=whole_image",
                             "data.augment.enabled=false", f"train.feature_cache={cache}", *extra])


def _pair(cfg, run_dir=None):
    """The same model twice (same weights): without and with the cache."""
    torch.manual_seed(0)
    plain = build_model(cfg)
    cached = copy.deepcopy(plain)
    use_feature_cache(cached, cfg, run_dir)
    return plain, cached


def _images(n: int = 3, size: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _count_encoder_rows(model) -> list[int]:
    """Record how many images each encoder run sees (the cache calls model.encoder_features on misses only)."""
    rows: list[int] = []
    original = model.encoder_features

    def counting(image):
        rows.append(image.shape[0])
        return original(image)

    model.encoder_features = counting
    return rows


# ------------------------------------------------------------------------------------------------ hits and misses
@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_hits_and_misses_are_counted_per_image(family):
    _, model = _pair(_cfg(family))
    rows = _count_encoder_rows(model)
    images = _images(3)
    batch = torch.cat([images, images[:1]])  # a duplicate inside one batch runs the encoder once
    model(batch)
    assert (model.feature_cache.misses, model.feature_cache.hits, rows) == (4, 0, [3])
    model(batch)
    model(images[1:2])
    assert (model.feature_cache.misses, model.feature_cache.hits, rows) == (4, 5, [3])
    model(_images(1, seed=9))  # a new image
    assert (model.feature_cache.misses, rows) == (5, [3, 1])
    assert model.feature_cache.stats()["entries"] == 4


def test_digest_is_exact_arithmetic_and_sees_every_bit():
    x = torch.rand(2, 3, 5, 7)
    from medtune.models.feature_cache import _hash_weights

    words = [int(v) for v in x[1].reshape(-1).view(torch.int32)]
    weights = _hash_weights(len(words), x.device)
    reference = [sum(w * v for w, v in zip(row.tolist(), words)) % 2**64 for row in weights]
    sums = torch.tensor([s if s < 2**63 else s - 2**64 for s in reference], dtype=torch.int64)
    assert content_digests(x)[1].endswith(sums.numpy().tobytes())  # int64 wrap-around = the exact sum mod 2^64
    flipped = x.clone()
    flipped.view(torch.int32)[0, 1, 2, 3] ^= 1  # the lowest mantissa bit of one pixel
    assert content_digests(flipped)[0] != content_digests(x)[0]
    assert content_digests(flipped)[1] == content_digests(x)[1]
    assert content_digests(x.reshape(2, 3, 7, 5))[0] != content_digests(x)[0]  # same bits, other shape
    assert content_digests(x.double())[0] != content_digests(x)[0]


# ------------------------------------------------------------------------------------------------ same training
@pytest.mark.parametrize("family,prompt", [("sam", "none"), ("sam", "box"), ("sam2", "none"), ("sam2", "box")])
def test_same_losses_and_decoder_gradients_with_and_without_cache(family, prompt):
    cfg = _cfg(family, f"model.prompt={prompt}", "loss.cldice=0")
    plain, cached = _pair(cfg)
    encoder_before = copy.deepcopy(cached.image_encoder().state_dict())
    combo = ComboLoss(cfg.loss)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (plain, cached)]
    g = torch.Generator().manual_seed(3)
    batches = [{"image": _images(2, seed=s), "mask": (torch.rand(2, 1, 40, 40, generator=g) > 0.7).float(),
                "box": torch.tensor([[4.0, 6.0, 30.0, 33.0], [1.0, 2.0, 39.0, 38.0]])} for s in (11, 12)]
    for step in range(5):
        batch = batches[step % 2]
        losses, grads = [], []
        for model, opt in zip((plain, cached), optimizers):
            loss, _ = combo(model(batch=batch).mask_logits, batch["mask"], None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
            opt.step()
            losses.append(float(loss.detach()))
        assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-7), step
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
    assert cached.feature_cache.hits == 6 and cached.feature_cache.misses == 4
    trained = {n for n, p in cached.named_parameters() if p.requires_grad}
    assert any(".mask_decoder." in f".{n}" for n in trained) and any("prompt_encoder." in n for n in trained)
    if family == "sam2":  # applied after the cache: they must still learn
        assert {"net.no_memory_embedding", "net.mask_decoder.conv_s0.weight"} <= trained
        assert grads[1]["net.no_memory_embedding"].abs().sum() > 0
    for name, value in cached.image_encoder().state_dict().items():
        assert torch.equal(value, encoder_before[name]), name


def test_decoder_only_lora_uses_the_cache():
    cfg = _cfg("sam", "model.finetune=lora", *DECODER_LORA)
    plain, cached = _pair(cfg)
    images = _images(2)
    for _ in range(2):
        torch.testing.assert_close(cached(images), plain(images))
    assert cached.feature_cache.hits == 2
    assert all(n.startswith("net.base_model.model.mask_decoder.") for n, _ in cached.trainable_named_parameters())


def test_image_that_requires_grad_bypasses_the_cache():
    _, model = _pair(_cfg("sam"))
    image = _images(1).requires_grad_(True)
    model(image).sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert model.feature_cache.hits == model.feature_cache.misses == 0


# ------------------------------------------------------------------------------------------------ invalidation
@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_changed_encoder_weight_misses_instead_of_serving_stale_features(family):
    plain, cached = _pair(_cfg(family))
    images = _images(2)
    cached(images)
    cached(images)
    assert (cached.feature_cache.misses, cached.feature_cache.hits) == (2, 2)
    for model in (plain, cached):
        with torch.no_grad():
            next(model.image_encoder().parameters()).add_(0.5)
    torch.testing.assert_close(cached(images), plain(images))
    assert (cached.feature_cache.misses, cached.feature_cache.invalidations) == (4, 1)
    # load_state_dict (a checkpoint, a resume) is an in-place copy too: same values hit, other values miss
    cached.load_state_dict(plain.state_dict())
    cached(images)
    assert (cached.feature_cache.misses, cached.feature_cache.invalidations) == (4, 1)
    state = plain.state_dict()
    key = next(k for k in state if ".vision_encoder." in f".{k}" and state[k].is_floating_point())
    state[key] = state[key] * 1.5
    plain.load_state_dict(state)
    cached.load_state_dict(state)
    torch.testing.assert_close(cached(images), plain(images))
    assert (cached.feature_cache.misses, cached.feature_cache.invalidations) == (6, 2)


def test_encoder_made_trainable_after_attach_is_refused_at_forward():
    _, cached = _pair(_cfg("sam"))
    next(cached.image_encoder().parameters()).requires_grad_(True)
    with pytest.raises(UserError, match="image encoder has trainable tensors"):
        cached(_images(1))


def test_config_input_size_and_precision_change_the_key(tmp_path):
    folder = tmp_path / "shared-cache"
    disk = ("train.feature_cache=disk", f"train.feature_cache_dir={folder}")
    _, first = _pair(_cfg("sam", *disk))
    images = _images(2)
    first(images)
    assert first.feature_cache.misses == 2
    # the same weights under another encoder config value (layer-norm epsilon): another fingerprint
    other = build_model(_cfg("sam", *disk, 'model.config={preset: tiny, vision_config: {layer_norm_eps: 1.0e-3}}'))
    other.load_state_dict(first.state_dict())
    use_feature_cache(other, _cfg("sam", *disk))
    other(images)
    assert (other.feature_cache.hits, other.feature_cache.misses) == (0, 2)
    # another input size (the prompt encoder's and vision encoder's image_size)
    small = _cfg("sam", *disk, "model.config={preset: tiny, vision_config: {image_size: 32}, "
                               "prompt_encoder_config: {image_size: 32}}")
    resized = build_model(small)
    use_feature_cache(resized, small)
    resized(images)
    assert (resized.feature_cache.hits, resized.feature_cache.misses) == (0, 2)
    assert len({p.name for p in folder.iterdir()}) == 3  # one folder per fingerprint
    # the numeric context: bf16 autocast computes other features
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first(images)
    assert (first.feature_cache.hits, first.feature_cache.misses) == (0, 4)
    first(images)
    assert first.feature_cache.hits == 2


# ------------------------------------------------------------------------------------------------ disk store
def _disk_model(cfg, weights, run_dir):
    model = build_model(cfg)
    model.load_state_dict(weights)
    use_feature_cache(model, cfg, run_dir)
    return model


def test_disk_cache_survives_a_new_instance_and_detects_damaged_entries(tmp_path):
    cfg = _cfg("sam2", cache="disk")
    plain, first = _pair(cfg, tmp_path)
    images = _images(3)
    expected = plain(images)
    torch.testing.assert_close(first(images), expected)
    files = sorted((tmp_path / "feature_cache").glob(f"*/*{ENTRY_SUFFIX}"))
    assert len(files) == 3 and first.feature_cache.misses == 3

    again = _disk_model(cfg, plain.state_dict(), tmp_path)  # a new process would build exactly this
    torch.testing.assert_close(again(images), expected)
    assert (again.feature_cache.hits, again.feature_cache.misses) == (3, 0)

    # a truncated file (a writer killed without the atomic rename would leave one), a flipped byte in the tensor data,
    # and a temporary file left by a killed writer
    files[0].write_bytes(files[0].read_bytes()[:100])
    data = bytearray(files[1].read_bytes())
    data[-5] ^= 0xFF
    files[1].write_bytes(bytes(data))
    (files[2].parent / f".{files[2].stem}.123.abcd.tmp").write_bytes(b"half")
    damaged = _disk_model(cfg, plain.state_dict(), tmp_path)
    torch.testing.assert_close(damaged(images), expected)
    assert (damaged.feature_cache.hits, damaged.feature_cache.misses) == (1, 2)
    assert damaged.feature_cache.store.corrupt == 2
    repaired = _disk_model(cfg, plain.state_dict(), tmp_path)
    repaired(images)
    assert (repaired.feature_cache.hits, repaired.feature_cache.misses) == (3, 0)


def test_disk_entry_from_another_key_is_not_served(tmp_path):
    cfg = _cfg("sam", cache="disk")
    _, model = _pair(cfg, tmp_path)
    a, b = _images(1, seed=1), _images(1, seed=2)
    model(a)
    model(b)
    files = sorted((tmp_path / "feature_cache").glob(f"*/*{ENTRY_SUFFIX}"))
    files[0].write_bytes(files[1].read_bytes())  # a valid entry under the wrong name
    fresh = _disk_model(cfg, model.state_dict(), tmp_path)
    fresh(torch.cat([a, b]))
    assert (fresh.feature_cache.hits, fresh.feature_cache.misses) == (1, 1)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("overrides,match", [
    (["data.augment.enabled=true"], "data.augment changes the encoder input"),
    (["data.augment.enabled=true", "data.augment.intensity=0.1", "data.augment.flip=false",
      "data.augment.rotate90=false", "data.augment.rotate_degrees=0", "data.augment.scale_range=[1, 1]"],
     "data.augment changes the encoder input"),
    (["data.sampling=random_crop"], "data.sampling=random_crop"),
    (["objective=rl"], "supervised recipe only"),
])
def test_refused_by_the_config(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _cfg("sam", *overrides)


def test_yaml_off_is_off():
    assert build_config({"train": {"feature_cache": False}}).train.feature_cache == "off"


def test_augmentation_without_any_transform_is_allowed():
    cfg = _cfg("sam", "data.augment.enabled=true", "data.augment.flip=false", "data.augment.rotate90=false",
               "data.augment.rotate_degrees=0", "data.augment.scale_range=[1, 1]", "data.augment.intensity=0")
    assert cfg.train.feature_cache == "memory"


@pytest.mark.parametrize("overrides,match", [
    (["model.freeze_image_encoder=false"], "image encoder trains .*model.freeze_image_encoder=true"),
    (["model.finetune=lora", "model.freeze_image_encoder=false"], "LoRA adapters sit in the image encoder"),
    (["model.config={preset: tiny, vision_config: {attention_dropout: 0.1}}"], "stochastic"),
])
def test_refused_for_an_encoder_that_changes(overrides, match):
    cfg = _cfg("sam", *overrides)
    model = build_model(cfg)
    with pytest.raises(ConfigError, match=match):
        use_feature_cache(model, cfg)
    assert model.feature_cache is None


def test_refused_for_unet_and_freeze_refuses_encoder_lora():
    cfg = build_config({}, ["model.family=unet", "data.sampling=whole_image", "data.augment.enabled=false",
                            "train.feature_cache=memory"])
    with pytest.raises(ConfigError, match="no separate image encoder"):
        use_feature_cache(build_model(cfg), cfg)
    with pytest.raises(ConfigError, match="model.freeze_image_encoder"):
        build_model(build_config({}, ["model.family=unet", "model.freeze_image_encoder=true"]))
    with pytest.raises(ConfigError, match="adapters in the image encoder"):
        build_model(_cfg("sam", "model.finetune=lora"))  # the default LoRA targets are the encoder's


def test_freeze_image_encoder_full_finetune_trains_decoder_only():
    model = build_model(_cfg("sam", cache="off"))
    names = [n for n, _ in model.trainable_named_parameters()]
    assert names and not any(".vision_encoder." in f".{n}" for n in names)
    assert all(not p.requires_grad for p in model.image_encoder().parameters())


# ------------------------------------------------------------------------------------------------ the recipe
def test_supervised_run_with_cache_matches_run_without(tmp_path, caplog):
    import logging

    from helpers import tiny_cfg

    from medtune.train.sft import train

    common = ("model.family=sam", "model.config={preset: tiny}", "model.finetune=full",
              "model.freeze_image_encoder=true", "data.sampling=whole_image", "data.augment.enabled=false",
              "data.derive_fov=false", "data.synthetic.n_images=6", "data.batch_size=2")
    caplog.set_level(logging.INFO, logger="medtune.models.feature_cache")
    runs = {mode: train(tiny_cfg(tmp_path, *common, f"train.feature_cache={mode}", steps=4, name=f"cache-{mode}"))
            for mode in ("off", "disk")}
    losses = {mode: [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                     if '"loss"' in line] for mode, run in runs.items()}
    assert len(losses["off"]) == 4
    assert losses["disk"] == pytest.approx(losses["off"], rel=1e-5)
    assert json.loads((runs["disk"] / "preflight.json").read_text())["passed"]
    assert list((runs["disk"] / "feature_cache").glob(f"*/*{ENTRY_SUFFIX}"))
    assert "first hits after" in caplog.text  # forwards in the recipe were served from the cache
