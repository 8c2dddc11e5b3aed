"""Hulu-Med's network, written from its published behaviour: a SigLIP-style NaViT vision encoder with 2-D rotary
position embedding (images of any size, packed by ``grid_sizes`` / ``merge_sizes``), an ``mlp2x_gelu`` projector,
and transformers' own ``Qwen3ForCausalLM`` / ``Qwen2ForCausalLM`` for the language model. Parameter names are the
checkpoint's (``model.vision_encoder.*``, ``model.mm_projector.readout.*``, ``model.layers.*``; lm_head tied), so
``from_pretrained`` / ``save_pretrained`` read and write Hulu-Med's own hub layout.

What the numbers depend on, as Hulu-Med computes them:

* the projected image features replace the embeddings of the ``<image>`` tokens (``image_token_index``) in order;
* ``forward`` with ``labels`` returns logits at every position and transformers' causal-LM loss (mean over the
  supervised next tokens, or their sum / ``num_items_in_batch``);
* ``generate`` hands only ``inputs_embeds`` to ``GenerationMixin.generate``, so it returns the *new* tokens only;
* the rotary ``inv_freq`` buffers are not in the checkpoint; they are recomputed after every load (transformers 5
  leaves such buffers as uninitialised memory, which made Hulu-Med's own code give different logits per load).

``use_token_compression`` (Hulu-Med drops video frames that repeat the previous one) changes nothing for images: the
mask it builds keeps every image token. It is therefore a no-op here at any batch size (Hulu-Med itself asserts batch
size 1 whenever the flag is set); video input is not supported by medtune's processor and is refused in one line.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2ForCausalLM, Qwen2Model, Qwen3ForCausalLM, Qwen3Model
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from medtune.errors import UserError
from medtune.models.vlm.hulumed.config import (
    CONFIG_CLASSES,
    VISION_ROPE_THETA,
    HulumedQwen2Config,
    HulumedQwen3Config,
    VisionSettings,
)

IMAGE_MODAL = "image"
TEXT_MODAL = "text"  # a placeholder image whose features Hulu-Med drops (text-only samples in a mixed batch)


# ---- vision encoder -------------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [N, heads, head_dim], angles [N, head_dim / 2]; computed in fp32 as Hulu-Med does, returned in x's dtype."""
    emb = torch.cat((angles, angles), dim=-1).float()[:, None, :]
    xf = x.float()
    return (xf * emb.cos() + _rotate_half(xf) * emb.sin()).to(x.dtype)


