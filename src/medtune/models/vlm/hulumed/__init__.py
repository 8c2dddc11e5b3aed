"""Hulu-Med (ZJUI-AI4H) checkpoints in their published hub layout, loaded by medtune's own implementation.

A Hulu-Med folder names six remote-code files in ``auto_map``. Those files do not run under transformers 5 (medtune's
pin) and executing downloaded code is what a careful user avoids, so medtune builds the architecture (SigLIP-style
NaViT vision encoder with 2-D RoPE, ``mlp2x_gelu`` projector, transformers' own Qwen3 / Qwen2 causal LM) and the
input processing from the published behaviour, and loads the weights by name: no ``trust_remote_code``, no code from
the folder. The folder stays a Hulu-Med folder when saved (same config keys, weight names, processor files, auto_map).

Kept light on purpose (no torch / transformers import): ``models.hf`` asks ``is_hulumed_folder`` before it refuses a
folder for its auto_map.
"""
from __future__ import annotations

from typing import Any

# config.json model_type -> the causal LM family the language model is built on
MODEL_TYPES = {"hulumed_qwen3": "qwen3", "hulumed_qwen2": "qwen2"}


def is_hulumed_config(config_json: dict[str, Any]) -> bool:
    """True for a config.json medtune loads natively as Hulu-Med (its auto_map is then never executed)."""
    return config_json.get("model_type") in MODEL_TYPES


def load_folder(path, **load_kwargs) -> tuple[Any, Any]:
    """(network, processor) of a Hulu-Med folder through medtune's own implementation; ``load_kwargs`` go to
    ``from_pretrained`` (dtype, quantization_config, device_map)."""
    import json
    from pathlib import Path

    from medtune.models.vlm.hulumed.modeling import load_hulumed
    from medtune.models.vlm.hulumed.processing import load_processor

    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    return load_hulumed(path, model_type, **load_kwargs), load_processor(path)
