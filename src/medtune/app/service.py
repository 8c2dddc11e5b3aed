"""What `medtune app` computes, without the web layer: the runs it was given (each model loaded once, on first use),
checked uploads, one image's prediction through the run's own task (``Task.predict_image``, the code `medtune
predict` writes to files), the pictures a threshold gives, per-image metrics of evaluated splits and training curves.

Nothing here reads a file outside the given run folders and the uploads.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtune.data.io import DICOM_EXTENSIONS, IMAGE_EXTENSIONS, read_image
from medtune.data.types import DataError
from medtune.errors import MissingFileError, UserError
from medtune.runs.files import load_run_config, read_metrics
from medtune.runs.load import LoadedRun, load_run
from medtune.tasks import PredictRequest, Task, task_for
from medtune.tasks.base import ImagePrediction
from medtune.tasks.mask_predict import calibrated_threshold, overlay
from medtune.tasks.segvlm import prompt_questions

# An upload larger than this is refused before it is decoded (a CT slice or fundus photograph is a few MB).
DEFAULT_MAX_UPLOAD_MB = 50
UPLOAD_EXTENSIONS = IMAGE_EXTENSIONS + DICOM_EXTENSIONS
# The training-curve panels of the Runs tab: (title, the metrics.jsonl keys drawn, or a prefix ending in "_").
CURVES = (("loss", ("loss",)), ("validation", ("val_",)), ("images/s", ("images_per_s",)), ("MFU", ("mfu",)))
BYTES_PER_MB = 1024 * 1024


@dataclass
class AppRun:
    """One run folder the app was given: its config and task read at start, its model loaded on first use."""

    name: str
    run_dir: Path
    task: Task
    option: str | None  # the PredictRequest option the run needs: "box", "prompt", "question" or None
    threshold: float
    threshold_source: str
    default_prompt: str | None = None
    _loaded: LoadedRun | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def answers_only(self) -> bool:
        """An instruction-tuned run: it answers in words, it draws no mask."""
        return self.option == "question"


def _names(run_dirs: list[Path]) -> list[str]:
    """Folder names, made unique with their parent's name where two runs share one."""
    names = [d.name for d in run_dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in run_dirs]