class VisionRotaryEmbedding(nn.Module):
    """Frequencies of the 2-D rotary embedding: half of each head's rotary angles encode the patch row, half the
    column. ``inv_freq`` is computed, never loaded (see ``reset_computed_buffers``)."""

    def __init__(self, dim: int, theta: float = VISION_ROPE_THETA):
        super().__init__()
        self.dim, self.theta = dim, theta
        self.register_buffer("inv_freq", self.expected_inv_freq(), persistent=False)

    def expected_inv_freq(self, device=None) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float, device=device) / self.dim))

    def reset(self) -> None:
        self.inv_freq = self.expected_inv_freq(self.inv_freq.device)

    def forward(self, length: int) -> torch.Tensor:
        positions = torch.arange(length, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        return torch.outer(positions, self.inv_freq)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionSettings):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size, padding="valid")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, C * p * p] flattened patches -> [N, hidden]."""
        p = self.cfg.patch_size
        patches = pixel_values.view(-1, self.cfg.num_channels, p, p).to(self.patch_embedding.weight.dtype)
        return self.patch_embedding(patches).view(-1, self.cfg.hidden_size)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionSettings):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.dropout = cfg.attention_dropout
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: torch.Tensor, lengths: list[int], angles: torch.Tensor) -> torch.Tensor:
        n = hidden.shape[0]
        shape = (n, self.num_heads, self.head_dim)
        q = _apply_rotary(self.q_proj(hidden).view(shape), angles)
        k = _apply_rotary(self.k_proj(hidden).view(shape), angles)
        v = self.v_proj(hidden).view(shape)
        # Attention stays within each image (Hulu-Med: a block-diagonal mask over the packed sequence); one call per
        # image gives the same result without an N x N mask.
        dropout = self.dropout if self.training else 0.0
        out = [F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1),
                                              dropout_p=dropout).transpose(0, 1)
               for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
        return self.out_proj(torch.cat(out).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionSettings):
        super().__init__()
        self.activation_fn = ACT2FN[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class VisionEncoderLayer(GradientCheckpointingLayer):
    def __init__(self, cfg: VisionSettings):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, hidden: torch.Tensor, lengths: list[int], angles: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden), lengths, angles)
        return hidden + self.mlp(self.layer_norm2(hidden))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionSettings):
        super().__init__()
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.rotary_pos_emb = VisionRotaryEmbedding(head_dim // 2)
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def rotary_angles(self, grid_sizes: torch.Tensor, merge_sizes: torch.Tensor) -> torch.Tensor:
        """[N, head_dim / 2] angles: (row, column) of every patch, in the processor's patch order (t, h/m, w/m, m, m)."""
        positions = []
        for (t, h, w), m in zip(grid_sizes.tolist(), merge_sizes.tolist()):
            rows = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
            cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
            rc = torch.stack([rows.permute(0, 2, 1, 3).flatten(), cols.permute(0, 2, 1, 3).flatten()], dim=-1)
            positions.append(rc.repeat(t, 1))
        positions = torch.cat(positions).to(self.rotary_pos_emb.inv_freq.device)
        table = self.rotary_pos_emb(int(grid_sizes[:, 1:].max()))
        return table[positions].flatten(1)

    def forward(self, hidden: torch.Tensor, grid_sizes: torch.Tensor, merge_sizes: torch.Tensor) -> torch.Tensor:
        angles = self.rotary_angles(grid_sizes, merge_sizes)
        lengths = [h * w for t, h, w in grid_sizes.tolist() for _ in range(t)]  # attention per frame
        for layer in self.layers:
            hidden = layer(hidden, lengths, angles)
        return hidden


