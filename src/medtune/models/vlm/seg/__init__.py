"""Family ``segvlm``: the plain VLM (``models.vlm.model``) + a mask head, joined by a ``[SEG]`` token (LISA / Sa2VA
style).

The VLM is loaded, processed, chat-encoded and LoRA-placed exactly as family ``vlm`` does it (any VLM that family
loads: LLaVA, InternVL, Qwen2.5-VL, Qwen3-VL ...); it reads the image and the questions and answers with text
containing ``[SEG]``. The mask head: the last hidden state at each ``[SEG]`` goes through ``seg_projection`` (Linear
H->H, ReLU, Linear H->SAM's prompt size) into SAM's / SAM 2's mask decoder as a sparse prompt; the decoder's three
masks are reduced to the one with the best predicted IoU (Sa2VA; ``model.vlm.mask_output``) and upsampled to the
output size (256 -> SAM's 1024 -> H x W). Both encoders read the image at its own resolution: the VLM's processor
makes its pixels, ``images.py`` SAM's (PIL bicubic uint8 to 1024). ``forward_batch`` is one teacher-forced pass (no
``generate()``, no ``no_grad``); ``generate_turns`` is generation followed by that same forward. Frozen image
encoders need no ``no_grad`` to save memory: fed by pixels that do not require grad, autograd records nothing in a
tower with nothing trainable below it, and records what it must when LoRA or full training reaches inside.

Fine-tuning (``registry.build_model`` attaches LoRA from the hooks here):

- LoRA on the language model's linears only, placed and checked by the plain VLM's code (``lora_target_patterns``,
  ``check_lora_placement``) under the ``vlm.`` prefix.
- SAM's mask decoder and the projection train fully (``modules_to_save``); SAM's image encoder is frozen (LoRA
  with ``model.vlm.sam_encoder_lora``); the VLM projector trains only with ``model.vlm.train_projector``.
- ``[SEG]`` is added as one special token and trained as PEFT *trainable tokens*
  (``LoraConfig.trainable_token_indices``), not by putting ``embed_tokens`` / ``lm_head`` in ``modules_to_save``:
  a full copy of a 151k x 896 embedding (InternVL3-1B) is 136 M trainable parameters, plus the same again for an
  untied ``lm_head`` and Adam's two moments for each (~2 GB fp32 at 1B, ~17 GB at 8B), to learn one row; trainable
  tokens store that row only (hidden_size values per matrix) in ``adapter_model.safetensors`` and merge into the
  matrix on export. With tied embeddings (one tensor for input and output, e.g. Qwen2.5-0.5B) PEFT ties the
  ``lm_head`` wrapper to the embedding's (``SegVLMNet`` exposes the VLM's tie to PEFT), so the row stays one row
  when trained and merged; untied, the ``lm_head`` row is a second trainable token. The adapter stores the rows'
  values (not deltas), so it fully determines [SEG] whatever the grown base row was initialised to.
"""
from __future__ import annotations

import logging

from medtune.config import Config
from medtune.errors import UserError
from medtune.models.vlm.seg.model import SegVLMModel, SegVLMNet

log = logging.getLogger(__name__)

__all__ = ["SegVLMModel", "SegVLMNet", "build_segvlm"]


