"""Sa2VA parity: a tiny random-weight checkpoint in Sa2VA's published hub format, imported with medtune's importer,
reproduces the tensors Sa2VA's own code computed (``../shared/fixtures/sa2va-tiny``: README.md, reference.json).

Per case (a square image: one tile; a 640x480 one: 4x3 tiles + thumbnail, 3354 tokens), ONE forward of medtune's
own pipeline (its preprocessing from the PNG, its prompt, its decoder) is recorded at each stage. The stages are
compared with the reference in pipeline order, and the mask decoder is also run on the reference prompt embedding,
so a failure points at one side: prompt ids, VLM image tokens, [SEG] hidden state, projection, SAM image embedding,
the three candidate masks and their IoUs, the best-IoU choice, and the final logits at the image's size.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO

FIXTURE = REPO.parent / "shared" / "fixtures" / "sa2va-tiny"
ATOL = 1e-4  # the fixture's suggested tolerance, 50x above the deviation it measured
QUESTION_IMAGE = "<image>\n"  # Sa2VA's question starts with its image placeholder; medtune's codec inserts the image

pytestmark = pytest.mark.skipif(not (FIXTURE / "reference.safetensors").is_file(),
                                reason=f"Sa2VA fixture absent ({FIXTURE})")


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    from safetensors.torch import load_file
    from transformers.utils import logging as hf_logging

    from medtune.config import build_config
    from medtune.models.registry import build_model
    from medtune.models.sa2va_import import import_sa2va

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out = import_sa2va(FIXTURE / "model", tmp_path_factory.mktemp("sa2va") / "composed",
                       sam_config=FIXTURE / "transformers_sam2_config.json")
    cfg = build_config({"data": {"channels": 3},
                        "model": {"family": "segvlm", "path": str(out), "finetune": "full"}})
    seg = build_model(cfg).eval()
    return seg, load_file(str(FIXTURE / "reference.safetensors")), json.loads((FIXTURE / "reference.json").read_text())


def _recorded_forward(seg, image: torch.Tensor, question: str, answer: str) -> dict:
    """medtune's teacher-forced forward on one image, with every stage the reference holds recorded."""
    record: dict = {}
    net = seg.base_network
    hooks = [
        net.vlm.model.multi_modal_projector.register_forward_hook(lambda m, i, o: record.__setitem__("vit", o)),
        net.seg_projection.register_forward_hook(lambda m, i, o: record.update(seg_hidden=i[0], prompt=o)),
    ]
    sam_features, decode = seg._sam_features, seg._decode_masks

    def features(sam, pixels):
        record["features"] = sam_features(sam, pixels)
        return record["features"]

    def decoded(sam, feats, prompts):
        record["decoded"] = decode(sam, feats, prompts)
        return record["decoded"]

    seg._sam_features, seg._decode_masks = features, decoded
    try:
        with torch.no_grad():
            record["mask_logits"] = seg.teacher_forced_masks(image, question, answer)
    finally:
        del seg._sam_features, seg._decode_masks
        for h in hooks:
            h.remove()
    return record


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    err = float((got.float() - want.float()).abs().max())
    assert err <= ATOL, f"{name}: max |diff| {err:.3g} > {ATOL}"


@pytest.mark.parametrize("case", ["square", "wide"])
def test_sa2va_parity(parity, case):
    from PIL import Image

    seg, ref, meta = parity
    info = meta["cases"][case]
    r = {k.split(".", 1)[1]: v for k, v in ref.items() if k.startswith(case + ".")}
    rgb = np.array(Image.open(FIXTURE / info["image"]).convert("RGB"))
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None]  # uint8, the file's own pixels
    h, w = rgb.shape[:2]
    question = meta["question"].removeprefix(QUESTION_IMAGE)
    answer = meta["answer"].removesuffix(seg.text_codec().end_of_turn)

    # the prompt: Sa2VA's tiling decides the number of image tokens
    assert seg.num_tiles(h, w) == info["num_tiles"]
    enc = seg.text_codec().encode(question, answer, num_tiles=seg.num_tiles(h, w))
    assert torch.equal(enc["input_ids"], r["input_ids"])
    seg_positions = torch.nonzero(enc["input_ids"] == seg.seg_token_id)[:, 0]
    assert torch.equal(seg_positions, r["seg_positions"])

    rec = _recorded_forward(seg, image, question, answer)
    _close("vit_embeds", rec["vit"], r["vit_embeds"])
    _close("seg_hidden_state", rec["seg_hidden"][0], r["seg_hidden_state"])
    _close("prompt_embedding", rec["prompt"][0], r["prompt_embedding"])
    _close("sam_image_embedding", rec["features"]["image_embedding"], r["sam_image_embedding"])

    # the decoder on the REFERENCE prompt embedding (with medtune's SAM features, checked above)
    with torch.no_grad():
        dec = seg._decode_masks(seg.base_network.sam, rec["features"], r["prompt_embedding"][None])
        final = seg.upsample(dec.low_res, (h, w))
    assert seg.mask_output == "best_iou"
    _close("multimask_logits", dec.candidates[0], r["multimask_logits"])
    _close("iou_scores", dec.iou_scores[0], r["iou_scores"])
    assert torch.equal(dec.index[0], r["best_mask_index"])  # 1 here: the single-mask head (0) would be wrong
    _close("low_res_mask_logits", dec.low_res, r["low_res_mask_logits"])
    _close("mask_logits (reference prompt)", final[0], r["mask_logits"])

    # end to end: medtune's own preprocessing, prompt embedding and decoding
    own = rec["decoded"]
    _close("multimask_logits (own)", own.candidates[0], r["multimask_logits"])
    _close("iou_scores (own)", own.iou_scores[0], r["iou_scores"])
    assert torch.equal(own.index[0], r["best_mask_index"])
    _close("low_res_mask_logits (own)", own.low_res, r["low_res_mask_logits"])
    _close("mask_logits (own)", rec["mask_logits"], r["mask_logits"])


def test_sa2va_import_records_unused_tensors_and_tiling(parity):
    seg, _, _ = parity
    folder = Path(seg.processing.tokenizer.name_or_path).parent
    unused = json.loads((folder / "unused_tensors.json").read_text())["tensors"]
    # SAM 2's video-only tensors (fixture README: 79 of them), each with its shape
    assert len(unused) == 79 and all(isinstance(s, list) for s in unused.values())
    assert any(".memory_attention." in k for k in unused) and any("obj_ptr_proj" in k for k in unused)
    meta = json.loads((folder / "segvlm.json").read_text())
    # Sa2VA's SAM mean/std tensors are bfloat16: 0.456 becomes 0.455078125
    assert meta["sam_image_mean"][1] == 0.455078125 and meta["sam_image_mean"] == seg.sam_image_mean
    assert seg.image_prep.tiling and seg.image_prep.max_tiles == 12
