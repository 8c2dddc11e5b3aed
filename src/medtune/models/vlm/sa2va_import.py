"""Opt-in importer: a Sa2VA checkpoint (InternVL-based Sa2VA-1B / 4B / 8B) -> a composed segvlm folder.

    python -m medtune.models.vlm.sa2va_import <Sa2VA folder> <out folder>      # then model.path=<out folder>
        [--sam-config FILE.json]   transformers Sam2Config kwargs of the checkpoint's SAM 2 (default: Hiera-L, what
                                   every published Sa2VA uses; Sa2VA's config.json does not record it)
        [--trust-remote-code]      allow a tokenizer that only loads with the folder's own code (never needed for
                                   Qwen-based Sa2VA; without it such a folder is refused in one line, never prompted)

A Sa2VA release (ByteDance/Sa2VA-*) is remote code: ``Sa2VAChatModel`` = ``vision_model`` (InternViT) + ``mlp1``
(LayerNorm, Linear, GELU, Linear) + ``language_model`` (Qwen2ForCausalLM for 1B/4B, InternLM2ForCausalLM for 8B) +
``grounding_encoder.sam2_model`` (the original SAM 2 code, Hiera-L) + ``text_hidden_fcs`` (Linear, ReLU, Linear,
Dropout). The weights are renamed onto the segvlm parts with the key maps of transformers' own conversion scripts,
``models/internvl/convert_internvl_weights_to_hf.py`` (vision, mlp1, InternLM2 -> Llama incl. the grouped ``wqkv``
split) and ``models/sam2/convert_sam2_to_hf.py`` (``replace_keys``). Those scripts are not part of the transformers
wheel, so their maps are transcribed here (``INTERNVL_*`` and ``SAM2_*`` below, same order and patterns).

Checked offline (tests/test_segvlm_model.py): a fake tiny state dict with Sa2VA's key names - written from the
original module layouts (InternViT ``attn.qkv``/``ls1``/``norm1``, Qwen2 / InternLM2 ``wqkv``, SAM 2 ``image_encoder.
trunk`` ...) and anchored on checkpoint key names seen in public code that reads real SAM 2 checkpoints - converts
with every key used or reported, loads into the composed model through transformers' own loader with no missing
key, and reproduces every tensor of the model it was generated from. Not checked here: a full-size Sa2VA
checkpoint (bf16 weights, Hiera-L) and the 8B InternLM2 tokenizer (remote code; it needs transformers' converted
Llama tokenizer, which this importer does not build). SAM 2's sizes: ``--sam-config``, else read as data from the
folder's ``sam2.py`` (``ast``, never executed), else Hiera-L; the weights' shapes are checked against them before
anything is written. The composed folder reproduces Sa2VA's own preprocessing and decoding: the image processor is
written with InternVL's dynamic tiling (``crop_to_patches``, 1..12 tiles + thumbnail as Sa2VA's predict_forward),
``segvlm.json`` carries the bf16-rounded ImageNet mean/std of Sa2VA's SAM input, and SAM 2's three masks are decoded
with the best predicted IoU kept (``model.vlm.mask_output``), without object-score gating. tests/test_sa2va_parity.py
checks this against tensors Sa2VA's own code computed (``../shared/fixtures/sa2va-tiny``).

SAM 2 is written whole, once: ``sam/`` is a transformers ``Sam2VideoModel`` checkpoint (``config.json`` model_type
``sam2_video``) holding every SAM 2 tensor of the checkpoint, its video half included (memory attention, memory
encoder, object-pointer projection, ``mask_downsample``, ``maskmem_tpos_enc``, ``no_mem_pos_enc``, ``no_obj_ptr``).
The segvlm family loads it whole as its mask head (models.vlm.seg.parts.load_sam -> models.video.load_sam2_video): the
image path for images, the memory too when it trains on videos; family sam2_video loads it the same way. Its memory
sizes (Sam2VideoConfig kwargs) come, each, from the first that states it: ``--sam-config`` (Sam2VideoConfig kwargs may
be added to the Sam2Config ones), the folder's ``sam2.py`` (``build_memory_attention`` / ``build_memory_encoder`` /
the ``SAM2VideoPredictor(...)`` call, read with ``ast``), the weights' shapes (every memory size shows in a tensor).
The names are transformers' conversion names (``SAM2_*``) plus the memory encoder's (``_rename_memory_tensors``); a
tensor that has no place in the Sam2VideoModel, or one of another shape, is refused in one line before anything is
written. ``unused_tensors.json`` lists the Sa2VA tensors of modules segvlm does not have (none in a Sa2VA hub
checkpoint).
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medtune.errors import MissingFileError, UserError
from medtune.models.vlm.seg.parts import (
    FORMAT_VERSION,
    PROJECTION_FILE,
    SAM_DIR,
    SAM_MEAN_KEY,
    SAM_STD_KEY,
    SEGVLM_JSON,
    VLM_DIR,
)

# --- transcribed from transformers models/internvl/convert_internvl_weights_to_hf.py -----------------------------
INTERNVL_VISION_MAP = {
    r"vision_model": r"vision_tower",
    r"layers": r"layer",
    r"class_embedding": r"cls_token",
    r"position_embedding": r"position_embeddings",
    r"patch_embedding": r"patch_embeddings.projection",
    r"ls(\d+)": r"lambda_\1",
    r"attn.proj": r"attention.projection_layer",
    r"attn.dropout": r"attention.projection_dropout",
    r"attn": r"attention",
    r"norm1": r"layernorm_before",
    r"norm2": r"layernorm_after",
}
INTERNVL_TEXT_LLAMA_MAP = {
    r"tok_embeddings": r"embed_tokens",
    r"attention.wo": r"self_attn.o_proj",
    r"feed_forward.w1": r"mlp.gate_proj",
    r"feed_forward.w2": r"mlp.down_proj",
    r"feed_forward.w3": r"mlp.up_proj",
    r"attention_norm": r"input_layernorm",
    r"ffn_norm": r"post_attention_layernorm",
    r"output": r"lm_head",
}
INTERNVL_MULTI_MAP = {
    r"mlp1.0": r"multi_modal_projector.layer_norm",
    r"mlp1.1": r"multi_modal_projector.linear_1",
    r"mlp1.3": r"multi_modal_projector.linear_2",
}
INTERNVL_UNNECESSARY_CONFIG_KEYS = [
    "_name_or_path", "_attn_implementation_autoset", "auto_map", "use_bfloat16", "use_flash_attn", "bias",
    "laux_allreduce", "moe_coeff_ratio", "moe_intermediate_size", "moe_output_scale", "noisy_gate_policy",
    "shared_expert_intermediate_size", "use_residual", "use_moe", "use_rts", "use_weighted_residual", "moe_config",
    "num_experts", "num_routed_experts", "num_shared_experts", "capacity_factor", "eval_capacity_factor",
    "drop_path_rate",
]
# --- transcribed from transformers models/sam2/convert_sam2_to_hf.py (replace_keys) ------------------------------
SAM2_KEYS_TO_MODIFY = {
    "iou_prediction_head.layers.0": "iou_prediction_head.proj_in",
    "iou_prediction_head.layers.1": "iou_prediction_head.layers.0",
    "iou_prediction_head.layers.2": "iou_prediction_head.proj_out",
    "mask_decoder.output_upscaling.0": "mask_decoder.upscale_conv1",
    "mask_decoder.output_upscaling.1": "mask_decoder.upscale_layer_norm",
    "mask_decoder.output_upscaling.3": "mask_decoder.upscale_conv2",
    "mask_downscaling.0": "mask_embed.conv1",
    "mask_downscaling.1": "mask_embed.layer_norm1",
    "mask_downscaling.3": "mask_embed.conv2",
    "mask_downscaling.4": "mask_embed.layer_norm2",
    "mask_downscaling.6": "mask_embed.conv3",
    "dwconv": "depthwise_conv",
    "pwconv": "pointwise_conv",
    "fuser": "memory_fuser",
    "point_embeddings": "point_embed",
    "pe_layer.positional_encoding_gaussian_matrix": "shared_embedding.positional_embedding",
    "obj_ptr_tpos_proj": "temporal_positional_encoding_projection_layer",
    "no_obj_embed_spatial": "occlusion_spatial_embedding_parameter",
    "sam_prompt_encoder": "prompt_encoder",
    "sam_mask_decoder": "mask_decoder",
    "maskmem_tpos_enc": "memory_temporal_positional_encoding",
    "gamma": "scale",
    "image_encoder.neck": "vision_encoder.neck",
    "image_encoder": "vision_encoder.backbone",
    "neck.0": "neck.conv1",
    "neck.1": "neck.layer_norm1",
    "neck.2": "neck.conv2",
    "neck.3": "neck.layer_norm2",
    "pix_feat_proj": "feature_projection",
    "patch_embed.proj": "patch_embed.projection",
    "no_mem_embed": "no_memory_embedding",
    "no_mem_pos_enc": "no_memory_positional_encoding",
    "obj_ptr": "object_pointer",
    ".norm": ".layer_norm",
    "trunk.": "",
    "out_proj": "o_proj",
}
_SAM2_RULES = [  # (pattern, group holding the layer number, {layer: (old, new)})
    (r"vision_encoder.backbone.blocks.(\d+).mlp.layers.(\d+).*", 2,
     {0: ("layers.0", "proj_in"), 1: ("layers.1", "proj_out")}),
    (r"mask_decoder.transformer.layers.(\d+).mlp.layers.(\d+).*", 2,
     {0: ("mlp.layers.0", "mlp.proj_in"), 1: ("mlp.layers.1", "mlp.proj_out")}),
    (r"mask_decoder.pred_obj_score_head.layers.(\d+).*", 1,
     {0: ("layers.0", "proj_in"), 1: ("layers.1", "layers.0"), 2: ("layers.2", "proj_out")}),
    (r".*.output_hypernetworks_mlps.(\d+).layers.(\d+).*", 2,
     {0: ("layers.0", "proj_in"), 1: ("layers.1", "layers.0"), 2: ("layers.2", "proj_out")}),
    (r"object_pointer_proj.layers.(\d+).*", 1,
     {0: ("layers.0", "proj_in"), 1: ("layers.1", "layers.0"), 2: ("layers.2", "proj_out")}),
]
SAM2_POINT_EMBEDDINGS = 4
# Sa2VA's SAM 2 video (memory) tensors that replace_keys leaves in the original layout, renamed onto Sam2VideoModel:
# SAM 2's MaskDownSampler is one Sequential [conv, LayerNorm2d, GELU] x n + a final 1x1 conv (transformers: layers.i.
# conv / layers.i.layer_norm / final_conv), and Sa2VA's CXBlock calls SAM 2's layer scale ``gamma`` ``g_weight``.
MASK_DOWNSAMPLER_KEY = re.compile(r"^memory_encoder\.mask_downsampler\.encoder\.(\d+)\.(weight|bias)$")
MASK_DOWNSAMPLER_STEP = 3  # modules per downsampling step in the Sequential: conv, norm, activation
FUSER_SCALE = (".g_weight", ".scale")

# Sa2VA's module prefixes
SAM_PREFIX = "grounding_encoder.sam2_model."
PROJECTION_PREFIX = "text_hidden_fcs."
LLM_TYPES = {"Qwen2ForCausalLM": "qwen2", "InternLM2ForCausalLM": "llama", "LlamaForCausalLM": "llama"}
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
UNUSED_FILE = "unused_tensors.json"  # next to segvlm.json: Sa2VA tensors the image model does not use
HIERA_L = "the default Hiera-L SAM 2"
SAM2_IMAGE_PARTS = ("vision_config", "prompt_encoder_config", "mask_decoder_config")  # Sam2Config's sub-configs
# Sa2VA's preparing_for_generation fixes the tiling whatever config.json says (its dynamic_image_size / use_thumbnail /
# min/max_dynamic_patch are the training-time values): dynamic_preprocess with 1..12 tiles and a thumbnail.
SA2VA_MIN_TILES, SA2VA_MAX_TILES = 1, 12
# transformers' InternVL chat template (the conversion script's), with the image rendered as the context token the
# segvlm codec expands to <img> + n x <IMG_CONTEXT> + </img>: the layout Sa2VA's own prompts use.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class ConvertedState:
    vlm: dict[str, torch.Tensor] = field(default_factory=dict)  # transformers' InternVL checkpoint key names
    sam: dict[str, torch.Tensor] = field(default_factory=dict)  # Sam2VideoModel names (Sam2Model's for the image half)
    projection: dict[str, torch.Tensor] = field(default_factory=dict)  # seg_projection names ("0.weight" ...)
    unused: list[str] = field(default_factory=list)  # Sa2VA keys with no place in segvlm
    sam_source: dict[str, str] = field(default_factory=dict)  # SAM name -> the Sa2VA key it came from


def _apply(key: str, mapping: dict[str, str]) -> str:
    for pattern, replacement in mapping.items():
        key = re.sub(pattern, replacement, key)
    return key


def sam2_key(key: str) -> str:
    """An original SAM 2 key (``image_encoder.trunk.blocks.0.norm1.weight``) -> ``Sam2Model``'s."""
    for old, new in SAM2_KEYS_TO_MODIFY.items():
        if old in key:
            key = key.replace(old, new)
    for pattern, group, renames in _SAM2_RULES:
        match = re.match(pattern, key)
        if match and int(match.group(group)) in renames:
            old, new = renames[int(match.group(group))]
            key = key.replace(old, new)
    if re.match(r"vision_encoder.neck.convs.(\d+).conv", key):
        key = key.replace(".conv.", ".")
    if re.match(r"memory_encoder.o_proj.*", key):
        key = key.replace(".o_proj.", ".projection.")
    return key


