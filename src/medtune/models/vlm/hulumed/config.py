"""Configuration of a Hulu-Med checkpoint: the causal LM's config (Qwen3 / Qwen2, read by transformers' own classes)
plus the multimodal keys Hulu-Med adds to config.json."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import Qwen2Config, Qwen3Config

from medtune.errors import UserError

# Hulu-Med's vision encoder defaults (its HulumedVisionEncoderConfig), for keys a config.json leaves out.
VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "num_channels": 3, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                   "attention_dropout": 0.0}
# The base of the vision encoder's 2-D rotary frequencies (fixed in Hulu-Med's code, not a config key).
VISION_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class VisionSettings:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float
    attention_dropout: float

    @classmethod
    def from_config(cls, config) -> "VisionSettings":
        raw = getattr(config, "vision_encoder_config", None)
        if not isinstance(raw, dict):
            raise UserError("config.json of this Hulu-Med folder has no vision_encoder_config dict; medtune builds the "
                            "vision encoder from it (re-download the checkpoint's config.json)")
        values = {k: raw.get(k, v) for k, v in VISION_DEFAULTS.items()}
        if values["hidden_size"] % values["num_attention_heads"]:
            raise UserError(f"config.json vision_encoder_config: hidden_size {values['hidden_size']} is not divisible "
                            f"by num_attention_heads {values['num_attention_heads']}")
        return cls(**values)


def _legacy_rope(config, out: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 writes rope_parameters only; Hulu-Med's own code (transformers 4.51) reads rope_theta and would
    # silently fall back to its default base, so the saved folder keeps the legacy keys too.
    rope = out.get("rope_parameters") or {}
    if "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
        out.setdefault("rope_scaling", None if rope.get("rope_type", "default") == "default" else dict(rope))
    return out


class _HulumedConfig:
    """What both Hulu-Med configs add to their causal LM's config class."""

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        # Hulu-Med's config.json writes "rope_scaling": null, which transformers 5 reports as deprecated on each load
        if "rope_scaling" in config_dict and config_dict["rope_scaling"] is None:
            config_dict = {k: v for k, v in config_dict.items() if k != "rope_scaling"}
        return super().from_dict(config_dict, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return _legacy_rope(self, super().to_dict())


class HulumedQwen3Config(_HulumedConfig, Qwen3Config):
    """config.json of HulumedQwen3ForCausalLM (Hulu-Med-4B / 14B)."""

    model_type = "hulumed_qwen3"
    image_token_index: int | None = None
    mm_projector_type: str = "mlp2x_gelu"
    use_token_compression: bool = False
    vision_encoder: str | None = None
    vision_encoder_config: dict | None = None


class HulumedQwen2Config(_HulumedConfig, Qwen2Config):
    """config.json of HulumedQwen2ForCausalLM (Hulu-Med-7B / 32B)."""

    model_type = "hulumed_qwen2"
    image_token_index: int | None = None
    mm_projector_type: str = "mlp2x_gelu"
    use_token_compression: bool = False
    vision_encoder: str | None = None
    vision_encoder_config: dict | None = None


CONFIG_CLASSES = {"hulumed_qwen3": HulumedQwen3Config, "hulumed_qwen2": HulumedQwen2Config}