class HulumedVisionEncoder(nn.Module):
    """Patches [N, C*p*p] of every image -> one feature per merged patch [sum_i t*h*w/m^2, hidden]."""

    def __init__(self, cfg: VisionSettings):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionTransformer(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, grid_sizes: torch.Tensor, merge_sizes: torch.Tensor) -> torch.Tensor:
        grid_sizes, merge_sizes = grid_sizes.long().cpu(), merge_sizes.long().cpu()
        hidden = self.post_layernorm(self.encoder(self.embeddings(pixel_values), grid_sizes, merge_sizes))
        out = []
        for chunk, (t, h, w), m in zip(hidden.split(grid_sizes.prod(dim=1).tolist()), grid_sizes.tolist(),
                                       merge_sizes.tolist()):
            c = chunk.shape[-1]
            # back to raster order, then Hulu-Med's bilinear resize by 1/m (identity at m = 1, a 2x2 mean at m = 2)
            grid = chunk.view(t, h // m, w // m, m, m, c).permute(0, 1, 3, 2, 4, 5).reshape(t, h, w, c)
            grid = F.interpolate(grid.permute(0, 3, 1, 2), size=(h // m, w // m), mode="bilinear")
            out.append(grid.permute(0, 2, 3, 1).reshape(-1, c))
        return torch.cat(out)


def build_projector(kind: str, vision_hidden: int, hidden: int) -> nn.Module:
    """``mm_projector_type``: ``linear`` or ``mlp{N}x_gelu`` (Hulu-Med's published checkpoints use mlp2x_gelu)."""
    if kind == "linear":
        return nn.Linear(vision_hidden, hidden)
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind or "")
    if not match:
        raise UserError(f"config.json mm_projector_type {kind!r} is not supported by medtune's Hulu-Med "
                        "implementation (linear, mlp2x_gelu ...)")
    return MlpGeluProjector(vision_hidden, hidden, int(match.group(1)))


class MlpGeluProjector(nn.Module):
    def __init__(self, vision_hidden: int, hidden: int, depth: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(vision_hidden, hidden)]
        for _ in range(1, depth):
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        self.readout = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(x)


# ---- the multimodal causal LM ---------------------------------------------------------------------------------------
def _add_multimodal_parts(model: nn.Module, config) -> None:
    model.vision_encoder = HulumedVisionEncoder(VisionSettings.from_config(config))
    model.mm_projector = build_projector(config.mm_projector_type, model.vision_encoder.cfg.hidden_size,
                                         config.hidden_size)


class HulumedQwen3Model(Qwen3Model):
    config_class = HulumedQwen3Config

    def __init__(self, config: HulumedQwen3Config):
        super().__init__(config)
        _add_multimodal_parts(self, config)
        self.post_init()  # again, now that the vision parts exist


class HulumedQwen2Model(Qwen2Model):
    config_class = HulumedQwen2Config

    def __init__(self, config: HulumedQwen2Config):
        super().__init__(config)
        _add_multimodal_parts(self, config)
        self.post_init()


class HulumedMixin:
    """What Hulu-Med adds to a transformers causal LM: image features in place of the ``<image>`` tokens."""

    config: Any
    model: nn.Module

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # medtune's own code for this architecture: the folder's auto_map is never executed, so the opt-in is moot
        kwargs.pop("trust_remote_code", None)
        want_info = kwargs.pop("output_loading_info", False)
        net, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        # every tensor by name, none left over: a tensor left at its random init would change every output silently
        missing, unexpected = list(info.get("missing_keys") or []), list(info.get("unexpected_keys") or [])
        if missing or unexpected:
            raise UserError(f"{args[0] if args else kwargs.get('pretrained_model_name_or_path')}: the weights do not "
                            f"fit a {cls.config_class.model_type} model built from its config.json (missing "
                            f"{missing[:4]}{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                            f"{' ...' if len(unexpected) > 4 else ''}); is the folder complete and its config.json "
                            "the checkpoint's own?")
        net.reset_computed_buffers()
        return (net, info) if want_info else net

    def reset_computed_buffers(self) -> None:
        """Recompute every rotary frequency buffer. They are not in the checkpoint (non-persistent), and a
        transformers 5 load leaves such buffers uninitialised unless it knows the module."""
        self.model.vision_encoder.encoder.rotary_pos_emb.reset()
        rotary = self.model.rotary_emb
        init = rotary.compute_default_rope_parameters if rotary.rope_type == "default" else None
        if init is None:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            init = ROPE_INIT_FUNCTIONS[rotary.rope_type]
        inv_freq, rotary.attention_scaling = init(rotary.config, device=rotary.inv_freq.device)
        rotary.inv_freq = inv_freq.to(rotary.inv_freq.device)
        rotary.original_inv_freq = rotary.inv_freq.clone()

    def get_model(self):
        return self.model

    def encode_images(self, pixel_values, grid_sizes, merge_sizes) -> torch.Tensor:
        """Projected visual tokens, one row per ``<image>`` token (Hulu-Med's ``encode_images``)."""
        features = self.model.vision_encoder(pixel_values, grid_sizes, merge_sizes)
        return self.model.mm_projector(features)

    def multimodal_embeds(self, input_ids: torch.Tensor, pixel_values, grid_sizes, merge_sizes,
                          modals: list[str] | None) -> torch.Tensor:
        embeds = self.model.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        grid_sizes = torch.as_tensor(grid_sizes).reshape(-1, 3)
        merge_sizes = torch.as_tensor(merge_sizes).reshape(-1)
        modals = list(modals) if modals is not None else [IMAGE_MODAL] * len(grid_sizes)
        if len(merge_sizes) != len(grid_sizes) or len(modals) != len(grid_sizes):
            raise ValueError(f"Hulu-Med inputs: {len(grid_sizes)} grid_sizes rows, {len(merge_sizes)} merge_sizes, "
                             f"{len(modals)} modals; all three are one per image (never padded as token sequences)")
        unknown = sorted(set(modals) - {IMAGE_MODAL, TEXT_MODAL})
        if unknown:
            raise UserError(f"Hulu-Med modals {unknown}: medtune's Hulu-Med implementation handles images only "
                            "(video token compression is not implemented)")
        features = self.encode_images(pixel_values, grid_sizes, merge_sizes)
        counts = (grid_sizes.prod(dim=1) // merge_sizes ** 2).tolist()
        keep = torch.cat([torch.full((n,), modal != TEXT_MODAL, dtype=torch.bool) for n, modal in zip(counts, modals)])
        features = features[keep.to(features.device)]
        slots = input_ids == self.config.image_token_index
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(f"Hulu-Med inputs: {int(slots.sum())} <image> tokens but {features.shape[0]} image "
                             "features; the processor expands each <image> to grid_h*grid_w/merge^2 tokens (was the "
                             "sequence truncated?)")
        return embeds.masked_scatter(slots[..., None].to(embeds.device), features.to(embeds.dtype))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                pixel_values=None, grid_sizes=None, merge_sizes=None, modals=None, **kwargs):
        if inputs_embeds is None and pixel_values is not None:
            inputs_embeds = self.multimodal_embeds(input_ids, pixel_values, grid_sizes, merge_sizes, modals)
            input_ids = None
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, pixel_values=None, grid_sizes=None, merge_sizes=None,
                 modals=None, **kwargs):
        """Like Hulu-Med: the prompt goes in as embeddings, so only the new tokens come back."""
        if input_ids is None or "inputs_embeds" in kwargs:
            raise ValueError("Hulu-Med generate takes input_ids (+ pixel_values, grid_sizes, merge_sizes, modals)")
        embeds = self.multimodal_embeds(input_ids, pixel_values, grid_sizes, merge_sizes, modals)
        return super().generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)