def _split_wqkv(weight: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """InternLM2's fused ``wqkv`` rows are grouped per KV head: [q x groups, k, v] (rearrange "(h gs d) z")."""
    groups = num_heads // num_kv_heads
    rows = weight.view(num_kv_heads, groups + 2, head_dim, weight.shape[-1])
    q = rows[:, :groups].reshape(-1, weight.shape[-1])
    return q.contiguous(), rows[:, -2].reshape(-1, weight.shape[-1]).contiguous(), \
        rows[:, -1].reshape(-1, weight.shape[-1]).contiguous()


def convert_sa2va_state_dict(state: dict[str, torch.Tensor], llm_type: str, text_config, vision_hidden_size: int
                             ) -> ConvertedState:
    """Rename (and split) a Sa2VA state dict onto the segvlm parts; nothing is dropped silently (``unused``)."""
    out = ConvertedState()
    for key, value in state.items():
        if key.startswith("vision_model."):
            new = _apply(key, INTERNVL_VISION_MAP)
            if "attn.qkv" in key:  # InternViT fused qkv -> q/k/v, rows in that order
                dim = vision_hidden_size
                for part, rows in (("q_proj", value[:dim]), ("k_proj", value[dim:2 * dim]), ("v_proj", value[-dim:])):
                    out.vlm[new.replace("attention.qkv", f"attention.{part}")] = rows.contiguous()
                continue
            out.vlm[new] = value
        elif key.startswith("language_model."):
            new = _apply(key, INTERNVL_TEXT_LLAMA_MAP) if llm_type == "llama" else key
            if "attention.wqkv" in key:
                head_dim = getattr(text_config, "head_dim", None) or \
                    text_config.hidden_size // text_config.num_attention_heads
                q, k, v = _split_wqkv(value, text_config.num_attention_heads, text_config.num_key_value_heads,
                                      head_dim)
                for part, rows in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    out.vlm[new.replace("attention.wqkv", f"self_attn.{part}")] = rows
                continue
            out.vlm[new] = value
        elif key.startswith("mlp1."):
            out.vlm[_apply(key, INTERNVL_MULTI_MAP)] = value
        elif key.startswith(SAM_PREFIX):
            new = sam2_key(key[len(SAM_PREFIX):])
            out.sam[new] = value
            out.sam_source[new] = key
        elif key.startswith(PROJECTION_PREFIX):
            out.projection[key[len(PROJECTION_PREFIX):]] = value
        else:
            out.unused.append(key)
    _rename_memory_tensors(out)
    point = [f"prompt_encoder.point_embed.{i}.weight" for i in range(SAM2_POINT_EMBEDDINGS)]
    if all(p in out.sam for p in point):
        out.sam["prompt_encoder.point_embed.weight"] = torch.cat([out.sam.pop(p) for p in point], dim=0)
    shared = "prompt_encoder.shared_embedding.positional_embedding"
    if shared in out.sam:
        out.sam["shared_image_embedding.positional_embedding"] = out.sam[shared]
    return out


def _rename_memory_tensors(out: ConvertedState) -> None:
    """The memory encoder's tensors replace_keys does not rename (MASK_DOWNSAMPLER_KEY, FUSER_SCALE) -> Sam2VideoModel's.
    A mask-downsampler index that is neither a conv, a norm nor the last (final) conv is left as is: the shape check
    then refuses it as unmapped."""
    steps = [int(m.group(1)) for m in map(MASK_DOWNSAMPLER_KEY.match, out.sam) if m]
    final = max(steps, default=-1)
    for key in list(out.sam):
        new = key
        match = MASK_DOWNSAMPLER_KEY.match(key)
        if match:
            index, kind = int(match.group(1)), match.group(2)
            step, position = divmod(index, MASK_DOWNSAMPLER_STEP)
            prefix = "memory_encoder.mask_downsampler"
            if index == final:
                new = f"{prefix}.final_conv.{kind}"
            elif position in (0, 1):
                new = f"{prefix}.layers.{step}.{'conv' if position == 0 else 'layer_norm'}.{kind}"
        elif key.startswith("memory_encoder.memory_fuser.") and key.endswith(FUSER_SCALE[0]):
            new = key[:-len(FUSER_SCALE[0])] + FUSER_SCALE[1]
        if new != key:
            out.sam[new] = out.sam.pop(key)
            out.sam_source[new] = out.sam_source.pop(key)


def internvl_config(meta: dict, image_token_id: int, tie_word_embeddings: bool):
    """``InternVLConfig`` from a Sa2VA config.json (the conversion script's ``get_internvl_config``)."""
    from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig, Qwen2Config

    llm = {k: v for k, v in meta["llm_config"].items()
           if k not in INTERNVL_UNNECESSARY_CONFIG_KEYS and k not in ("model_type", "architectures")}
    llm["use_cache"] = True
    llm["tie_word_embeddings"] = tie_word_embeddings
    vision = {k: v for k, v in meta["vision_config"].items()
              if k not in INTERNVL_UNNECESSARY_CONFIG_KEYS and k not in ("model_type", "architectures")}
    vision["use_absolute_position_embeddings"] = True
    if "attention_probs_dropout_prob" in vision:
        vision["attention_dropout"] = vision["projection_dropout"] = vision.pop("attention_probs_dropout_prob")
    if "qk_normalization" in vision:
        vision["use_qk_norm"] = vision.pop("qk_normalization")
    if "qkv_bias" in vision:
        vision["attention_bias"] = vision.pop("qkv_bias")
    text_cls = Qwen2Config if LLM_TYPES[meta["llm_config"]["architectures"][0]] == "qwen2" else LlamaConfig
    image_size = meta.get("force_image_size") or vision.get("image_size")
    if image_size:
        vision["image_size"] = image_size
    vision_config = InternVLVisionConfig(**vision)
    grid = vision_config.image_size[0] // vision_config.patch_size[0]
    ratio = meta.get("downsample_ratio", 0.5)
    return InternVLConfig(
        text_config=text_cls(**llm), vision_config=vision_config, image_token_id=image_token_id,
        downsample_ratio=ratio, image_seq_length=int(grid * grid * ratio * ratio),
        vision_feature_layer=meta.get("select_layer", -1), tie_word_embeddings=tie_word_embeddings,
    )


def sam2_hiera_large_config():
    """The SAM 2 (2.0) Hiera-L configuration Sa2VA's grounding encoder uses (``get_config("sam2_hiera_large")``)."""
    from transformers import Sam2Config, Sam2HieraDetConfig, Sam2VisionConfig

    backbone = Sam2HieraDetConfig(hidden_size=144, num_attention_heads=2, embed_dim_per_stage=[144, 288, 576, 1152],
                                  num_attention_heads_per_stage=[2, 4, 8, 16], blocks_per_stage=[2, 6, 36, 4],
                                  global_attention_blocks=[23, 33, 43], window_positional_embedding_background_size=[7, 7],
                                  window_size_per_stage=[8, 4, 16, 8])
    return Sam2Config(vision_config=Sam2VisionConfig(backbone_config=backbone,
                                                     backbone_channel_list=[1152, 576, 288, 144]))


# Sa2VA's sam2.py hard-codes its SAM 2 sizes as literal assignments / keyword arguments inside these functions
SAM2_PY = "sam2.py"
_SAM2_PY_NAMES = {
    "build_trunk": ("embed_dim", "num_heads", "stages", "global_att_blocks", "window_pos_embed_bkg_spatial_size",
                    "window_spec"),
    "build_neck": ("d_model", "backbone_channel_list"),
    "_build_sam_heads": ("mlp_dim", "num_heads", "iou_head_hidden_dim"),
}


def sam_config_from_sam2_py(path: Path) -> dict | None:
    """Sam2Config kwargs read from Sa2VA's ``sam2.py`` as DATA (``ast``: literal assignments and literal keyword
    arguments in ``build_trunk`` / ``build_neck`` / ``_build_sam_heads``); the file is never executed. None when a
    size is missing or not a literal (then the user passes ``--sam-config``)."""
    import ast

    try:
        tree = ast.parse(path.read_text())
    except (SyntaxError, UnicodeDecodeError, OSError):
        return None
    found: dict[str, dict] = {name: {} for name in _SAM2_PY_NAMES}
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef) or func.name not in _SAM2_PY_NAMES:
            continue
        wanted, values = _SAM2_PY_NAMES[func.name], found[func.name]
        for node in ast.walk(func):
            pairs = []
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                pairs.append((node.targets[0].id, node.value))
            elif isinstance(node, ast.Call):
                pairs += [(kw.arg, kw.value) for kw in node.keywords if kw.arg]
            for name, value in pairs:
                if name in wanted and name not in values:
                    try:
                        values[name] = ast.literal_eval(value)
                    except ValueError:  # a variable, not a literal: its own assignment is read instead
                        continue
    if any(set(found[f]) != set(names) for f, names in _SAM2_PY_NAMES.items()):
        return None
    trunk, neck, heads = found["build_trunk"], found["build_neck"], found["_build_sam_heads"]
    stages = len(trunk["stages"])
    return {
        "vision_config": {
            "backbone_config": {
                "model_type": "sam2_hiera_det_model", "hidden_size": trunk["embed_dim"],
                "num_attention_heads": trunk["num_heads"],
                "embed_dim_per_stage": [trunk["embed_dim"] * 2 ** i for i in range(stages)],
                "num_attention_heads_per_stage": [trunk["num_heads"] * 2 ** i for i in range(stages)],
                "blocks_per_stage": list(trunk["stages"]), "global_attention_blocks": list(trunk["global_att_blocks"]),
                "window_positional_embedding_background_size": list(trunk["window_pos_embed_bkg_spatial_size"]),
                "window_size_per_stage": list(trunk["window_spec"])},
            "backbone_channel_list": list(neck["backbone_channel_list"]), "fpn_hidden_size": neck["d_model"]},
        # SAM 2's prompt / decoder width is the FPN's d_model (256 in every published SAM 2)
        "prompt_encoder_config": {"hidden_size": neck["d_model"]},
        "mask_decoder_config": {"hidden_size": neck["d_model"], "mlp_dim": heads["mlp_dim"],
                                "num_attention_heads": heads["num_heads"],
                                "iou_head_hidden_dim": heads["iou_head_hidden_dim"]},
    }


