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
    from medtune.models.vlm.sa2va_import import import_sa2va

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
    codec = seg.text_codec()
    answer = meta["answer"].removesuffix(codec.tokenizer.convert_ids_to_tokens(codec.end_of_turn_id))

    # the prompt: Sa2VA's tiling (the VLM's own image processor) decides the number of image tokens
    enc = seg.encode(image[0], question, answer)
    assert enc["pixel_values"].shape[0] == info["num_tiles"]
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
    folder = Path(seg.processor.tokenizer.name_or_path).parent
    unused = json.loads((folder / "unused_tensors.json").read_text())["tensors"]
    # SAM 2's video-only tensors (fixture README: 79 of them) are kept in sam/, a Sam2VideoModel checkpoint, which the
    # image model above was loaded from (tests/test_sa2va_video_import.py checks every tensor): nothing is left over
    assert unused == {}
    assert json.loads((folder / "sam" / "config.json").read_text())["model_type"] == "sam2_video"
    meta = json.loads((folder / "segvlm.json").read_text())
    # Sa2VA's SAM mean/std tensors are bfloat16: 0.456 becomes 0.455078125
    assert meta["sam_image_mean"][1] == 0.455078125 and meta["sam_image_mean"] == seg.sam_image_mean
    image_processor = seg.processor.image_processor  # Sa2VA's tiling, in the VLM's own image processor
    assert image_processor.crop_to_patches and image_processor.max_patches == 12


# ------------------------------------------------------------------------------------------------ the importer
def test_importer_refuses_a_sam2_of_other_sizes_in_one_line(tmp_path, capsys):
    from medtune.models.vlm.sa2va_import import main

    # no --sam-config: the default Hiera-L does not fit the fixture's shrunk SAM 2; refused before anything is written
    with pytest.raises(SystemExit) as exc:
        main([str(FIXTURE / "model"), str(tmp_path / "out")])
    message = str(exc.value.code)
    assert "\n" not in message and "Hiera-L" in message and "--sam-config FILE.json" in message
    assert "weights [1, 1, 32] vs config [1, 1, 256]" in message or "shapes differ" in message
    assert not (tmp_path / "out").exists()


def test_sam2_sizes_read_from_sam2_py_as_data(tmp_path):
    """A hub folder's sam2.py holds the SAM 2 sizes as literal assignments: they are read with ast, never run. The
    file here mimics the layout of Sa2VA's (sizes in build_trunk / build_neck / _build_sam_heads) with the fixture's
    values, and ends in a statement that would fail if it were executed."""
    from medtune.models.vlm.sa2va_import import load_sam_config, sam_config_from_sam2_py

    (tmp_path / "sam2.py").write_text('''
class SAM2:
    def build_image_encoder(self):
        def build_trunk():
            embed_dim = 16
            num_heads = 2
            stages = [1, 2, 3, 2]
            global_att_blocks = [5]
            window_pos_embed_bkg_spatial_size = [7, 7]
            window_spec = [8, 4, 16, 8]
            return Hiera(embed_dim=embed_dim, num_heads=num_heads, stages=stages)
        def build_neck():
            d_model = 32
            backbone_channel_list = [128, 64, 32, 16]
            return FpnNeck(d_model=d_model, backbone_channel_list=backbone_channel_list)

class SAM2Base_:
    def _build_sam_heads(self):
        self.sam_mask_decoder = MaskDecoder(
            transformer=TwoWayTransformer(depth=2, embedding_dim=self.dim, mlp_dim=256, num_heads=8),
            iou_head_hidden_dim=32)

raise SystemExit("executed")
''')
    read = load_sam_config(sam_config_from_sam2_py(tmp_path / "sam2.py")).to_dict()
    want = load_sam_config(FIXTURE / "transformers_sam2_config.json").to_dict()
    for part in ("vision_config", "prompt_encoder_config", "mask_decoder_config"):
        assert read[part] == want[part], part
    (tmp_path / "partial.py").write_text("def build_trunk():\n    embed_dim = width\n")
    assert sam_config_from_sam2_py(tmp_path / "partial.py") is None  # not literal: the user passes --sam-config


def test_default_hiera_l_config_builds():
    from transformers import Sam2Model

    from medtune.models.vlm.sa2va_import import sam2_hiera_large_config

    config = sam2_hiera_large_config()  # a tuple here once failed transformers' strict config check
    with torch.device("meta"):
        model = Sam2Model(config)
    assert config.vision_config.backbone_config.blocks_per_stage == [2, 6, 36, 4]
    assert model.mask_decoder.config.hidden_size == 256