class HulumedQwen3ForCausalLM(HulumedMixin, Qwen3ForCausalLM):
    config_class = HulumedQwen3Config

    def __init__(self, config: HulumedQwen3Config):
        super(Qwen3ForCausalLM, self).__init__(config)  # PreTrainedModel's, so the LM is built once, with vision
        self.model = HulumedQwen3Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class HulumedQwen2ForCausalLM(HulumedMixin, Qwen2ForCausalLM):
    config_class = HulumedQwen2Config

    def __init__(self, config: HulumedQwen2Config):
        super(Qwen2ForCausalLM, self).__init__(config)
        self.model = HulumedQwen2Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


MODEL_CLASSES = {"hulumed_qwen3": HulumedQwen3ForCausalLM, "hulumed_qwen2": HulumedQwen2ForCausalLM}


def model_class(model_type: str):
    if model_type not in MODEL_CLASSES:
        raise UserError(f"model_type {model_type!r} is not a Hulu-Med type medtune loads natively "
                        f"({', '.join(MODEL_CLASSES)})")
    return MODEL_CLASSES[model_type]


def load_hulumed(path: str | Path, model_type: str, **kwargs) -> nn.Module:
    """The network of a Hulu-Med folder (weights by name, tied lm_head, buffers recomputed); ``kwargs`` go to
    ``from_pretrained`` (dtype, quantization_config, device_map ...)."""
    cls = model_class(model_type)
    config = CONFIG_CLASSES[model_type].from_pretrained(str(path))
    kwargs.setdefault("dtype", torch.float32)
    return cls.from_pretrained(str(path), config=config, **kwargs)