# --- the memory (video) half of SAM 2: Sam2VideoConfig kwargs ------------------------------------------------------
# Where each memory size is read in sa2va's sam2.py: (enclosing functions, in order; name of the literal). Sizes
# sam2.py leaves to its classes' defaults (MemoryEncoder in_dim, MaskDownSampler embed_dim / total_stride) get them.
_SAM2_PY_MEMORY = {
    "memory_attention_hidden_size": (("build_memory_attention",), "d_model"),
    "memory_attention_num_layers": (("build_memory_attention",), "num_layers"),
    "memory_attention_feed_forward_hidden_size": (("build_memory_attention",), "dim_feedforward"),
    "memory_attention_num_attention_heads": (("build_memory_attention", "build_cross_attention"), "num_heads"),
    "memory_attention_downsample_rate": (("build_memory_attention", "build_cross_attention"), "downsample_rate"),
    "memory_encoder_output_channels": (("build_memory_encoder",), "out_dim"),
    "memory_encoder_hidden_size": (("build_memory_encoder",), "in_dim"),
    "mask_downsampler_embed_dim": (("build_memory_encoder", "build_mask_downsampler"), "embed_dim"),
    "mask_downsampler_kernel_size": (("build_memory_encoder", "build_mask_downsampler"), "kernel_size"),
    "mask_downsampler_stride": (("build_memory_encoder", "build_mask_downsampler"), "stride"),
    "mask_downsampler_padding": (("build_memory_encoder", "build_mask_downsampler"), "padding"),
    "mask_downsampler_total_stride": (("build_memory_encoder", "build_mask_downsampler"), "total_stride"),
    "memory_fuser_num_layers": (("build_memory_encoder", "build_fuser"), "num_layers"),
    "memory_fuser_embed_dim": (("build_memory_encoder", "build_fuser", "build_layer"), "dim"),
    "memory_fuser_kernel_size": (("build_memory_encoder", "build_fuser", "build_layer"), "kernel_size"),
    "memory_fuser_padding": (("build_memory_encoder", "build_fuser", "build_layer"), "padding"),
    "memory_fuser_layer_scale_init_value": (("build_memory_encoder", "build_fuser", "build_layer"),
                                            "layer_scale_init_value"),
}
# the class defaults sam2.py relies on (SAM 2's MemoryEncoder / MaskDownSampler signatures)
_SAM2_PY_MEMORY_DEFAULTS = {"memory_encoder_hidden_size": 256, "mask_downsampler_embed_dim": 256,
                            "mask_downsampler_total_stride": 16}
