"""`medtune predict RUN IMAGES... --out DIR`: the run's own task writes its outputs (masks, probability maps and
overlays; a segmenting VLM's answers with one mask per [SEG]; an instruction-tuned VLM's answers and labels)."""
from __future__ import annotations

from pathlib import Path

from medtune.tasks import PredictRequest, task_of_run


def predict_images(run_dir: str | Path, images: list[str | Path], out_dir: str | Path, checkpoint: str = "best",
                   threshold: float | None = None, box: tuple[float, float, float, float] | None = None,
                   prompt: str | list[str] | None = None, question: str | None = None,
                   frame: int | None = None) -> list[str]:
    """Predict ``images`` with a run; returns the lines `medtune predict` prints. An option the run's task does not
    take (``--question`` to a mask run, ``--box`` to a VLM) is refused in one line."""
    request = PredictRequest(run_dir=Path(run_dir), images=[Path(p) for p in images], out_dir=Path(out_dir),
                             checkpoint=checkpoint, threshold=threshold, box=box, prompt=prompt, question=question,
                             frame=frame)
    return task_of_run(run_dir).predict(request)
