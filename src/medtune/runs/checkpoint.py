"""Atomic checkpoints: write to a temporary folder, rename into place, only then rotate old ones away.

A checkpoint folder holds the trainable weights (``adapter/`` in PEFT format or ``model/`` for full fine-tuning),
``engine/`` (accelerate's ``save_state``: optimizer, fp16 loss scaler and one RNG file per process; with FSDP or
DeepSpeed also the engine's own, possibly sharded, weights and optimizer state, written by every rank),
``trainer_state.pt`` (scheduler, step, counters) and ``meta.json``. Every process takes part in a save and a load
(FSDP gathers weights collectively; ZeRO / FSDP shard the optimizer per rank; each rank has its own RNG stream).
Checkpoints written before ``engine/`` existed (optimizer and rank 0's RNG inside ``trainer_state.pt``) still load.
A crash at any moment leaves either the previous or the new checkpoint complete, never neither (pitfall 12): a folder
under its own name is complete by construction, ``.old-NAME`` is the previous one while the new one is being renamed
into place, and ``.tmp-*`` / ``.deleting-*`` are half-written or half-deleted leftovers that ``recover_checkpoints`` removes.
Files are fsynced before the rename, so the same holds when the machine itself goes down.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from medtune.errors import MissingFileError
from medtune.models.base import SegModel
from medtune.models.lora import load_trainable, save_trainable

ENGINE_DIR = "engine"  # accelerate's save_state folder inside a checkpoint


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    best_metric: float = float("-inf")
    best_step: int = -1
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    fp16_overflows: int = 0  # updates the fp16 loss scaler skipped (routine, not counted as non-finite)
    val_history: list[float] = field(default_factory=list)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _old(final: Path) -> Path:
    return final.with_name(f".old-{final.name}")


def _delete_dir(path: Path) -> None:
    """Rename out of the way first, so a crash mid-deletion never leaves a half-deleted folder under a real name."""
    doomed = path.with_name(f".deleting-{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            _fsync(path)
    for path in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync(path)


def _replace_dir(tmp: Path, final: Path) -> None:
    old = _old(final)
    if old.exists():
        if final.exists():
            _delete_dir(old)
        else:  # a crash between the two renames below: .old- is the only complete copy, so it is not thrown away
            os.replace(old, final)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(final.parent)
    if old.exists():
        _delete_dir(old)


def _json_number(value):
    """JSON has no -Infinity or NaN: such a value (e.g. best_metric before any validation) is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def engine_holds_weights(accelerator) -> bool:
    """FSDP and DeepSpeed save and load the (sharded) model inside accelerate's state; otherwise the weights live only
    in ``adapter/`` / ``model/`` (accelerate's copy would repeat the frozen base model in every checkpoint)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def keep_weights_out_of_engine_state(accelerator) -> None:
    """Hooks so that accelerate's save_state / load_state skip the plain (non-FSDP, non-DeepSpeed) model: its weights
    are the checkpoint's adapter/ or model/ folder, written and read by save_trainable / load_trainable."""
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())


def save_checkpoint(ckpt_root: Path, name: str, model: SegModel, optimizer, scheduler, state: TrainerState,
                    extra_meta: dict | None = None, scaler=None, accelerator=None, engine_model=None) -> Path:
    """Call on every process when `accelerator` is given (optimizer, scaler and each rank's RNG go through
    accelerate's save_state; `engine_model` is the prepared model, whose full weights FSDP gathers on every rank).
    Without it (a single process outside a run): optimizer, scaler and RNG go into trainer_state.pt."""
    is_main = accelerator is None or accelerator.is_main_process
    # one temporary folder all processes write into: named after the main process's pid, which every rank learns
    pid = os.getpid()
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        pid = broadcast_object_list([pid])[0]
    tmp = ckpt_root / f".tmp-{name}-{pid}"
    if is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    if accelerator is not None:
        accelerator.wait_for_everyone()
        gathered = None
        if engine_holds_weights(accelerator) and engine_model is not None:
            gathered = accelerator.get_state_dict(engine_model)  # collective: every rank must call it
        accelerator.save_state(str(tmp / ENGINE_DIR))
        accelerator.wait_for_everyone()  # every rank's files are in tmp before the main process renames it
        if is_main:
            save_trainable(model, tmp, state_dict=gathered)
    else:
        save_trainable(model, tmp)
    if is_main:
        blob = {"scheduler": scheduler.state_dict() if scheduler is not None else None, "trainer": asdict(state)}
        if accelerator is None:
            blob.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler is not None else None,
                        rng=_rng_state())
        torch.save(blob, tmp / "trainer_state.pt")
        meta = {"step": state.step, "best_metric": state.best_metric, "best_step": state.best_step,
                **(extra_meta or {})}
        meta = {k: _json_number(v) for k, v in meta.items()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, allow_nan=False))
        _fsync_tree(tmp)
        _replace_dir(tmp, ckpt_root / name)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return ckpt_root / name