def build_segvlm(cfg: Config) -> SegVLMModel:
    """VLM + SAM + projection from ``model.path`` (composed), ``model.vlm.vlm_path`` + ``sam_path``, or the tiny
    preset; [SEG] added (embeddings grown if needed); gradient checkpointing / k-bit preparation on the VLM."""
    from safetensors.torch import load_file

    from medtune.models.hf import prepare_for_training
    from medtune.models.video import check_memory_layout
    from medtune.models.vlm.model import ChatCodec, load_vlm_folder
    from medtune.models.vlm.processing import apply_image_processor_settings, read_chat_template
    from medtune.models.vlm.seg import parts, tiny
    from medtune.models.vlm.seg.model import new_projection

    vcfg = cfg.model.vlm
    sources = parts.resolve_sources(cfg)
    if sources is None:
        if cfg.model.quantize_4bit:
            raise UserError("model.quantize_4bit quantises a pretrained VLM; set model.vlm.vlm_path (or model.path)")
        from medtune.models.vlm.tiny import tiny_vlm

        choice = parts.tiny_choice(cfg)
        vlm, processor = tiny_vlm(choice["vlm"], tiny.tiny_vlm_overrides(choice["tie_word_embeddings"]))
        apply_image_processor_settings(processor, vcfg.image_processor)
        where = "the tiny preset"
        sam = tiny.tiny_sam(choice["sam"])
        parts.prepare_sam(sam)
    else:
        if cfg.model.config:
            log.warning("model.config is ignored when segvlm loads its parts from folders")
        vlm_key = "model.path (vlm/)" if sources.composed else "model.vlm.vlm_path"
        sam_key = "model.path (sam/)" if sources.composed else "model.vlm.sam_path"
        parts.check_vlm_folder(sources.vlm, vlm_key)
        vlm, processor = load_vlm_folder(sources.vlm, cfg)
        where = f"{vlm_key} {str(sources.vlm)!r}"
        sam = parts.load_sam(sources.sam, sam_key)
    if sources is not None and sources.composed is not None and vcfg.seg_token not in processor.tokenizer.get_vocab():
        # a trained segmenting VLM: its [SEG] row was learnt under the id segvlm.json records; adding the token anew
        # could give it another row (an untrained one) without a word
        raise UserError(f"{sources.vlm}: the tokenizer has no {vcfg.seg_token!r}, although {sources.composed} is a "
                        f"trained segmenting VLM (segvlm.json: seg_token {sources.meta.get('seg_token')!r}, id "
                        f"{sources.meta.get('seg_token_id')}); the folder is incomplete: export the run again "
                        "(`medtune export RUN --out DIR`)")
    clips = parts.trains_on_clips(cfg)
    if parts.is_video_sam(sam):
        check_memory_layout(sam.config)
    elif clips:
        raise UserError(f"a segmenting VLM trains on video clips through SAM 2's memory, but its mask head is a "
                         f"{type(sam).__name__}; set model.vlm.sam_path to a SAM 2 video checkpoint (config.json "
                         "model_type sam2_video, e.g. facebook/sam2.1-hiera-tiny) or model.config.sam: sam2_video")
    seg_id = parts.add_seg_token(processor.tokenizer, vcfg.seg_token, where)
    parts.fit_embeddings(vlm, processor.tokenizer)
    hidden = vlm.config.get_text_config().hidden_size
    projection = new_projection(hidden, sam.config.prompt_encoder_config.hidden_size)
    if sources is not None and sources.composed is not None:
        meta = sources.meta
        if (meta.get("seg_token"), meta.get("seg_token_id")) != (vcfg.seg_token, seg_id):
            raise UserError(f"{sources.composed} was trained with seg_token {meta.get('seg_token')!r} (id "
                             f"{meta.get('seg_token_id')}), but model.vlm.seg_token {vcfg.seg_token!r} is id {seg_id} "
                             "here; set model.vlm.seg_token to the folder's (segvlm.json)")
        state = load_file(str(sources.composed / parts.PROJECTION_FILE))
        try:
            projection.load_state_dict(state)
        except RuntimeError as err:
            raise UserError(f"{sources.composed / parts.PROJECTION_FILE} does not fit the VLM/SAM in that folder "
                             f"({str(err).splitlines()[0]}); re-export the model") from None
    # the plain VLM's codec; [SEG] is answer text, and a conversation ends at its last end-of-turn token (Sa2VA's)
    codec = ChatCodec(processor, read_chat_template(vcfg.chat_template), vcfg.max_length,
                      answer_token_ids=(seg_id,), end_after_last_answer=True)
    parts.check_template_has_image(codec, where)
    net = SegVLMNet(vlm, sam, projection)
    # LLM LoRA behind frozen embeddings under checkpointing needs the embeddings' output to require grad (pitfall 3).
    net.vlm = prepare_for_training(net.vlm, cfg, input_grads=True)
    meta = sources.meta if sources is not None else {}
    stats = {k: meta[key] for k, key in (("sam_image_mean", parts.SAM_MEAN_KEY), ("sam_image_std", parts.SAM_STD_KEY))
             if key in meta}
    seg = SegVLMModel(net, cfg.data.channels, processor, codec, vcfg, seg_id, **stats)
    # RL's loss has no LM term (the masks read the hidden state before lm_head): like lm_weight=0 for the output row
    seg.lm_loss_trained = cfg.task.lm_weight > 0 and cfg.objective != "rl"
    # a SAM 2 video mask head: its memory trains (as model.video says) only when the run trains on clips
    seg.video, seg.clip_training = cfg.model.video, clips
    return seg