# SAM2VideoPredictor(...) keyword arguments of Sa2VA's SAM2 -> Sam2VideoConfig
_SAM2_PY_PREDICTOR = "SAM2VideoPredictor"
_SAM2_PY_PREDICTOR_KWARGS = {
    "num_maskmem": "num_maskmem", "image_size": "image_size", "sigmoid_scale_for_mem_enc": "sigmoid_scale_for_mem_enc",
    "sigmoid_bias_for_mem_enc": "sigmoid_bias_for_mem_enc", "multimask_output_in_sam": "multimask_output_in_sam",
    "multimask_output_for_tracking": "multimask_output_for_tracking", "multimask_min_pt_num": "multimask_min_pt_num",
    "multimask_max_pt_num": "multimask_max_pt_num",
    # SAM 2.0 (Sa2VA): no temporal encoding of object pointers; transformers has it and its projection as one switch
    "add_tpos_enc_to_obj_ptrs": "enable_temporal_pos_encoding_for_object_pointers",
}
# SAM 2's CXBlock (memory fuser layer): pointwise MLP of 4 x its width
FUSER_EXPANSION = 4
# Sam2VideoModel tensor whose presence turns a config switch on (SAM 2.1 added both; Sa2VA's SAM 2.0 has neither)
_OPTIONAL_VIDEO_TENSORS = {
    "enable_temporal_pos_encoding_for_object_pointers": "temporal_positional_encoding_projection_layer.weight",
    "enable_occlusion_spatial_embedding": "occlusion_spatial_embedding_parameter",
}


