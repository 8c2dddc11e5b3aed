"""The Sa2VA importer keeps SAM 2 whole: ``sam/`` of the composed folder is a transformers ``Sam2VideoModel`` checkpoint
holding every SAM 2 tensor of the checkpoint, memory attention / memory encoder / object pointers included
(``../shared/fixtures/sa2va-tiny``; the image path's parity is tests/test_sa2va_parity.py)."""
from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import REPO

FIXTURE = REPO.parent / "shared" / "fixtures" / "sa2va-tiny"
SAM_PREFIX = "grounding_encoder.sam2_model."
# The fixture's SAM 2 memory sizes (its README, "The SAM 2 sizes"); Sa2VA's SAM 2.0 has neither the object pointers'
# temporal projection nor the occlusion embedding of SAM 2.1
FIXTURE_MEMORY = {"memory_attention_hidden_size": 32, "memory_attention_num_layers": 1,
                  "memory_attention_feed_forward_hidden_size": 256, "memory_encoder_hidden_size": 32,
                  "memory_encoder_output_channels": 16, "mask_downsampler_embed_dim": 32, "memory_fuser_embed_dim": 32,
                  "memory_fuser_intermediate_dim": 128, "memory_fuser_num_layers": 2, "num_maskmem": 7,
                  "enable_temporal_pos_encoding_for_object_pointers": False,
                  "enable_occlusion_spatial_embedding": False}
# SAM 2 repository (Sa2VA) names of the memory / video tensors -> transformers' Sam2VideoModel names, written out here
# (not taken from the importer) so the test checks the importer's map
MEMORY_NAMES = [
    (r"^memory_attention\.layers\.(\d+)\.(self_attn|cross_attn_image)\.out_proj\.",
     r"memory_attention.layers.\1.\2.o_proj."),
    (r"^memory_attention\.layers\.(\d+)\.norm(\d)\.", r"memory_attention.layers.\1.layer_norm\2."),
    (r"^memory_attention\.norm\.", "memory_attention.layer_norm."),
    (r"^memory_encoder\.mask_downsampler\.encoder\.12\.", "memory_encoder.mask_downsampler.final_conv."),
    (r"^memory_encoder\.mask_downsampler\.encoder\.(0|3|6|9)\.",
     lambda m: f"memory_encoder.mask_downsampler.layers.{int(m.group(1)) // 3}.conv."),
    (r"^memory_encoder\.mask_downsampler\.encoder\.(1|4|7|10)\.",
     lambda m: f"memory_encoder.mask_downsampler.layers.{int(m.group(1)) // 3}.layer_norm."),
    (r"^memory_encoder\.pix_feat_proj\.", "memory_encoder.feature_projection."),
    (r"^memory_encoder\.out_proj\.", "memory_encoder.projection."),
    (r"^memory_encoder\.fuser\.layers\.(\d+)\.dwconv\.", r"memory_encoder.memory_fuser.layers.\1.depthwise_conv."),
    (r"^memory_encoder\.fuser\.layers\.(\d+)\.norm\.", r"memory_encoder.memory_fuser.layers.\1.layer_norm."),
    (r"^memory_encoder\.fuser\.layers\.(\d+)\.pwconv(\d)\.", r"memory_encoder.memory_fuser.layers.\1.pointwise_conv\2."),
    (r"^memory_encoder\.fuser\.layers\.(\d+)\.g_weight$", r"memory_encoder.memory_fuser.layers.\1.scale"),
    (r"^maskmem_tpos_enc$", "memory_temporal_positional_encoding"), (r"^no_mem_embed$", "no_memory_embedding"),
    (r"^no_mem_pos_enc$", "no_memory_positional_encoding"), (r"^no_obj_ptr$", "no_object_pointer"),
    (r"^obj_ptr_proj\.layers\.0\.", "object_pointer_proj.proj_in."),
    (r"^obj_ptr_proj\.layers\.1\.", "object_pointer_proj.layers.0."),
    (r"^obj_ptr_proj\.layers\.2\.", "object_pointer_proj.proj_out."),
]
MEMORY_ROOTS = ("memory_attention.", "memory_encoder.", "maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "obj_ptr_proj.",
                "mask_downsample.")

pytestmark = pytest.mark.skipif(not (FIXTURE / "model").is_dir(), reason=f"Sa2VA fixture absent ({FIXTURE})")


def _fixture_sam() -> dict[str, torch.Tensor]:
    from medtune.models.vlm.sa2va_import import _load_safetensors

    return {k[len(SAM_PREFIX):]: v for k, v in _load_safetensors(FIXTURE / "model").items() if k.startswith(SAM_PREFIX)}


def _memory_name(name: str) -> str:
    for pattern, replacement in MEMORY_NAMES:
        name = re.sub(pattern, replacement, name)
    return name


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from transformers.utils import logging as hf_logging

    from medtune.models.vlm.sa2va_import import import_sa2va

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # the fixture's own SAM 2 config file holds the image sizes only: the memory sizes come from the weights
    return import_sa2va(FIXTURE / "model", tmp_path_factory.mktemp("sa2va") / "composed",
                        sam_config=FIXTURE / "transformers_sam2_config.json")


