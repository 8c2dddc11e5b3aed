"""Tiny random mask heads for tests and the demo (CPU, seconds, no network): SAM / SAM 2 from transformers config
classes. The tiny VLM under them is the plain VLM's (``models.vlm.tiny``, every kind of ``KINDS``).
``save_tiny_parts`` writes a VLM folder and a SAM folder laid out like downloaded checkpoints, so tests exercise the
same loading code as ``model.vlm.vlm_path`` / ``model.vlm.sam_path`` on real ones.
"""
from __future__ import annotations

from pathlib import Path

from medtune.errors import UserError

# sam2_video: a SAM 2 video model (memory included), the mask head a segmenting VLM runs videos with
TINY_SAM_KINDS = ("sam2", "sam", "sam2_video")


def tiny_vlm_overrides(tie_word_embeddings: bool | None) -> dict:
    """``models.vlm.tiny`` overrides that tie (or untie) the input and output embeddings; {} keeps the default."""
    if tie_word_embeddings is None:
        return {}
    return {"tie_word_embeddings": tie_word_embeddings, "text_config": {"tie_word_embeddings": tie_word_embeddings}}


def tiny_sam(kind: str):
    from transformers import Sam2Model, Sam2VideoModel, SamModel

    from medtune.models.sam import tiny_sam2_config, tiny_sam_config
    from medtune.models.video import init_from_config, tiny_sam2_video_config

    if kind == "sam2":
        return Sam2Model(tiny_sam2_config())
    if kind == "sam":
        return SamModel(tiny_sam_config(vision_config={"initializer_range": 0.02}))
    if kind == "sam2_video":
        net = Sam2VideoModel(tiny_sam2_video_config())
        init_from_config(net)
        return net
    raise UserError(f"model.config.sam {kind!r} unknown for the tiny preset; valid: {', '.join(TINY_SAM_KINDS)}")


def save_tiny_parts(out_dir: str | Path, vlm: str = "internvl", sam: str = "sam2", seed: int = 0,
                    tie_word_embeddings: bool | None = None) -> tuple[Path, Path]:
    """Write ``out_dir/vlm`` and ``out_dir/sam`` (random tiny weights); returns (vlm_path, sam_path)."""
    import torch

    from medtune.models.vlm.tiny import save_tiny_vlm

    out_dir = Path(out_dir)
    vlm_dir = save_tiny_vlm(out_dir / "vlm", vlm, seed=seed, overrides=tiny_vlm_overrides(tie_word_embeddings))
    torch.manual_seed(seed)
    sam_dir = out_dir / "sam"
    tiny_sam(sam).save_pretrained(sam_dir)
    return vlm_dir, sam_dir