def _literals(tree) -> dict[tuple[str, ...], object]:
    """Every literal assignment ``name = <literal>`` and literal keyword argument ``f(name=<literal>)`` of a parsed
    file, keyed by (enclosing function names..., name); call keywords also by ("call:" + callee, name). First wins."""
    import ast

    found: dict[tuple[str, ...], object] = {}

    def keep(key: tuple[str, ...], node) -> None:
        if key in found:
            return
        try:
            found[key] = ast.literal_eval(node)
        except (ValueError, TypeError, SyntaxError):  # a variable or an expression: its own assignment counts
            pass

    def visit(node, scope: tuple[str, ...]) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope + (child.name,) if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else scope
            if isinstance(child, ast.Assign) and len(child.targets) == 1 and isinstance(child.targets[0], ast.Name):
                keep(scope + (child.targets[0].id,), child.value)
            elif isinstance(child, ast.Call):
                callee = getattr(child.func, "id", None) or getattr(child.func, "attr", None)
                for kw in child.keywords:
                    if kw.arg:
                        keep(scope + (kw.arg,), kw.value)
                        keep((f"call:{callee}", kw.arg), kw.value)
            visit(child, inner)

    visit(tree, ())
    return found


def _within(literals: dict, functions: tuple[str, ...], name: str):
    """The first literal ``name`` whose enclosing functions include ``functions`` in that order (None: absent)."""
    for key, value in literals.items():
        scope, it = key[:-1], iter(key[:-1])
        if key[-1] == name and not (scope and scope[0].startswith("call:")) and all(f in it for f in functions):
            return value
    return None