def test_sam_folder_is_a_sam2_video_checkpoint_with_every_tensor(imported):
    from medtune.models.video import load_sam2_video
    from medtune.models.vlm.sa2va_import import sam2_key

    config = json.loads((imported / "sam" / "config.json").read_text())
    assert config["model_type"] == "sam2_video" and config["architectures"] == ["Sam2VideoModel"]
    assert {k: config[k] for k in FIXTURE_MEMORY} == FIXTURE_MEMORY
    net = load_sam2_video(imported / "sam")  # transformers' from_pretrained (+ the 16-channel memory refit)
    assert type(net).__name__ == "Sam2VideoModel"
    loaded = net.state_dict()
    source = _fixture_sam()
    memory = [k for k in source if k.startswith(MEMORY_ROOTS)]
    assert len(source) == 342 and len(memory) == 79  # the fixture README's counts
    worst, compared = 0.0, 0
    for name, value in source.items():
        if name.startswith(MEMORY_ROOTS):
            target = _memory_name(name)
        elif name.startswith("sam_prompt_encoder.point_embeddings."):  # one row each of transformers' point_embed
            row = int(name.split(".")[2])
            worst = max(worst, float((loaded["prompt_encoder.point_embed.weight"][row:row + 1] - value).abs().max()))
            compared += 1
            continue
        else:
            target = sam2_key(name)  # the image half, checked end to end by tests/test_sa2va_parity.py
        assert target in loaded, f"{name} -> {target}: not in the loaded Sam2VideoModel"
        assert loaded[target].shape == value.shape, name
        worst = max(worst, float((loaded[target] - value).abs().max()))
        compared += 1
    assert compared == 342 and worst == 0.0
    # nothing in the loaded model that the checkpoint did not give (transformers' two copies of SAM 2's one
    # positional matrix and the merged point embedding aside)
    given = {_memory_name(k) if k.startswith(MEMORY_ROOTS) else sam2_key(k) for k in source}
    extra = set(loaded) - given - {"prompt_encoder.point_embed.weight", "shared_image_embedding.positional_embedding"}
    assert not extra, sorted(extra)
    assert json.loads((imported / "unused_tensors.json").read_text())["tensors"] == {}


def test_imported_memory_path_runs_on_its_own_memories(imported):
    """The 16-channel memory (transformers builds its memory cross-attention for 64) is usable: the memory encoder's
    output goes through the memory attention at the backbone's top feature size."""
    from medtune.models.video import load_sam2_video

    net = load_sam2_video(imported / "sam").eval()
    hidden, size = net.config.memory_attention_hidden_size, net.config.memory_attention_rope_feat_sizes
    torch.manual_seed(0)
    features = torch.randn(1, hidden, *size)
    mask = torch.rand(1, 1, net.config.image_size, net.config.image_size)
    with torch.no_grad():
        memory, memory_pos = net.memory_encoder(features, mask)
        assert memory.shape == (1, 16, *size)
        tokens = size[0] * size[1]
        out = net.memory_attention(current_vision_features=features.flatten(2).permute(2, 0, 1),
                                   memory=memory.flatten(2).permute(2, 0, 1),
                                   current_vision_position_embeddings=torch.zeros(tokens, 1, hidden),
                                   memory_posision_embeddings=memory_pos.flatten(2).permute(2, 0, 1))
    assert out.shape[-2:] == (tokens, hidden) and out.numel() == tokens * hidden and torch.isfinite(out).all()


def _converted_fixture(extra: dict[str, torch.Tensor] | None = None):
    from transformers import Sam2Config

    from medtune.models.vlm.sa2va_import import (
        _load_safetensors,
        convert_sa2va_state_dict,
        resolve_memory_config,
        sam_video_config,
    )

    state = {**_load_safetensors(FIXTURE / "model"), **(extra or {})}
    sam_only = {k: v for k, v in state.items() if k.startswith(SAM_PREFIX)}
    converted = convert_sa2va_state_dict(sam_only, "qwen2", None, 0)
    image = Sam2Config(**json.loads((FIXTURE / "transformers_sam2_config.json").read_text()))
    memory, _ = resolve_memory_config({}, None, {k: tuple(v.shape) for k, v in converted.sam.items()})
    return converted, sam_video_config(image, memory)


def test_an_unmapped_sam_tensor_is_refused_in_one_line(tmp_path):
    from medtune.errors import UserError
    from medtune.models.vlm.sa2va_import import check_sam_shapes

    converted, config = _converted_fixture()
    check_sam_shapes(tmp_path, converted, config, "the fixture's sizes")  # the fixture itself fits
    unknown = f"{SAM_PREFIX}memory_encoder.mask_downsampler.encoder.2.weight"  # a GELU has no weights
    converted, config = _converted_fixture({unknown: torch.zeros(4)})
    with pytest.raises(UserError) as err:
        check_sam_shapes(tmp_path, converted, config, "the fixture's sizes")
    assert "\n" not in str(err.value) and unknown in str(err.value) and "Sam2VideoModel" in str(err.value)