def rotate_step_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    steps = sorted((p for p in ckpt_root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in steps[: max(0, len(steps) - keep_last)]:
        _delete_dir(old)


def recover_checkpoints(ckpt_root: Path) -> None:
    """Undo what a crash left half done: put back a `.old-NAME` whose NAME is missing (a crash between the two
    renames of a save), and delete half-written `.tmp-*`, half-deleted `.deleting-*` and superseded `.old-*`."""
    if not ckpt_root.is_dir():
        return
    for path in sorted(ckpt_root.iterdir()):
        if not path.is_dir():
            continue
        if path.name.startswith(".old-"):
            final = ckpt_root / path.name[len(".old-"):]
            if final.exists():
                shutil.rmtree(path)
            else:
                os.replace(path, final)
        elif path.name.startswith((".tmp-", ".deleting-")):
            shutil.rmtree(path)


def is_complete(ckpt: Path) -> bool:
    return (ckpt / "meta.json").is_file() and (ckpt / "trainer_state.pt").is_file()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the most steps (`last`, `step-N` or `best`; `last` on a tie), or None.

    Every checkpoint holds the full training state, so any of them resumes exactly; the newest loses the least.
    Call `recover_checkpoints` first, so a checkpoint a crash left only as `.old-NAME` counts too."""
    root = Path(run_dir) / "checkpoints"
    found = []
    for path in root.glob("*") if root.is_dir() else []:
        if path.is_dir() and not path.name.startswith(".") and is_complete(path):
            step = json.loads((path / "meta.json").read_text()).get("step", 0)
            found.append((step, path.name == "last", path))
    return max(found, key=lambda t: t[:2])[2] if found else None


def find_checkpoint(run_dir: Path, which: str = "last") -> Path:
    """`which` = best | last | step-N | a path. Falls back to the `.old-` copy left by a crash mid-rename."""
    candidate = Path(which)
    if candidate.is_dir() and (candidate / "meta.json").exists():
        return candidate
    root = Path(run_dir) / "checkpoints"
    for path in (root / which, root / f".old-{which}"):
        if (path / "meta.json").exists():
            return path
    available = sorted(p.name for p in root.glob("*") if (p / "meta.json").exists()) if root.exists() else []
    raise MissingFileError(
        f"no checkpoint '{which}' in {root}; available: {', '.join(available) or 'none (did training save any?)'}"
    )


def load_checkpoint(ckpt: Path, model: SegModel, optimizer=None, scheduler=None, restore_rng: bool = True,
                    scaler=None, accelerator=None) -> TrainerState:
    """With `accelerator` (every process calls it, after accelerator.prepare): optimizer, scaler and this rank's own
    RNG come from the checkpoint's engine/ folder through accelerate's load_state."""
    engine = ckpt / ENGINE_DIR
    # FSDP / DeepSpeed restore the weights from engine/; a checkpoint without it (older, or saved by one process)
    # holds them only as adapter/ or model/, which must then be loaded here or the run resumes untrained
    if accelerator is None or not (engine_holds_weights(accelerator) and engine.is_dir()):
        load_trainable(model, ckpt)
    state_path = ckpt / "trainer_state.pt"
    if optimizer is None and scheduler is None and not restore_rng:
        meta = json.loads((ckpt / "meta.json").read_text())
        return TrainerState(step=meta.get("step", 0))
    blob = torch.load(state_path, map_location="cpu", weights_only=True)
    if accelerator is not None and engine.is_dir():
        accelerator.load_state(str(engine))
    else:  # a single-process save, or a checkpoint from before engine/: rank 0's RNG on every rank
        if optimizer is not None:
            optimizer.load_state_dict(blob["optimizer"])
        if scaler is not None and blob.get("scaler"):
            scaler.load_state_dict(blob["scaler"])
        if restore_rng:
            _set_rng_state(blob["rng"])
    if scheduler is not None and blob["scheduler"] is not None:
        scheduler.load_state_dict(blob["scheduler"])
    return TrainerState(**blob["trainer"])