def memory_config_from_sam2_py(path: Path) -> dict:
    """Sam2VideoConfig memory kwargs read from Sa2VA's ``sam2.py`` as DATA (``ast``; never executed): the literals of
    ``build_memory_attention`` / ``build_memory_encoder`` and of the ``SAM2VideoPredictor(...)`` call. Only what the
    file states (plus the class defaults it relies on); {} when it cannot be parsed or holds no memory sizes."""
    import ast

    try:
        literals = _literals(ast.parse(path.read_text()))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return {}
    out = {key: _within(literals, functions, name) for key, (functions, name) in _SAM2_PY_MEMORY.items()}
    out = {k: v for k, v in out.items() if v is not None}
    if not out:
        return {}
    out = {**_SAM2_PY_MEMORY_DEFAULTS, **out}
    if "memory_fuser_embed_dim" in out:
        out["memory_fuser_intermediate_dim"] = FUSER_EXPANSION * out["memory_fuser_embed_dim"]
    kv = _within(literals, ("build_memory_attention", "build_cross_attention"), "kv_in_dim")
    if kv is not None and "memory_encoder_output_channels" in out and kv != out["memory_encoder_output_channels"]:
        raise UserError(f"{path}: memory cross-attention kv_in_dim {kv} differs from the memory encoder's out_dim "
                         f"{out['memory_encoder_output_channels']}; SAM 2 reads its memories with kv_in_dim = out_dim")
    for name, key in _SAM2_PY_PREDICTOR_KWARGS.items():
        value = literals.get((f"call:{_SAM2_PY_PREDICTOR}", name))
        if value is not None:
            out[key] = value
    return out


def memory_config_from_weights(shapes: dict[str, tuple]) -> dict:
    """Sam2VideoConfig memory kwargs read from the converted SAM 2 tensors' shapes (Sam2VideoModel names). Unlike
    Hiera's global-attention blocks, every memory size shows in some tensor; what does not (attention heads, RoPE
    theta, the sigmoid scale of masks fed to memory) is the same in every published SAM 2: transformers' defaults."""
    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})

    attention, encoder = "memory_attention.layers.0.", "memory_encoder."
    needed = [attention + "self_attn.q_proj.weight", encoder + "projection.weight", "memory_temporal_positional_encoding",
              encoder + "mask_downsampler.layers.0.conv.weight", encoder + "memory_fuser.layers.0.depthwise_conv.weight"]
    absent = [k for k in needed if k not in shapes]
    if absent:
        raise UserError(f"the SAM 2 weights hold no {absent[0]!r} (a SAM 2 video model has memory attention and a "
                         "memory encoder); pass its memory sizes with --sam-config FILE.json (Sam2VideoConfig kwargs)")
    hidden = shapes[attention + "self_attn.q_proj.weight"][1]
    downsampler = count(encoder + "mask_downsampler.layers.")
    kernel = shapes[encoder + "mask_downsampler.layers.0.conv.weight"][-1]
    fuser_kernel = shapes[encoder + "memory_fuser.layers.0.depthwise_conv.weight"][-1]
    total_stride = _SAM2_PY_MEMORY_DEFAULTS["mask_downsampler_total_stride"]
    out = {
        "memory_attention_hidden_size": hidden,
        "memory_attention_num_layers": count("memory_attention.layers."),
        "memory_attention_feed_forward_hidden_size": shapes[attention + "linear1.weight"][0],
        "memory_attention_downsample_rate": hidden // shapes[attention + "self_attn.q_proj.weight"][0],
        "memory_encoder_hidden_size": shapes[encoder + "feature_projection.weight"][1],
        "memory_encoder_output_channels": shapes[encoder + "projection.weight"][0],
        "mask_downsampler_embed_dim": shapes[encoder + "mask_downsampler.final_conv.weight"][0],
        "mask_downsampler_kernel_size": kernel, "mask_downsampler_padding": kernel // 2,
        "mask_downsampler_total_stride": total_stride,
        "mask_downsampler_stride": round(total_stride ** (1 / downsampler)) if downsampler else 2,
        "memory_fuser_num_layers": count(encoder + "memory_fuser.layers."),
        "memory_fuser_embed_dim": shapes[encoder + "memory_fuser.layers.0.depthwise_conv.weight"][0],
        "memory_fuser_intermediate_dim": shapes[encoder + "memory_fuser.layers.0.pointwise_conv1.weight"][0],
        "memory_fuser_kernel_size": fuser_kernel, "memory_fuser_padding": fuser_kernel // 2,
        "num_maskmem": shapes["memory_temporal_positional_encoding"][0],
    }
    out.update({switch: key in shapes for switch, key in _OPTIONAL_VIDEO_TENSORS.items()})
    return out


def sam_video_config(image_config, memory: dict):
    """The ``Sam2VideoConfig`` of the whole SAM 2: the image model's sub-configs plus the memory kwargs, its RoPE grid
    the backbone's top feature map (what the memory attention runs on)."""
    from transformers import Sam2VideoConfig

    image = image_config.to_dict()
    top = image["vision_config"]["backbone_feature_sizes"][-1]
    kwargs = {"image_size": image["prompt_encoder_config"]["image_size"], "memory_attention_rope_feat_sizes": list(top),
              **memory}
    try:
        return Sam2VideoConfig(vision_config=image["vision_config"], prompt_encoder_config=image["prompt_encoder_config"],
                               mask_decoder_config=image["mask_decoder_config"], **kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"the SAM 2 memory sizes are not valid Sam2VideoConfig kwargs: {str(err).splitlines()[0]}"
                         ) from None


def resolve_memory_config(given: dict, sam2_py: Path | None, shapes: dict[str, tuple]) -> tuple[dict, str]:
    """Memory kwargs, each from the first that states it: the given SAM 2 config (``--sam-config``: Sam2VideoConfig
    kwargs), the folder's ``sam2.py``, the weights' shapes. Returns them and where they came from (for messages)."""
    stated = {k: v for k, v in given.items() if k in _video_only_keys()}
    from_file = memory_config_from_sam2_py(sam2_py) if sam2_py is not None and sam2_py.is_file() else {}
    memory = {**memory_config_from_weights(shapes), **from_file, **stated}
    where = [name for name, part in (("the given SAM 2 config", stated), (str(sam2_py), from_file)) if part]
    return memory, " + ".join(where + ["the weights' shapes"])