def test_memory_sizes_stated_by_the_user_win_and_are_checked(tmp_path):
    from medtune.errors import UserError
    from medtune.models.vlm.sa2va_import import import_sa2va

    stated = {**json.loads((FIXTURE / "transformers_sam2_config.json").read_text()),
              "memory_encoder_output_channels": 64}  # Hiera-L's memory width, not the fixture's
    with pytest.raises(UserError) as err:
        import_sa2va(FIXTURE / "model", tmp_path / "out", sam_config=stated)
    message = str(err.value)
    assert "\n" not in message and "the given SAM 2 config" in message and "--sam-config" in message
    assert not (tmp_path / "out" / "sam").exists()


def test_memory_sizes_read_from_sam2_py_as_data(tmp_path):
    """Sa2VA's sam2.py states the memory sizes as literals in build_memory_attention / build_memory_encoder (nested
    builders; kernel_size / padding / num_layers occur in several of them) and the SAM2VideoPredictor(...) call. The
    file mimics that layout with the fixture's values; it fails if executed."""
    from medtune.models.vlm.sa2va_import import memory_config_from_sam2_py, memory_config_from_weights

    (tmp_path / "sam2.py").write_text('''
class SAM2:
    def __init__(self):
        model = SAM2VideoPredictor(num_maskmem=7, image_size=1024, add_tpos_enc_to_obj_ptrs=False)

    def build_memory_attention(self):
        def build_layer():
            def build_cross_attention():
                num_heads = 1
                downsample_rate = 1
                kv_in_dim = 16
                return RoPEAttention(num_heads=num_heads, kv_in_dim=kv_in_dim)
            dim_feedforward = 256
            d_model = 32
            return MemoryAttentionLayer(d_model=d_model, dim_feedforward=dim_feedforward)
        d_model = 32
        num_layers = 1
        return MemoryAttention(d_model=d_model, num_layers=num_layers, layer=build_layer())

    def build_memory_encoder(self):
        def build_mask_downsampler():
            kernel_size = 3
            stride = 2
            padding = 1
            return MaskDownSampler(kernel_size=kernel_size, stride=stride, padding=padding, embed_dim=32)
        def build_fuser():
            def build_layer():
                dim = 32
                kernel_size = 7
                padding = 3
                layer_scale_init_value = 1e-6
                return CXBlock(dim=dim, kernel_size=kernel_size, padding=padding)
            num_layers = 2
            return Fuser(layer=build_layer(), num_layers=num_layers)
        out_dim = 16
        return MemoryEncoder(out_dim=out_dim, mask_downsampler=build_mask_downsampler(), in_dim=32)

raise SystemExit("executed")
''')
    read = memory_config_from_sam2_py(tmp_path / "sam2.py")
    converted, _ = _converted_fixture()
    weights = memory_config_from_weights({k: tuple(v.shape) for k, v in converted.sam.items()})
    shared = set(read) & set(weights)
    assert {"memory_encoder_output_channels", "memory_fuser_kernel_size", "mask_downsampler_kernel_size",
            "memory_fuser_num_layers", "memory_attention_num_layers", "num_maskmem"} <= shared
    assert {k: read[k] for k in shared} == {k: weights[k] for k in shared}
    assert read["memory_fuser_padding"] == 3 and read["mask_downsampler_padding"] == 1
    assert read["image_size"] == 1024 and read["memory_attention_num_attention_heads"] == 1


def test_imported_sam_trains_and_propagates_as_the_sam2_video_family(imported):
    """The imported sam/ is a model.path for family sam2_video (16-channel memories included): a LoRA clip step has
    gradient and `propagate` runs through a sequence with the memory bank."""
    from medtune.config import build_config
    from medtune.losses import ComboLoss
    from medtune.models import video as V
    from medtune.models.registry import build_model

    cfg = build_config({"data": {"channels": 3, "sampling": "whole_image"},
                        "model": {"family": "sam2_video", "path": str(imported / "sam"), "prompt": "mask"}})
    seg = build_model(cfg)
    size = seg.image_size
    torch.manual_seed(0)
    frames = torch.rand(1, 4, 3, size, size)
    masks = torch.zeros(1, 4, 1, size, size)
    masks[..., size // 4:size // 2, size // 4:size // 2] = 1
    batch = {"frames": frames, "masks": masks, "annotated": torch.ones(1, 4, dtype=torch.bool)}
    out = seg(batch=batch)
    assert out.mask_logits.shape == (1, 4, 1, size, size)
    # the random fixture calls the tracked frames empty (constant logits): SAM 2's object-score term carries gradient
    loss, _ = V.clip_loss(out, batch, ComboLoss(cfg.loss))
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in seg.named_parameters() if "lora_B" in n)
    probs = list(V.propagate(seg, list(frames[0]), V.VideoPrompt(mask=masks[0, 0, 0])))
    assert [i for i, _ in probs] == [0, 1, 2, 3] and all(torch.isfinite(p).all() for _, p in probs)
