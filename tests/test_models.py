"""Model families, LoRA placement/trainability and weight round trips (tiny models, CPU, no network)."""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from medtune.config import LoraCfg, build_config
from medtune.models.lora import (
    adapter_summary,
    apply_lora,
    export_merged,
    load_trainable,
    save_trainable,
    verify_trainable,
)
from medtune.models.registry import BUILDERS, build_model

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


def _cfg(**model):
    data = dict(model.pop("data", {"channels": 3}))
    if model.get("prompt") == "box":  # box prompts see whole images (config rule)
        data.setdefault("sampling", "whole_image")
    return build_config({"data": data, "model": model})


def _perturb_adapters(seg, seed=0):
    """Make LoRA-B (zero at init) and the modules_to_save copies differ from the base weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in seg.net.named_parameters():
            if ".lora_B." in name or ".modules_to_save." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _lora_layer_names(seg):
    from peft.tuners.lora import LoraLayer

    return [n for n, m in seg.base_network.named_modules() if isinstance(m, LoraLayer)]


def _assert_only_adapters_trainable(seg):
    names = [n for n, _ in seg.trainable_named_parameters()]
    assert names
    assert all(re.search(r"\.lora_[AB]\.", n) or ".modules_to_save." in n for n in names), names
    assert any(".lora_B." in n for n in names)


# ------------------------------------------------------------------------------------------------ U-Net
@pytest.fixture(scope="module")
def unet_base(tmp_path_factory):
    torch.manual_seed(0)
    seg = build_model(_cfg(family="unet"))
    folder = tmp_path_factory.mktemp("unet") / "base"
    seg.save_base(folder)
    return folder


def test_unet_from_scratch_is_full_and_takes_any_size():
    seg = build_model(_cfg(family="unet"))
    assert not seg.is_peft
    trainable, total = seg.param_counts()
    assert trainable == total > 0
    out = seg.forward_logits(torch.rand(1, 3, 37, 45))
    assert out.shape == (1, 1, 37, 45)
    assert seg.forward_logits(torch.rand(2, 3, 17, 23)).shape == (2, 1, 17, 23)
    assert seg.forward_logits(torch.rand(2, 3, 5, 3)).shape == (2, 1, 5, 3)  # pad wider than the image
    with pytest.raises(ValueError, match="channels|expects"):
        seg.forward_logits(torch.rand(1, 1, 32, 32))


def test_unet_config_overrides_and_unknown_key():
    seg = build_model(_cfg(family="unet", config={"channels": [8, 16], "strides": [2], "num_res_units": 0}))
    assert seg.forward_logits(torch.rand(1, 3, 9, 11)).shape == (1, 1, 9, 11)
    with pytest.raises(ValueError, match="valid"):
        build_model(_cfg(family="unet", config={"chanels": [8, 16]}))


def test_unet_lora_on_saved_base(unet_base, tmp_path):
    from peft import PeftModel

    from medtune.models.unet import UNetSegModel, _make_net, read_arch

    cfg = _cfg(family="unet", path=str(unet_base))
    assert cfg.finetune_mode() == "lora"
    torch.manual_seed(1)
    seg = build_model(cfg).eval()
    assert seg.is_peft
    _assert_only_adapters_trainable(seg)
    landed = _lora_layer_names(seg)
    assert landed and all(not n.startswith("model.2") for n in landed)
    kinds = {type(m.get_base_layer()).__name__ for n, m in seg.base_network.named_modules() if n in landed}
    assert kinds == {"Conv2d"}
    assert sum(adapter_summary(seg.net).values()) == len(landed)
    seg.train().forward_logits(torch.rand(2, 3, 24, 24)).square().mean().backward()
    grads = {n: p.grad for n, p in seg.trainable_named_parameters()}
    # Every adapter sits on the forward path (no layer bypassed): each LoRA-B and the output block get gradient.
    assert all(g is not None and g.abs().sum() > 0
               for n, g in grads.items() if ".lora_B." in n or "modules_to_save" in n)
    seg.zero_grad(set_to_none=True)
    seg.eval()

    x = torch.rand(1, 3, 37, 45)
    fresh = UNetSegModel(_make_net(read_arch(unet_base)), read_arch(unet_base)).eval()
    fresh.to(memory_format=torch.channels_last)  # the layout build_model gives the family: same kernels, same sums
    from medtune.models.base import load_safetensors_folder

    load_safetensors_folder(fresh.net, unet_base)
    base_out = fresh.forward_logits(x)
    with torch.no_grad():
        assert torch.allclose(seg.forward_logits(x), base_out, atol=1e-6)  # B = 0: adapter is a no-op at init
    _perturb_adapters(seg)
    with torch.no_grad():
        adapted = seg.forward_logits(x)
        with seg.adapters_disabled():
            disabled = seg.forward_logits(x)
    assert torch.allclose(disabled, base_out, atol=1e-6)
    assert not torch.allclose(adapted, base_out, atol=1e-3)

    # PEFT-format adapter that plain PEFT can load onto a fresh base network.
    ckpt = tmp_path / "ckpt"
    save_trainable(seg, ckpt)
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    fresh_net = _make_net(read_arch(unet_base))
    load_safetensors_folder(fresh_net, unet_base)
    reloaded = UNetSegModel(PeftModel.from_pretrained(fresh_net, ckpt / "adapter"), read_arch(unet_base)).eval()
    reloaded.to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(reloaded.forward_logits(x), adapted, atol=1e-6)

    # load_trainable into a freshly built model: same outputs and still trainable (pitfall 4).
    again = build_model(cfg).eval()
    load_trainable(again, ckpt)
    assert again.param_counts()[0] == seg.param_counts()[0] > 0
    _assert_only_adapters_trainable(again)
    with torch.no_grad():
        assert torch.allclose(again.forward_logits(x), adapted, atol=1e-6)

    # Merged export is a base folder giving the adapted function; the live model keeps its adapters.
    merged_dir = export_merged(seg, tmp_path / "merged")
    assert seg.is_peft and seg.param_counts()[0] > 0
    merged = build_model(_cfg(family="unet", path=str(merged_dir), finetune="full")).eval()
    with torch.no_grad():
        assert torch.allclose(merged.forward_logits(x), adapted, atol=1e-5)


def test_unet_full_checkpoint_round_trip_is_a_base_folder(tmp_path):
    torch.manual_seed(2)
    seg = build_model(_cfg(family="unet")).eval()
    ckpt = tmp_path / "ckpt"
    save_trainable(seg, ckpt)
    assert (ckpt / "model" / "model.safetensors").is_file() and (ckpt / "model" / "model_config.json").is_file()
    other = build_model(_cfg(family="unet")).eval()
    load_trainable(other, ckpt)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(other.forward_logits(x), seg.forward_logits(x))
    seeded = build_model(_cfg(family="unet", path=str(ckpt / "model"), finetune="full")).eval()
    with torch.no_grad():
        assert torch.allclose(seeded.forward_logits(x), seg.forward_logits(x))
    lora = build_model(_cfg(family="unet", path=str(ckpt / "model")))
    with pytest.raises(ValueError, match="fully fine-tuned"):
        load_trainable(lora, ckpt)


def test_unet_saved_base_vs_config(unet_base):
    with pytest.raises(ValueError, match="data.channels"):
        build_model(_cfg(family="unet", path=str(unet_base), data={"channels": 1}))
    build_model(_cfg(family="unet", path=str(unet_base), config={"channels": [16, 32, 64, 128]}))  # agrees
    with pytest.raises(ValueError, match="contradicts"):
        build_model(_cfg(family="unet", path=str(unet_base), config={"channels": [8, 16, 32, 64]}))


# ---------------------------------------------------------------------------------------- registry / LoRA guards
def test_unknown_family_lists_registered():
    with pytest.raises(ValueError) as err:
        build_model(_cfg(family="nope"))
    for name in ("unet", "sam", "sam2", "segvlm"):
        assert name in str(err.value) and name in BUILDERS


def test_third_party_family_by_import_path():
    # a builder given as "module:function" is used as is; nothing has to register itself on import
    seg = build_model(_cfg(family="medtune.models.unet:build_unet", config={"channels": [8, 16], "strides": [2]}))
    assert type(seg).__name__ == "UNetSegModel"
    with pytest.raises(ValueError, match="no function"):
        build_model(_cfg(family="medtune.models.unet:nope"))
    with pytest.raises(ValueError, match="cannot import"):
        build_model(_cfg(family="no_such_pkg.mod:build"))


def test_missing_model_path_names_path_and_fix(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as err:
        build_model(_cfg(family="unet", path=str(missing)))
    assert str(missing) in str(err.value) and "model.path" in str(err.value)


def test_rewrapping_a_peft_model_raises(unet_base):
    seg = build_model(_cfg(family="unet", path=str(unet_base)))
    with pytest.raises(RuntimeError, match="already carries PEFT"):
        apply_lora(seg.net, LoraCfg(), seg.default_lora_targets(), None)
    with pytest.raises(RuntimeError, match="already carries PEFT"):
        apply_lora(seg.base_network, LoraCfg(), seg.default_lora_targets(), None)


def test_lora_target_errors(unet_base):
    with pytest.raises(ValueError, match="matched no module"):
        build_model(_cfg(family="unet", path=str(unet_base)).model_copy(
            update={"lora": LoraCfg(target_modules=r"^nothing\.here$")}))
    with pytest.raises(ValueError, match="cannot wrap"):  # transposed convs: not supported by peft LoRA
        build_model(_cfg(family="unet", path=str(unet_base)).model_copy(
            update={"lora": LoraCfg(target_modules=r"^model\.1\..*\.conv$")}))
    with pytest.raises(ValueError, match="modules_to_save"):
        build_model(_cfg(family="unet", path=str(unet_base)).model_copy(
            update={"lora": LoraCfg(modules_to_save=["no_such_module"])}))


def test_lora_presets_and_verify_catches_extra_trainable(unet_base):
    cfg = _cfg(family="unet", path=str(unet_base)).model_copy(update={"lora": LoraCfg(preset="small")})
    seg = build_model(cfg)
    assert seg.net.peft_config["default"].r == 8 and seg.net.peft_config["default"].lora_alpha == 16
    # A flag set on a base weight after wrapping is outside LoRA + modules_to_save: verification must object.
    next(p for n, p in seg.net.named_parameters() if "base_layer" in n).requires_grad_(True)
    with pytest.raises(RuntimeError, match="unexpectedly trainable"):
        verify_trainable(seg.net)


# ------------------------------------------------------------------------------------------------ SAM
@pytest.fixture(scope="module")
def sam_folder(tmp_path_factory):
    from transformers import SamModel

    from medtune.models.sam import tiny_sam_config

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sam") / "tiny-sam"
    SamModel(tiny_sam_config()).save_pretrained(folder)
    return folder


def _grad_norms(seg):
    lora_b = [p.grad for n, p in seg.net.named_parameters() if ".lora_B." in n]
    lora_a = [p.grad for n, p in seg.net.named_parameters() if ".lora_A." in n]
    decoder = [p.grad for n, p in seg.net.named_parameters() if "mask_decoder.modules_to_save." in n]
    return lora_a, lora_b, decoder


@pytest.mark.parametrize("channels", [3, 1])
def test_sam_semantic_forward_and_gradients(sam_folder, channels):
    seg = build_model(_cfg(family="sam", path=str(sam_folder), data={"channels": channels}))
    seg.train()
    out = seg.forward_logits(torch.rand(2, channels, 40, 40))
    assert out.shape == (2, 1, 40, 40) and out.requires_grad
    out.mean().backward()
    lora_a, lora_b, decoder = _grad_norms(seg)
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b)
    assert decoder and any(g is not None and g.abs().sum() > 0 for g in decoder)
    # B starts at zero, so A gets no gradient on the first step (pitfall 2): preflight must look at B.
    assert all(g is None or g.abs().sum() == 0 for g in lora_a)


def test_sam_box_mode(sam_folder):
    seg = build_model(_cfg(family="sam", path=str(sam_folder), prompt="box")).eval()
    x = torch.rand(2, 3, 40, 48)
    with torch.no_grad():
        a = seg.forward_logits(x, torch.tensor([[2.0, 3.0, 20.0, 30.0], [5.0, 5.0, 40.0, 35.0]]))
        b = seg.forward_logits(x, torch.tensor([[20.0, 10.0, 47.0, 39.0], [0.0, 0.0, 10.0, 10.0]]))
    assert a.shape == (2, 1, 40, 48)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="box"):
        seg.forward_logits(x)


def test_sam_from_pretrained_lora_placement_and_reference(sam_folder):
    from transformers import SamModel

    from medtune.models.sam import SamSegModel

    seg = build_model(_cfg(family="sam", path=str(sam_folder))).eval()
    assert seg.is_peft
    landed = _lora_layer_names(seg)
    assert landed and all(n.startswith("vision_encoder.") for n in landed)
    assert adapter_summary(seg.net) == {"vision_encoder": len(landed)}
    _assert_only_adapters_trainable(seg)
    reference = SamSegModel(SamModel.from_pretrained(sam_folder), 3, "none").eval()
    x = torch.rand(1, 3, 64, 64)
    _perturb_adapters(seg)
    with torch.no_grad():
        with seg.adapters_disabled():
            disabled = seg.forward_logits(x)
        adapted = seg.forward_logits(x)
        assert torch.allclose(disabled, reference.forward_logits(x), atol=1e-5)
    assert not torch.allclose(adapted, disabled, atol=1e-4)


def test_sam_anchored_targets_skip_same_named_layers_elsewhere():
    from transformers import SamModel

    from medtune.models.sam import SamSegModel, tiny_sam_config

    net = SamModel(tiny_sam_config())

    class Decoy(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Module()
            self.attn.qkv = nn.Linear(4, 12)

    net.prompt_encoder.layers = nn.ModuleList([Decoy()])
    decoy = "prompt_encoder.layers.0.attn.qkv"
    assert decoy.endswith("attn.qkv")  # a suffix-style target list would have hit it (pitfall 5)
    peft_model = apply_lora(net, LoraCfg(r=4), SamSegModel.DEFAULT_TARGETS, ["mask_decoder"])
    from peft.tuners.lora import LoraLayer

    landed = [n for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)]
    assert decoy not in landed and all(n.startswith("vision_encoder.layers.") for n in landed)


def test_sam_adapter_round_trip_and_merged_export(sam_folder, tmp_path):
    cfg = _cfg(family="sam", path=str(sam_folder), prompt="box")
    seg = build_model(cfg).eval()
    _perturb_adapters(seg, seed=3)
    x, box = torch.rand(1, 3, 50, 40), torch.tensor([[4.0, 6.0, 30.0, 44.0]])
    with torch.no_grad():
        adapted = seg.forward_logits(x, box)
    save_trainable(seg, tmp_path / "ckpt")
    again = build_model(cfg).eval()
    load_trainable(again, tmp_path / "ckpt")
    _assert_only_adapters_trainable(again)
    with torch.no_grad():
        assert torch.allclose(again.forward_logits(x, box), adapted, atol=1e-6)
    merged = build_model(_cfg(family="sam", path=str(export_merged(seg, tmp_path / "merged")), prompt="box",
                              finetune="full")).eval()
    with torch.no_grad():
        assert torch.allclose(merged.forward_logits(x, box), adapted, atol=1e-5)
    # full fine-tuning trains everything that can reach the mask logits (frozen_by_design excluded)
    import re
    unused = merged.frozen_by_design()
    expected = sum(p.numel() for n, p in merged.named_parameters() if not re.search(unused, n))
    assert merged.param_counts()[0] == expected < merged.param_counts()[1]


def test_sam_full_checkpoint_round_trip(tmp_path):
    cfg = _cfg(family="sam", config={"preset": "tiny"})
    torch.manual_seed(4)
    seg = build_model(cfg).eval()
    assert not seg.is_peft
    save_trainable(seg, tmp_path / "ckpt")
    other = build_model(cfg).eval()
    load_trainable(other, tmp_path / "ckpt")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(other.forward_logits(x), seg.forward_logits(x))


def test_sam_gradient_checkpointing_still_trains_lora(sam_folder):
    seg = build_model(_cfg(family="sam", path=str(sam_folder), gradient_checkpointing=True)).train()
    assert seg.base_network.vision_encoder.layers[0].gradient_checkpointing
    seg.forward_logits(torch.rand(1, 3, 32, 32)).mean().backward()
    _, lora_b, _ = _grad_norms(seg)
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b)


def test_built_model_is_in_training_mode_so_checkpointing_really_saves_memory(sam_folder):
    """from_pretrained leaves a transformers network in eval mode, where activation checkpointing is skipped without
    a word (bench/gpu_sam.py once measured 'no memory saved' that way). build_model hands out a training-mode model,
    and with checkpointing its forward stores far less for backward; put back in eval mode, it would not."""

    def stored_for_backward(seg) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            seg.forward_logits(torch.rand(1, 3, 32, 32)).mean().backward()
        return sum(sizes)

    plain = build_model(_cfg(family="sam", path=str(sam_folder)))
    checkpointed = build_model(_cfg(family="sam", path=str(sam_folder), gradient_checkpointing=True))
    assert plain.training and checkpointed.training and checkpointed.base_network.training
    full, reduced = stored_for_backward(plain), stored_for_backward(checkpointed)
    assert reduced < 0.8 * full
    assert stored_for_backward(checkpointed.eval()) >= full  # the old bench's situation: nothing saved


def test_remote_code_needs_flag(sam_folder, tmp_path):
    import shutil

    folder = tmp_path / "remote"
    shutil.copytree(sam_folder, folder)
    meta = json.loads((folder / "config.json").read_text())
    meta["auto_map"] = {"AutoModel": "modeling_custom.CustomSam"}
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"model\.trust_remote_code=true"):
        build_model(_cfg(family="sam", path=str(folder)))


def test_family_must_match_checkpoint(sam_folder):
    with pytest.raises(ValueError, match="model.family"):
        build_model(_cfg(family="sam2", path=str(sam_folder)))
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        build_model(_cfg(family="unet", path=str(sam_folder)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_qlora_refused_without_cuda(sam_folder):
    with pytest.raises(ValueError, match="CUDA GPU and bitsandbytes"):
        build_model(_cfg(family="sam", path=str(sam_folder), quantize_4bit=True))
    with pytest.raises(ValueError, match="finetune=lora"):
        build_model(_cfg(family="sam", config={"preset": "tiny"}, quantize_4bit=True))


# ------------------------------------------------------------------------------------------------ SAM 2
@pytest.fixture(scope="module")
def sam2_folder(tmp_path_factory):
    from transformers import Sam2Model

    from medtune.models.sam import tiny_sam2_config

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sam2") / "tiny-sam2"
    Sam2Model(tiny_sam2_config()).save_pretrained(folder)
    return folder


def test_sam2_semantic_and_box(sam2_folder, tmp_path):
    seg = build_model(_cfg(family="sam2", path=str(sam2_folder))).train()
    landed = _lora_layer_names(seg)
    assert landed and all(re.fullmatch(r"vision_encoder\.backbone\.blocks\.\d+\.attn\.(qkv|proj)", n) for n in landed)
    _assert_only_adapters_trainable(seg)
    out = seg.forward_logits(torch.rand(2, 3, 40, 40))
    assert out.shape == (2, 1, 40, 40)
    out.mean().backward()
    _, lora_b, decoder = _grad_norms(seg)
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b)
    assert any(g is not None and g.abs().sum() > 0 for g in decoder)

    boxed = build_model(_cfg(family="sam2", path=str(sam2_folder), prompt="box")).eval()
    _perturb_adapters(boxed)
    x, box = torch.rand(1, 3, 36, 44), torch.tensor([[3.0, 4.0, 30.0, 33.0]])
    with torch.no_grad():
        adapted = boxed.forward_logits(x, box)
        assert adapted.shape == (1, 1, 36, 44)
    merged = build_model(_cfg(family="sam2", path=str(export_merged(boxed, tmp_path / "m")), prompt="box",
                              finetune="full")).eval()
    with torch.no_grad():
        assert torch.allclose(merged.forward_logits(x, box), adapted, atol=1e-5)
    assert merged.base_network.mask_decoder.dynamic_multimask_via_stability is False


def test_sam2_gradient_checkpointing_refused(sam2_folder):
    with pytest.raises(ValueError, match="gradient checkpointing"):
        build_model(_cfg(family="sam2", path=str(sam2_folder), gradient_checkpointing=True))


# ------------------------------------------------------------------------------------------ non-persistent buffers
ROTARY_DIM, ROTARY_THETA = 8, 10000.0


def _buffer_model_classes(from_parameter: bool = False):
    """A remote-code-like PreTrainedModel whose vision rotary ``inv_freq`` is a non-persistent buffer computed in
    ``__init__`` (as Hulu-Med's ``VisionRotaryEmbedding``: no ``original_inv_freq``, so transformers never re-inits
    it). ``from_parameter``: the buffer is derived from a parameter instead (cannot be recomputed from the config)."""
    from transformers import PretrainedConfig, PreTrainedModel

    class BufferConfig(PretrainedConfig):
        model_type = "medtune_buffer_test"

        def __init__(self, dim=ROTARY_DIM, theta=ROTARY_THETA, **kwargs):
            self.dim, self.theta = dim, theta
            super().__init__(**kwargs)

    class VisionRotaryEmbedding(nn.Module):
        def __init__(self, dim, theta, like=None):
            super().__init__()
            inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
            if like is not None:
                inv_freq = inv_freq.to(like.device)
            self.register_buffer("inv_freq", inv_freq, persistent=False)

    class BufferModel(PreTrainedModel):
        config_class = BufferConfig

        def __init__(self, config):
            super().__init__(config)
            self.proj = nn.Linear(config.dim, config.dim)
            self.rotary = VisionRotaryEmbedding(config.dim, config.theta, self.proj.weight if from_parameter else None)
            self.post_init()

    return BufferModel, BufferConfig


def _poisoned_empty_like(monkeypatch):
    """transformers materialises non-persistent buffers with torch.empty_like: make that memory NaN / -7 instead of
    whatever was there, so "the loader never computed it" is seen deterministically."""
    real = torch.empty_like

    def poisoned(tensor, *args, **kwargs):
        out = real(tensor, *args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty_like", poisoned)


def test_non_persistent_buffer_computed_in_init_is_recomputed_after_load(tmp_path, monkeypatch):
    from medtune.models.hf import load_pretrained

    model_cls, config_cls = _buffer_model_classes()
    model_cls(config_cls()).save_pretrained(str(tmp_path))
    expected = torch.tensor([1.0, 0.1, 0.01, 0.001])  # 1 / 10000^(2i/8)
    _poisoned_empty_like(monkeypatch)
    plain = model_cls.from_pretrained(str(tmp_path))
    assert torch.isnan(plain.rotary.inv_freq).all()  # transformers 5 never computes it (empty_like, no re-init)
    loaded = load_pretrained(model_cls, tmp_path)
    assert torch.allclose(loaded.rotary.inv_freq, expected, rtol=1e-6)
    assert loaded.rotary.inv_freq.dtype == torch.float32
    # the weights themselves are untouched by the reference construction
    assert torch.equal(loaded.proj.weight, plain.proj.weight)
    monkeypatch.undo()
    again = load_pretrained(model_cls, tmp_path)  # real uninitialised memory: same answer
    assert torch.equal(again.rotary.inv_freq, loaded.rotary.inv_freq)


def test_non_persistent_buffer_that_cannot_be_recomputed_refuses_the_load_in_one_line(tmp_path):
    from medtune.errors import UserError
    from medtune.models.hf import load_pretrained

    model_cls, config_cls = _buffer_model_classes(from_parameter=True)
    model_cls(config_cls()).save_pretrained(str(tmp_path))
    with pytest.raises(UserError, match=r"non-persistent buffer rotary\.inv_freq of VisionRotaryEmbedding .*derives "
                                        r"it from a parameter") as err:
        load_pretrained(model_cls, tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