def _video_only_keys() -> set[str]:
    from transformers import Sam2Config, Sam2VideoConfig

    return set(Sam2VideoConfig().to_dict()) - set(Sam2Config().to_dict())


def _load_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (folder / name).is_file():
            raise MissingFileError(f"{folder / name} missing: the Sa2VA folder must hold its safetensors weights")
        state.update(load_file(str(folder / name)))
    return state


def load_sam_config(value):
    """A ``Sam2Config`` from a config object, a dict of its kwargs, or a JSON file of them (``--sam-config``)."""
    from transformers import Sam2Config

    if value is None or isinstance(value, Sam2Config):
        return value
    if type(value).__name__ == "Sam2VideoConfig":  # its image half
        value = {k: v for k, v in value.to_dict().items() if k in SAM2_IMAGE_PARTS}
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise UserError(f"--sam-config {str(path)!r}: no such file (a JSON object of transformers Sam2Config kwargs)")
        try:
            value = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"--sam-config {str(path)!r} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise UserError("the SAM 2 config must be a JSON object of transformers Sam2Config kwargs")
    try:
        return Sam2Config(**value)
    except (TypeError, ValueError) as err:
        raise UserError(f"the SAM 2 config is not valid Sam2Config kwargs: {str(err).splitlines()[0]}") from None


def check_sam_shapes(src: Path, converted: ConvertedState, video_config, which: str) -> None:
    """Compare the converted SAM 2 weights with a ``Sam2VideoModel`` of ``video_config`` built on the meta device (no
    memory; the image model's tensors are a subset of it): a tensor with no place in it, a missing or a differently
    shaped one is refused in one line, before anything is written."""
    from transformers import Sam2VideoModel

    from medtune.models.video import fit_memory_width

    with torch.device("meta"):
        net = Sam2VideoModel(video_config)
        fit_memory_width(net)
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    unmapped = [k for k in converted.sam if k not in expected]
    missing = [k for k in expected if k not in converted.sam]
    wrong = [f"{k}: weights {list(converted.sam[k].shape)} vs config {list(v)}" for k, v in expected.items()
             if k in converted.sam and tuple(converted.sam[k].shape) != v]
    if wrong or missing:  # other sizes (more blocks, wider layers): the config, not the names, is wrong
        first = wrong[0] if wrong else f"missing {missing[0]}"
        raise UserError(f"{src}: its SAM 2 weights do not fit {which} ({len(wrong)} shapes differ, {len(missing)} "
                         f"missing, {len(unmapped)} unexpected; e.g. {first}); pass --sam-config FILE.json with the "
                         "checkpoint's SAM 2 as transformers Sam2Config (or Sam2VideoConfig) kwargs")
    if unmapped:  # every tensor of the model is there, and more: a tensor the name map does not know
        key = unmapped[0]
        raise UserError(f"{src}: Sa2VA tensor {converted.sam_source.get(key, key)!r} (renamed {key!r}) has no place in "
                         f"transformers' Sam2VideoModel ({len(unmapped)} such tensors): the importer does not know "
                         "this SAM 2 variant")


