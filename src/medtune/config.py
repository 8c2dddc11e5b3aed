"""Validated run configuration: YAML file + dotted CLI overrides (``lora.r=32``) -> ``Config``.

Every section forbids unknown keys, so a typo fails loudly with the list of valid keys instead of being ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medtune.errors import ConfigError

# Layouts whose samples are videos (data.layout); medtune.data.video_layouts discovers them
VIDEO_LAYOUTS = ("video_frames", "sa2va_video", "video_files")
# Model families that segment frame sequences through a memory (the task ``video``)
VIDEO_FAMILIES = ("sam2_video",)
# Mask families prompted by a question in words (task.prompt, `medtune predict --prompt TEXT`), not by model.prompt
QUESTION_FAMILIES = ("segvlm",)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunCfg(Section):
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0


class SplitCfg(Section):
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    # Regex over the file name whose first group (or whole match) is the group key (patient, video ...):
    # samples of one group never straddle two splits.
    group_by: str | None = None
    # Use the split a layout ships (DRIVE training/test) for test; val is carved from its training part.
    use_layout_split: bool = True
    seed: int | None = None  # None -> run.seed
    # k-fold cross-validation: fold `fold` of `folds` is the test set, val is carved from the rest (medtune cv)
    folds: int | None = Field(None, ge=2)
    fold: int = Field(0, ge=0)
    # near-duplicate images (perceptual hash within data.duplicate_hash_distance) always land in one split
    keep_duplicates_together: bool = True


class ScaleNormCfg(Section):
    enabled: bool = False
    # Resample so the FOV diameter (px) matches this; None -> the training set's median.
    target_fov_diameter: float | None = None
    # Alternatively a pixel size (e.g. micrometres per pixel) when images carry one in `pixel_size_file`.
    target_pixel_size: float | None = None


class AugmentCfg(Section):
    enabled: bool = True
    flip: bool = True
    rotate90: bool = True
    rotate_degrees: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    intensity: float = 0.15  # max relative shift/scale of intensity and contrast
    prob: float = 0.5

    def changes_image(self) -> bool:
        """Whether any transform can alter the image (and so the encoder input) from one epoch to the next."""
        spatial = self.flip or self.rotate90 or self.rotate_degrees > 0 or tuple(self.scale_range) != (1.0, 1.0)
        return self.enabled and self.prob > 0 and (spatial or self.intensity > 0)


class SyntheticCfg(Section):
    """The embedded default data set (procedural retina-like vessel images)."""

    domain: Literal["A", "B"] = "A"
    n_images: int = 24
    size: int = Field(128, ge=32)  # smaller leaves no room for a vessel tree
    seed: int = 0


class VideoDataCfg(Section):
    """Video layouts (video_frames, sa2va_video, video_files): training clips and the files annotations live in."""

    # frames per training clip; a video with fewer frames (at clip_stride) gives a shorter clip, padded at the end
    # by collate_clips (frame_index -1, never annotated), which a causal memory never looks back on
    clip_length: int = Field(8, ge=1)
    clip_stride: int = Field(1, ge=1)  # frames between consecutive clip frames (1: consecutive frames)
    clips_per_video: int = Field(4, ge=1)  # training items per video per epoch
    fps: float | None = Field(None, gt=0)  # frame rate of frame-folder videos, for reports (video files carry theirs)
    # sa2va_video: Sa2VA's / MeViS's expressions file ({"videos": {name: {"frames", "expressions"}}}) and RLE masks
    expressions_file: str = "meta_expressions.json"
    mask_file: str = "mask_dict.json"


class DataCfg(Section):
    path: str | None = None
    layout: Literal["auto", "generic", "drive", "chase", "stare", "busi", "polygon_json", "llava_json",
                    "synthetic", "video_frames", "sa2va_video", "video_files"] = "auto"
    image_dir: str = "images"
    mask_dir: str = "masks"
    fov_dir: str | None = None
    mask_suffixes: list[str] = Field(default_factory=lambda: ["", "_mask", "_manual1", "_1stHO", "_seg"])
    annotations: str = "annotations.json"  # polygon_json / llava_json layouts (data.path may also be the JSON file)
    image_root: str | None = None  # llava_json: folder image paths are relative to (default: the JSON's folder)
    channels: Literal[1, 3] = 3
    # Integer images wider than 8 bits are divided by this (e.g. 4095 for 12-bit data). None: the smallest 8/12/16-bit
    # full scale that holds the data set's maximum, decided once per run and recorded in RUN/intensity.json.
    image_max: float | None = Field(None, gt=0)
    # Masks that are label maps (0/1/2/3 ...): these labels are the foreground. None refuses label maps.
    mask_labels: list[int] | None = Field(None, min_length=1)
    # random_crop: patches of patch_size (thin structures at native scale);
    # whole_image: the whole image resized to patch_size (lesions, box prompts).
    sampling: Literal["random_crop", "whole_image"] = "random_crop"
    patch_size: int = Field(96, ge=8)
    patches_per_image: int = Field(8, ge=1)  # per epoch, random_crop only
    batch_size: int = Field(8, ge=1)  # global batch (split across processes)
    num_workers: int = 0
    # Decoded training / validation samples kept for reuse (data/decode_cache.py): off, memory (each process its share of
    # cache_max_mb) or disk (cache_dir, default RUN/decode_cache, at most cache_max_mb); keyed by file content.
    cache: Literal["off", "memory", "disk"] = "off"
    cache_max_mb: float = Field(1024.0, gt=0)
    cache_dir: str | None = None
    max_samples: int | None = None  # quick trial run on the first N samples
    derive_fov: bool = True  # threshold the dark border when a layout ships no FOV mask
    duplicate_hash_distance: int = 4  # perceptual-hash Hamming distance that counts as near-duplicate
    split: SplitCfg = Field(default_factory=SplitCfg)
    scale_norm: ScaleNormCfg = Field(default_factory=ScaleNormCfg)
    augment: AugmentCfg = Field(default_factory=AugmentCfg)
    synthetic: SyntheticCfg = Field(default_factory=SyntheticCfg)
    video: VideoDataCfg = Field(default_factory=VideoDataCfg)


class LoraCfg(Section):
    preset: Literal["small", "medium", "large"] = "medium"
    r: int | None = None  # overrides the preset
    alpha: float | None = None  # default 2r
    dropout: float = 0.05
    target_modules: str | None = None  # anchored regex over module names; None -> the family's default
    modules_to_save: list[str] | None = None  # None -> the family's default (e.g. SAM's mask decoder)

    def resolved_r(self) -> int:
        return self.r if self.r is not None else {"small": 8, "medium": 32, "large": 64}[self.preset]

    def resolved_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.resolved_r()


class VLMCfg(Section):
    """Vision-language parts: families ``segvlm`` (VLM + SAM through a [SEG] token) and ``vlm`` (instruction tuning)."""

    vlm_path: str | None = None  # segvlm: local VLM folder (AutoModelForImageTextToText); model.path = a composed one
    sam_path: str | None = None  # segvlm: local SamModel / Sam2Model folder
    seg_token: str = "[SEG]"
    train_projector: bool = False  # the VLM's multimodal projector trains (fully) too
    vision_lora: bool = False  # LoRA also in the VLM's vision tower (default: language model only)
    sam_encoder_lora: bool = False  # segvlm: LoRA in the SAM image encoder (default: frozen)
    max_length: int | None = None  # token limit; a sample that would exceed it is refused, never truncated
    chat_template: str | None = None  # Jinja template (file path or text) overriding the checkpoint's
    # settings of the folder's image processor, e.g. the image-token budget of dynamic-resolution VLMs: Hulu-Med's
    # max_tokens, Qwen-VL's max_pixels, InternVL's max_patches (tiles). Checked against the processor, kept in exports.
    image_processor: dict[str, Any] = Field(default_factory=dict)
    # segvlm: which mask-decoder output is the mask. best_iou: the three multimask outputs, keeping per prompt the one
    # with the highest predicted IoU (Sa2VA, training and inference); single: the single-mask head (mask token 0;
    # LISA's multimask_output=False); auto: best_iou with SAM 2, single with SAM.
    mask_output: Literal["auto", "best_iou", "single"] = "auto"
    # segvlm on videos (mask head: a SAM 2 video model): the frames of a clip / video the VLM sees with the question;
    # the projected [SEG] prompts SAM 2 on each of them (conditioning frames, decoded without memory) and SAM 2's
    # memory carries the mask to the other frames, in training as in inference (Sa2VA: 5; first: the first frames,
    # as Sa2VA's inference; uniform: spread evenly over the sequence, the first and last included)
    video_frames: int = Field(5, ge=1)
    video_frame_choice: Literal["first", "uniform"] = "first"


class VideoModelCfg(Section):
    """Family ``sam2_video`` (SAM 2 on clips): which parts of the memory path train, and the inference memory bank."""

    # train: trained (fully; under LoRA the memory attention's projections get adapters and the others are trained as
    # modules_to_save copies); frozen: kept as loaded. memory_attention: the attention of the current frame to the
    # memory bank (+ the memories' temporal position encodings); memory_encoder: what turns a frame and its predicted
    # mask into a memory (+ the occlusion embedding); object_pointers: the projection of the decoder's output token
    # into a per-frame object pointer, its temporal position projection, and the mask prompt's downsampler.
    memory_attention: Literal["train", "frozen"] = "train"
    memory_encoder: Literal["train", "frozen"] = "train"
    object_pointers: Literal["train", "frozen"] = "train"
    # propagation: tracked frames whose outputs stay in the memory bank, besides the prompted frame. None: exactly
    # what the model can read (SAM 2: its 6 previous-frame memories and 15 previous object pointers), so the bounded
    # bank gives the same masks as an unbounded one; fewer reads fewer memories (less memory, different masks).
    memory_frames: int | None = Field(None, ge=1)


class ModelCfg(Section):
    family: str = "unet"
    path: str | None = None  # local checkpoint folder; None -> built from `config` (random init)
    config: dict[str, Any] = Field(default_factory=dict)  # family-specific architecture overrides
    # auto: LoRA for a pretrained model (path given), full training for a model built from scratch.
    finetune: Literal["auto", "lora", "full"] = "auto"
    # SAM: semantic (no prompt) or box prompt from the ground truth; sam2_video also mask (the ground-truth mask of
    # the clip's first annotated frame prompts the model, whose memory carries it through the clip)
    prompt: Literal["none", "box", "mask"] = "none"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    quantize_4bit: bool = False  # QLoRA (bitsandbytes, CUDA only)
    # SAM / SAM 2: keep the image encoder frozen. With finetune=full the prompt encoder and mask decoder train (the
    # MedSAM-style "train the decoder" set-up, fast with train.feature_cache); with LoRA, adapters must target the
    # decoder (e.g. lora.target_modules='^mask_decoder\.transformer\..*_proj$' lora.modules_to_save=[]).
    freeze_image_encoder: bool = False
    vlm: VLMCfg = Field(default_factory=VLMCfg)
    video: VideoModelCfg = Field(default_factory=VideoModelCfg)


# Sa2VA / LISA mask-loss weights: the segmenting VLM's default when the config sets no `loss`.
SEGVLM_LOSS = {"bce": 2.0, "dice": 0.5, "focal": 0.0}


class LossCfg(Section):
    dice: float = 1.0
    focal: float = 1.0
    bce: float = 0.5
    cldice: float = 0.0
    focal_gamma: float = 2.0
    cldice_iters: int = 3


class OptimCfg(Section):
    lr: float = Field(1e-3, ge=0)
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 50
    max_steps: int = Field(1000, ge=1)
    grad_accum: int = Field(1, ge=1)
    clip_grad_norm: float | None = 1.0


class TrainCfg(Section):
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=1)
    save_every: int = Field(500, ge=1)
    # also write `last` whenever this many minutes passed since the previous one (a kill -9 then loses at most this
    # much time as well as at most save_every steps); None: by step count only
    save_every_minutes: float | None = Field(None, gt=0)
    keep_last: int = 2  # step-N checkpoints kept besides best and last
    preflight: bool = True
    preflight_steps: int = 3
    # count the first step's FLOPs and measure the device's matmul peak at start (~0.5 s), then log
    # tflops_per_s and mfu (model FLOP utilisation) with the throughput; RUN/utilisation.json holds the counts
    log_mfu: bool = True
    max_nonfinite: int = 10  # consecutive non-finite losses before stopping with a checkpoint
    # warn when a trainable tensor's gradient is exactly zero on this many logged steps in a row (train/gradient_watch:
    # a part of the model that stopped reaching the loss after the preflight); 0: off
    dead_gradient_checks: int = Field(3, ge=0)
    trackers: list[str] = Field(default_factory=lambda: ["tensorboard"])
    max_eval_images: int | None = None  # cap validation images during training (speed)
    # the validation metric that picks `best` (e.g. val_dice, val_reward, val_accuracy); None -> the objective's
    # own (rl: val_reward, the run's reward on validation) or the task's (masks/segvlm: val_dice, instruct:
    # val_accuracy)
    selection_metric: str | None = None
    selection_mode: Literal["max", "min"] = "max"
    # Frozen image encoder (model.freeze_image_encoder, SAM / SAM 2): compute its output once per distinct image and
    # reuse it every epoch: off | memory (host RAM) | disk (safetensors files in feature_cache_dir, default
    # RUN/feature_cache; a folder may be shared by runs). Keyed by the exact input and a hash of the encoder's weights
    # and config, so any change recomputes. Needs inputs that repeat: data.sampling=whole_image, no augmentation.
    feature_cache: Literal["off", "memory", "disk"] = "off"
    feature_cache_dir: str | None = None
    # CPU threads of torch's intra-op pool; None: OMP_NUM_THREADS when set, else the cores this process may use
    # (affinity, cgroup quota) shared by the processes launched on the machine (medtune.threads; RUN/env.json)
    threads: int | None = Field(None, ge=1)

    @field_validator("feature_cache", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false


class EvalCfg(Section):
    calibration: Literal["max_dice", "max_fbeta", "target_recall"] = "max_dice"
    beta: float = Field(1.0, gt=0)
    target_recall: float = Field(0.9, ge=0, le=1)
    roi_size: int | None = None  # sliding-window tile; None -> data.patch_size
    overlap: float = 0.25
    sw_batch_size: int = 8
    bootstrap: int = Field(1000, ge=1)
    tta: bool = False  # average logits over horizontal/vertical flips (semantic mode; 4x inference cost)


class RLCfg(Section):
    group_size: int = Field(8, ge=2)  # advantages are relative to the group: one sample carries no signal
    temperature: float = Field(1.0, gt=0)
    logprob_reduction: Literal["sum", "mean"] = "mean"
    reward: str | dict[str, float] = "multi_objective"  # preset name or {component: weight}
    custom_rewards: dict[str, str] = Field(default_factory=dict)  # name -> "package.module:function"
    clip_eps: float = Field(0.2, gt=0)
    inner_epochs: int = Field(2, ge=1)
    kl_coef: float = 0.05
    entropy_coef: float = 0.0
    sft_mix: float = 0.0  # lambda * ComboLoss added for stability
    curriculum: bool = False
    precision_floor: float = 0.5
    precision_floor_k: float = 1.0
    init_from: str | None = None  # supervised run folder whose weights become the frozen reference


class TaskCfg(Section):
    """What the model is asked to do with each sample (``auto``: from the family: segvlm -> segvlm, vlm -> instruct,
    sam2_video -> video, any other mask family on a video layout named in data.layout -> video, otherwise masks)."""

    kind: Literal["auto", "masks", "segvlm", "instruct", "video"] = "auto"
    # segvlm, for data without referring expressions: the question asked and the teacher-forced answer
    class_name: str = "object"
    prompt: str = "Please segment the {class_name} in this image."
    answer: str = "It is [SEG]."
    lm_weight: float = Field(1.0, ge=0)  # lambda * LM cross-entropy on assistant tokens, added to the mask loss
    # instruct: the label set answers are parsed into, and extra words that mean a label
    labels: list[str] | None = None
    synonyms: dict[str, list[str]] = Field(default_factory=dict)
    max_new_tokens: int = Field(32, ge=1)


class Config(Section):
    objective: Literal["supervised", "rl"] = "supervised"
    run: RunCfg = Field(default_factory=RunCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    model: ModelCfg = Field(default_factory=ModelCfg)
    lora: LoraCfg = Field(default_factory=LoraCfg)
    loss: LossCfg = Field(default_factory=LossCfg)
    optim: OptimCfg = Field(default_factory=OptimCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)
    rl: RLCfg = Field(default_factory=RLCfg)
    task: TaskCfg = Field(default_factory=TaskCfg)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if "segvlm" in (self.task_kind(), self.model.family) and not self.loss.model_fields_set:
            # resolved here, so config.yaml records the weights the run really trains with
            object.__setattr__(self, "loss", LossCfg(**SEGVLM_LOSS))
        if self.data.split.val_fraction + self.data.split.test_fraction >= 1.0:
            raise ValueError("data.split.val_fraction + data.split.test_fraction must be < 1")
        if self.objective == "rl" and self.optim.grad_accum != 1:
            raise ValueError("optim.grad_accum is not used by objective: rl (each rollout is its own update); "
                             "raise data.batch_size or rl.group_size instead")
        if self.model.family in QUESTION_FAMILIES and self.model.prompt != "none":
            raise ValueError(f"model.prompt={self.model.prompt}: family {self.model.family} is prompted by a question "
                             "(task.prompt, --prompt TEXT), not by a mask or a box; remove model.prompt")
        if self.model.prompt == "box" and self.data.sampling != "whole_image":
            raise ValueError("model.prompt=box needs data.sampling=whole_image (the box is drawn around the whole "
                             "lesion, and evaluation sees the whole image); random crops would train on other inputs")
        if self.train.feature_cache != "off":
            self._check_feature_cache()
        return self

    def _check_feature_cache(self) -> None:
        """The data-side conditions under which cached encoder outputs are the ones a live encoder would compute
        and are asked for again; the model-side ones (frozen, no adapter, no dropout) are checked on the built model
        (models/feature_cache.py)."""
        key = f"train.feature_cache={self.train.feature_cache}"
        if self.objective != "supervised":
            raise ValueError(f"{key} is wired into the supervised recipe only; set train.feature_cache=off")
        if self.data.sampling != "whole_image":
            raise ValueError(f"{key}: data.sampling=random_crop draws new crops every epoch, so cached features would "
                             "never be asked for again; set data.sampling=whole_image or train.feature_cache=off")
        if self.data.augment.changes_image():
            raise ValueError(f"{key}: data.augment changes the encoder input every epoch, so cached features would "
                             "be stale or never reused; set data.augment.enabled=false or train.feature_cache=off")

    def task_kind(self) -> Literal["masks", "segvlm", "instruct", "video"]:
        """The task a run is trained, evaluated and predicted by. Decided from the config alone (no disk access, so
        a run folder's config.yaml always names the same task): a video family, or a mask family (segvlm included,
        as ``models.vlm.seg.parts.trains_on_clips`` reads it) on a layout named a video layout (the video task then
        refuses a model it cannot train, in one line). A video folder reached through ``data.layout=auto`` with an
        image family stays ``masks``, whose training refuses videos."""
        if self.task.kind != "auto":
            return self.task.kind
        if self.model.family in VIDEO_FAMILIES:
            return "video"
        if self.model.family != "vlm" and self.data.layout in VIDEO_LAYOUTS:
            return "video"
        return {"segvlm": "segvlm", "vlm": "instruct"}.get(self.model.family, "masks")

    def prompt_kind(self) -> Literal["none", "box", "mask", "text"]:
        """What prompts the model: a question in words (``text``: a segmenting VLM) or ``model.prompt``. Decided from
        the config alone, so `medtune predict` checks its options before the model loads."""
        return "text" if self.model.family in QUESTION_FAMILIES else self.model.prompt

    def finetune_mode(self) -> Literal["lora", "full"]:
        if self.model.finetune != "auto":
            return self.model.finetune
        pretrained = (self.model.path is not None or self.rl.init_from is not None
                      or self.model.vlm.vlm_path is not None)  # segvlm composed from pretrained parts
        return "lora" if pretrained else "full"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _valid_keys(section: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in section.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            keys += _valid_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def deep_merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` laid on top, nested dicts merged key by key (config trees, architecture overrides)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value (e.g. lora.r=32)")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def build_config(tree: dict | None = None, overrides: list[str] | tuple[str, ...] = (), source: str = "config") -> Config:
    tree = dict(tree or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"] if not isinstance(p, int))
            if e["type"] == "extra_forbidden":
                parent = loc.rsplit(".", 1)[0] + "." if "." in loc else ""
                depth = loc.count(".")
                siblings = dict.fromkeys(
                    ".".join(k.split(".")[: depth + 1]) for k in _valid_keys(Config) if k.startswith(parent)
                )
                lines.append(f"unknown key '{loc}'; valid keys here: {', '.join(siblings)}")
            else:
                lines.append(f"'{loc}': {e['msg']}")
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass a YAML file (see configs/ for examples)")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections (run, data, model, ...)")
    return build_config(tree, overrides, source=str(path) if path else "overrides")