class Workbench:
    """The runs of one app and the computations the pages ask for (thread-safe: Gradio calls from worker threads)."""

    def __init__(self, run_dirs: list[str | Path], checkpoint: str = "best", device=None,
                 max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB):
        if not run_dirs:
            raise UserError("medtune app needs at least one run folder: medtune app RUN [RUN ...]")
        dirs = [Path(d).resolve() for d in run_dirs]
        for d in dirs:
            if not (d / "config.yaml").is_file():
                raise UserError(f"{d}: not a run folder (no config.yaml); pass folders that `medtune train` wrote")
        self.checkpoint, self.device = checkpoint, device
        self.max_upload_bytes = int(max_upload_mb * BYTES_PER_MB)
        self.runs: dict[str, AppRun] = {}
        for name, d in zip(_names(dirs), dirs):
            cfg = load_run_config(d)
            task = task_for(cfg)
            option = task.prompt_option(cfg) if task.prompt_option else None
            thr, source = calibrated_threshold(d)
            # the request `medtune predict` asks without --prompt, shown in the page to edit
            prompt = "\n".join(prompt_questions(None, cfg)) if option == "prompt" else None
            self.runs[name] = AppRun(name, d, task, option, thr, source, prompt)

    def names(self, answers_only: bool | None = None) -> list[str]:
        return [n for n, r in self.runs.items() if answers_only is None or r.answers_only == answers_only]

    def run(self, name: str | None) -> AppRun:
        if not name or name not in self.runs:
            raise UserError(f"pick a run ({', '.join(self.runs)})")
        return self.runs[name]

    def loaded(self, run: AppRun) -> LoadedRun:
        """The run's model, loaded the first time it is asked for and kept (one load per run)."""
        with run._lock:
            if run._loaded is None:
                run._loaded = load_run(run.run_dir, self.checkpoint, self.device)
            return run._loaded

    def check_upload(self, path: str | Path | None) -> Path:
        """An uploaded file that exists, is small enough, has an image extension and decodes (DataError if not)."""
        if path is None:
            raise DataError("upload an image first (PNG, JPEG, TIFF or DICOM)")
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path.name}: the upload did not arrive; upload it again")
        size = path.stat().st_size
        if size > self.max_upload_bytes:
            raise DataError(f"{path.name} is {size / BYTES_PER_MB:.0f} MB, more than the "
                            f"{self.max_upload_bytes / BYTES_PER_MB:.0f} MB an upload may have (--max-upload-mb)")
        if not path.name.lower().removesuffix(".gz").endswith(UPLOAD_EXTENSIONS):
            raise DataError(f"{path.name}: not an image this app reads; upload {', '.join(UPLOAD_EXTENSIONS)}")
        read_image(path)  # decodes, or a DataError that names the file
        return path

    def predict(self, name: str, image: str | Path | None, box: tuple[float, ...] | None = None,
                prompt: str | None = None, question: str | None = None) -> ImagePrediction:
        """One image through the run's task; only the option the run takes is passed on."""
        run = self.run(name)
        path = self.check_upload(image)
        options = {"box": box, "prompt": prompt, "question": question}
        # (an empty prompt is the segmenting VLM task's own one-line refusal)
        if run.option == "question" and (question is None or not question.strip()):
            raise DataError("the question is empty: type a question about the image")
        if run.option == "box" and box is None:
            raise DataError("this run was trained with box prompts: give the box (click two corners on the image or "
                            "type x1,y1,x2,y2)")
        if run.option == "prompt" and prompt is not None and prompt.strip():
            # one request per line, asked as turns of one conversation (`medtune predict --prompt A --prompt B`)
            options["prompt"] = [line for line in prompt.splitlines() if line.strip()]
        req = PredictRequest(run_dir=run.run_dir, images=[path], out_dir=run.run_dir, checkpoint=self.checkpoint,
                             **{k: v for k, v in options.items() if k == run.option})
        return run.task.predict_image(self.loaded(run), path, req)

    def per_image_metrics(self, name: str, image: str | Path | None) -> list[dict]:
        """The rows of the run's evaluated splits (RUN/eval/<split>/per_image.csv) for the uploaded image, matched by
        file stem (ids are paths relative to the data set, e.g. ``images/x``, with ``#k`` for the k-th target of an
        image); empty when the image is in no evaluated split."""
        from medtune.report.page import read_per_image

        if image is None:
            return []
        stem = Path(image).stem
        rows = []
        for csv in sorted(self.run(name).run_dir.glob("eval/*/per_image.csv")):
            ids, cols = read_per_image(csv)
            for i, sample_id in enumerate(ids):
                if sample_id.split("#")[0].rsplit("/", 1)[-1] == stem:
                    rows.append({"split": csv.parent.name, "id": sample_id,
                                 **{k: float(v[i]) for k, v in cols.items()}})
        return rows

    def curves(self, name: str) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
        """{panel title: {metric: (steps, values)}} from RUN/metrics.jsonl, read afresh (a run may be training)."""
        records = read_metrics(self.run(name).run_dir)
        panels: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
        for title, keys in CURVES:
            series: dict[str, tuple[list[int], list[float]]] = {}
            for rec in records:
                for key, value in rec.items():
                    wanted = any(key == k or (k.endswith("_") and key.startswith(k)) for k in keys)
                    if wanted and isinstance(value, (int, float)) and "step" in rec:
                        steps, values = series.setdefault(key, ([], []))
                        steps.append(int(rec["step"]))
                        values.append(float(value))
            if series:
                panels[title] = series
        return panels

    def report(self, name: str) -> Path:
        """RUN/report.html, written by the run's task when missing (needs `medtune eval RUN` first)."""
        run = self.run(name)
        path = run.run_dir / "report.html"
        if path.is_file():
            return path
        try:
            return run.task.write_report(run.run_dir, "test")
        except FileNotFoundError as err:
            raise MissingFileError(f"no report for {name} yet: run `medtune eval {run.run_dir}` ({err})") from None


def pictures(pred: ImagePrediction, k: int, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(overlay RGB uint8, probability map RGB uint8, binary mask uint8 0/255) of the k-th map at ``threshold``."""
    from matplotlib import colormaps

    prob = pred.probs[k]
    binary = (prob >= threshold).astype(np.uint8)
    heat = (colormaps["magma"](prob)[..., :3] * 255).round().astype(np.uint8)
    return overlay(pred.image, binary), heat, binary * 255


def display_image(pred: ImagePrediction) -> np.ndarray:
    """The image as RGB uint8, for an answer run (nothing to overlay)."""
    return overlay(pred.image, np.zeros(pred.image.shape[-2:], np.uint8))