def _sa2va_folder(tmp_path: Path, **changes) -> Path:
    folder = tmp_path / "sa2va"
    folder.mkdir(parents=True)
    for f in (FIXTURE / "model").iterdir():
        (folder / f.name).symlink_to(f)
    for name, edit in changes.items():
        (folder / name).unlink()
        data = json.loads((FIXTURE / "model" / name).read_text())
        edit(data)
        (folder / name).write_text(json.dumps(data))
    return folder


def test_unknown_language_model_and_remote_code_tokenizer_are_one_line(tmp_path):
    from medtune.errors import UserError
    from medtune.models.vlm.sa2va_import import import_sa2va

    def mistral(config):
        config["llm_config"]["architectures"] = ["MistralForCausalLM"]

    with pytest.raises(UserError, match=r"language model 'MistralForCausalLM'; supported: Qwen2ForCausalLM") as exc:
        import_sa2va(_sa2va_folder(tmp_path / "a", **{"config.json": mistral}), tmp_path / "out")
    assert "\n" not in str(exc.value)

    def remote(tok):
        tok["tokenizer_class"] = "MedtuneRemoteTokenizer"
        tok["auto_map"] = {"AutoTokenizer": ["tokenization_remote.MedtuneRemoteTokenizer", None]}

    folder = _sa2va_folder(tmp_path / "b", **{"tokenizer_config.json": remote})
    with pytest.raises(UserError, match="--trust-remote-code") as exc:  # never transformers' [y/N] prompt
        import_sa2va(folder, tmp_path / "out", sam_config=FIXTURE / "transformers_sam2_config.json")
    assert "\n" not in str(exc.value)


def test_a_sa2va_checkpoint_without_seg_is_one_line(tmp_path):
    """A Sa2VA folder whose tokenizer lost [SEG]: refused before anything is converted (its [SEG] row would be another
    token's)."""
    from medtune.errors import UserError
    from medtune.models.vlm.sa2va_import import import_sa2va

    def without_seg(tok):
        tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "[SEG]"]

    def config_without_seg(cfg):
        cfg["added_tokens_decoder"] = {k: v for k, v in cfg.get("added_tokens_decoder", {}).items()
                                       if v["content"] != "[SEG]"}

    def added_without_seg(added):
        added.pop("[SEG]", None)

    folder = _sa2va_folder(tmp_path / "noseg", **{"tokenizer.json": without_seg,
                                                  "tokenizer_config.json": config_without_seg,
                                                  "added_tokens.json": added_without_seg})
    with pytest.raises(UserError, match=r"does not hold '\[SEG\]' as one token") as exc:
        import_sa2va(folder, tmp_path / "out", sam_config=FIXTURE / "transformers_sam2_config.json")
    assert "\n" not in str(exc.value) and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ the task's batches
def test_task_batches_mix_tile_counts_and_keep_sa2va_numbers(parity):
    """The training data path: each image prepared from its own pixels (1 tile and 13 tiles in one batch; SAM's input
    as uint8), the prompts with each image's number of image tokens, masks at data.patch_size; the batched forward
    (right padding) gives for each image the logits Sa2VA's low-res mask gives at that size."""
    from PIL import Image

    from medtune.config import build_config
    from medtune.data.types import LoadedSample
    from medtune.tasks.segvlm import SegVLMDataset, collate, mask_targets

    seg, ref, meta = parity
    size = 256  # Sa2VA's low-res mask size: the loss resolution Sa2VA uses
    cfg = build_config({"data": {"channels": 3, "patch_size": size, "augment": {"enabled": False}},
                        "model": {"family": "segvlm"}, "task": {"class_name": "blood vessel"}})
    samples = []
    for case in ("square", "wide"):
        rgb = np.array(Image.open(FIXTURE / meta["cases"][case]["image"]).convert("RGB"))
        ones = np.ones(rgb.shape[:2], dtype=np.uint8)
        samples.append(LoadedSample(id=case, image=rgb.transpose(2, 0, 1).astype(np.float32) / 255.0, mask=ones,
                                    fov=ones))
    data = SegVLMDataset(samples, cfg, seg.text_codec(), seg.image_prep, seg.seg_token_id)
    items = [data[(i, 0)] for i in range(2)]
    assert [it["pixel_values"].shape[0] for it in items] == [1, 13] and items[1]["sam_image"].dtype == torch.uint8
    assert all(torch.equal(it["input_ids"], ref[f"{case}.input_ids"]) for it, case in zip(items, ("square", "wide")))
    batch = collate(items)
    assert batch["sam_image"].shape == (2, 3, 1024, 1024) and batch["pixel_values"].shape[0] == 14
    with torch.no_grad():
        out = seg(batch=batch)
    logits, target, _ = mask_targets(out, batch)
    assert logits.shape == target.shape == (2, 1, size, size)
    for i, case in enumerate(("square", "wide")):
        _close(f"batched {case}", logits[i], seg.upsample(ref[f"{case}.low_res_mask_logits"], (size, size))[0])