def _config_kwargs(value) -> dict:
    """The kwargs a SAM 2 config was given as (a config object, a dict, a JSON file; {} for none), for the memory keys
    it may state. The file is read again by load_sam_config, which reports what is wrong with it."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    if isinstance(value, (str, Path)):
        try:
            read = json.loads(Path(value).read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return read if isinstance(read, dict) else {}
    return value.to_dict() if type(value).__name__ == "Sam2VideoConfig" else {}


def _memory_shapes(converted: ConvertedState) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in converted.sam.items()}


def import_sa2va(sa2va_dir: str | Path, out_dir: str | Path, sam_config=None, seg_token: str = "[SEG]",
                 trust_remote_code: bool = False) -> Path:
    """Write a composed segvlm folder (``vlm/``, ``sam/``, ``projection.safetensors``, ``segvlm.json``,
    ``unused_tensors.json``) from a local Sa2VA folder. No Sa2VA code runs: its config.json is read as data and its
    weights renamed. ``sam_config``: a ``Sam2Config``, its kwargs or a JSON file of them (default: Hiera-L)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Sam2VideoModel
    from transformers.models.got_ocr2 import GotOcr2ImageProcessorPil

    from medtune.models.video import fit_memory_width

    src, out = Path(sa2va_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise MissingFileError(f"{src / 'config.json'} missing: point the importer at a Sa2VA checkpoint folder")
    meta = json.loads((src / "config.json").read_text())
    arch = (meta.get("llm_config", {}).get("architectures") or ["?"])[0]
    if arch not in LLM_TYPES or "vision_config" not in meta:
        raise UserError(f"{src}: not an InternVL-based Sa2VA checkpoint (language model {arch!r}; supported: "
                         f"{', '.join(LLM_TYPES)})")
    if meta.get("ps_version", "v2") != "v2":
        raise UserError(f"{src}: ps_version {meta.get('ps_version')!r}; transformers' InternVL implements v2 only")
    given = _config_kwargs(sam_config)
    which = "the given SAM 2 config"
    if sam_config is None and (src / SAM2_PY).is_file():
        sam_config = sam_config_from_sam2_py(src / SAM2_PY)
        which = f"the sizes read from {src / SAM2_PY}"
    if sam_config is None:
        which = HIERA_L
    sam_config = load_sam_config(sam_config) or sam2_hiera_large_config()
    try:
        # trust_remote_code explicit: never transformers' interactive "run the custom code? [y/N]"
        tokenizer = AutoTokenizer.from_pretrained(str(src), extra_special_tokens=dict(IMAGE_TOKENS),
                                                  trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as err:
        hint = ("pass --trust-remote-code to run the folder's tokenizer code" if not trust_remote_code else
                "InternLM2-based Sa2VA (8B) needs a converted Llama tokenizer in the folder")
        raise UserError(f"{src}: its tokenizer does not load ({str(err).splitlines()[0]}); {hint}") from None
    for token in [seg_token, *IMAGE_TOKENS.values()]:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise UserError(f"{src}: the tokenizer does not hold {token!r} as one token (got {ids})")
    state = _load_safetensors(src)
    llm_type = LLM_TYPES[arch]
    head = "language_model.lm_head.weight" if llm_type == "qwen2" else "language_model.output.weight"
    config = internvl_config(meta, tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["context_image_token"]),
                             tie_word_embeddings=head not in state)
    converted = convert_sa2va_state_dict(state, llm_type, config.text_config, config.vision_config.hidden_size)
    # the memory half of SAM 2 (Sam2VideoConfig), then before anything is written: a SAM 2 of other sizes than the
    # config, or with a tensor Sam2VideoModel has no place for, fails here in one line
    memory, memory_from = resolve_memory_config(given, src / SAM2_PY, _memory_shapes(converted))
    video_config = sam_video_config(sam_config, memory)
    check_sam_shapes(src, converted, video_config, f"{which} (memory sizes: {memory_from})")

    vlm_dir = out / VLM_DIR
    vlm_dir.mkdir(parents=True, exist_ok=True)
    config.architectures = ["InternVLForConditionalGeneration"]
    config.save_pretrained(str(vlm_dir))
    save_file({k: v.contiguous() for k, v in converted.vlm.items()}, str(vlm_dir / "model.safetensors"),
              metadata={"format": "pt"})
    # transformers' own loader maps the checkpoint names onto the model: nothing may be missing or left over
    _, info = AutoModelForImageTextToText.from_pretrained(str(vlm_dir), output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise UserError(f"{src}: converted VLM weights do not fit InternVL: {_short(problems)}")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(vlm_dir))
    size = config.vision_config.image_size
    # Sa2VA's dynamic_preprocess: 1..12 tiles of the vision size, a thumbnail when there is more than one
    GotOcr2ImageProcessorPil(size={"height": size[0], "width": size[1]}, crop_to_patches=True,
                             min_patches=SA2VA_MIN_TILES, max_patches=SA2VA_MAX_TILES,
                             image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(str(vlm_dir))
    (vlm_dir / "processor_config.json").write_text(json.dumps(
        {"processor_class": "InternVLProcessor", "image_seq_length": config.image_seq_length}, indent=2))

    # SAM 2 whole, once, as transformers' video model: the image model (Sam2Model) loads its own subset from it
    sam = Sam2VideoModel(video_config)
    fit_memory_width(sam)
    missing, unexpected = sam.load_state_dict(converted.sam, strict=False)
    if missing or unexpected:
        raise UserError(f"{src}: SAM 2 weights do not fit: missing {missing[:6]}, unexpected {unexpected[:6]}")
    sam.save_pretrained(str(out / SAM_DIR))

    hidden, prompt = config.text_config.hidden_size, sam.config.prompt_encoder_config.hidden_size
    expected = {"0.weight": (hidden, hidden), "0.bias": (hidden,), "2.weight": (prompt, hidden), "2.bias": (prompt,)}
    got = {k: tuple(v.shape) for k, v in converted.projection.items()}
    if got != expected:
        raise UserError(f"{src}: text_hidden_fcs {got} is not Linear({hidden},{hidden}), ReLU, Linear({hidden},"
                         f"{prompt})")
    save_file({k: v.float().contiguous() for k, v in converted.projection.items()}, str(out / PROJECTION_FILE))
    unused = {key: list(state[key].shape) for key in converted.unused}
    (out / UNUSED_FILE).write_text(json.dumps({
        "what": "Sa2VA tensors with no place in the composed folder (modules segvlm does not have): Sa2VA name -> "
                "shape. SAM 2's memory tensors are not here: they are in sam/ (a Sam2VideoModel checkpoint)",
        "tensors": unused}, indent=2))
    (out / SEGVLM_JSON).write_text(json.dumps({
        "format": FORMAT_VERSION, "seg_token": seg_token, "seg_token_id": tokenizer.convert_tokens_to_ids(seg_token),
        "vlm_model_type": "internvl", "sam_model_type": video_config.model_type, "hidden_size": hidden,
        "prompt_size": prompt,
        # Sa2VA normalises SAM's input with mean/std tensors created in bfloat16 (preprocess_image's default dtype)
        SAM_MEAN_KEY: _bf16(IMAGENET_MEAN), SAM_STD_KEY: _bf16(IMAGENET_STD),
        "imported_from": str(src), "unused_keys": converted.unused, "unused_tensors": UNUSED_FILE,
    }, indent=2))
    return out


def _bf16(values: list[float]) -> list[float]:
    return torch.tensor(values, dtype=torch.bfloat16).float().tolist()


def _short(problems: dict) -> str:
    return "; ".join(f"{k} {list(v)[:6]}" for k, v in problems.items())


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(description="Sa2VA checkpoint folder -> composed segvlm folder (model.path)")
    parser.add_argument("sa2va_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--sam-config", metavar="FILE.json", default=None,
                        help="transformers Sam2Config kwargs of the checkpoint's SAM 2 (default: Hiera-L)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a tokenizer that needs the folder's own code")
    args = parser.parse_args(argv)
    try:
        out = import_sa2va(args.sa2va_dir, args.out_dir, sam_config=args.sam_config,
                           trust_remote_code=args.trust_remote_code)
    except UserError as err:
        sys.exit(f"error: {err}")
    unused = json.loads((out / UNUSED_FILE).read_text())["tensors"]
    print(f"{out}: composed segvlm folder (model.path)")
    print(f"{len(unused)} tensors not used by the image model (listed in {out / UNUSED_FILE}):")
    for name, shape in unused.items():
        print(f"  {name} {shape}")


if __name__ == "__main__":
    main()
