"""The Gradio pages of `medtune app`: Segment, Ask, Compare, Runs. Every handler turns a user's mistake (or any other
failure) into one line in the page's status box, so a bad upload never stops the app; computation lives in
``service.py``. Gradio runs handlers in worker threads and shows a progress overlay while they run."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from medtune.app.service import Workbench, display_image, pictures
from medtune.errors import UserError

log = logging.getLogger("medtune")

# How often the Runs tab re-reads metrics.jsonl (runs in progress grow).
CURVES_REFRESH_S = 5.0
# The events that run a model share one queue: one inference at a time, whichever page asked (the models are shared
# between sessions and pages, and switch between train and eval mode around a forward).
INFERENCE = "inference"
# Display height of the images in the pages (small images are scaled up, large ones down).
IMAGE_HEIGHT = 320
# Metric columns of per_image.csv shown in Compare, when present (the rest stay in the run's report).
SHOWN_METRICS = ("dice@cal", "iou@cal", "precision@cal", "recall@cal", "cldice@cal", "hd95@cal", "correct")


def _failure(err: Exception) -> str:
    """The one line shown in the page: a user's mistake as it is, anything else named but without a traceback."""
    if isinstance(err, UserError):
        return f"⚠️ {err}"
    log.exception("medtune app: unexpected error")
    return f"⚠️ could not do that ({type(err).__name__}: {err}); the app keeps running, see its log"


def _parse_box(text: str | None) -> tuple[float, ...] | None:
    if not text or not text.strip():
        return None
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
        raise UserError(f"box {text!r}: give x1,y1,x2,y2 in pixels with x1 < x2 and y1 < y2")
    return box


def _downloads(pred, k: int, threshold: float, stem: str) -> list[str]:
    """mask PNG, probability PNG (8-bit) and probabilities as .npy (float32), in a fresh temporary folder."""
    _, _, mask = pictures(pred, k, threshold)
    out = Path(tempfile.mkdtemp(prefix="medtune-app-"))
    suffix = f"_seg{k}" if pred.answer is not None else ""
    Image.fromarray(mask).save(out / f"{stem}{suffix}_mask.png")
    Image.fromarray((pred.probs[k] * 255).round().astype(np.uint8)).save(out / f"{stem}{suffix}_prob.png")
    np.save(out / f"{stem}{suffix}_prob.npy", pred.probs[k])
    return [str(p) for p in sorted(out.iterdir())]


def _metrics_text(rows: list[dict]) -> str:
    if not rows:
        return "_this image is in none of the run's evaluated splits_"
    keys = [k for k in SHOWN_METRICS if k in rows[0]] or [k for k in rows[0] if k not in ("split", "id")][:5]
    head = "| split | id | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 2) + "\n"
    return head + "\n".join(f"| {r['split']} | {r['id']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |"
                            for r in rows)


def build_ui(bench: Workbench) -> gr.Blocks:
    mask_runs, answer_runs, all_runs = bench.names(False), bench.names(True), bench.names()

    with gr.Blocks(title="medtune", analytics_enabled=False) as demo:
        gr.Markdown("## medtune: segment, ask, compare and watch runs")
        with gr.Tab("Segment", visible=bool(mask_runs)):
            seg_pred = gr.State(None)
            with gr.Row():
                with gr.Column():
                    seg_run = gr.Dropdown(mask_runs, value=mask_runs[0] if mask_runs else None, label="run",
                                          elem_id="seg-run")
                    seg_file = gr.File(label="image (PNG, JPEG, TIFF or DICOM)", type="filepath",
                                       elem_id="seg-file")
                    seg_preview = gr.Image(label="image (click two corners for a box)", interactive=False,
                                           elem_id="seg-preview", height=IMAGE_HEIGHT, format="png")
                    seg_box = gr.Textbox(label="box x1,y1,x2,y2 (pixels)", elem_id="seg-box")
                    seg_prompt = gr.Textbox(label="prompt (one request per line, each asked as a turn)", lines=2,
                                            elem_id="seg-prompt")
                    seg_go = gr.Button("Segment", variant="primary", elem_id="seg-go")
                with gr.Column():
                    seg_status = gr.Markdown(elem_id="seg-status")
                    seg_answer = gr.Textbox(label="generated answer", interactive=False, elem_id="seg-answer")
                    seg_k = gr.Dropdown(choices=[0], value=0, label="mask (one per [SEG])", elem_id="seg-k")
                    seg_thr = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="threshold", elem_id="seg-thr")
                    with gr.Row():
                        seg_overlay = gr.Image(label="mask overlay", interactive=False, elem_id="seg-overlay",
                                               height=IMAGE_HEIGHT, format="png")
                        seg_prob = gr.Image(label="probability", interactive=False, elem_id="seg-prob",
                                            height=IMAGE_HEIGHT, format="png")
                    seg_files = gr.File(label="downloads (mask PNG, probabilities PNG and .npy)", file_count="multiple",
                                        interactive=False, elem_id="seg-downloads")
            corners = gr.State([])

            def run_changed(name):
                if not name:
                    return gr.update(), gr.update(), gr.update(), "", gr.update(), gr.update()
                run = bench.run(name)
                generates = run.option == "prompt"  # a segmenting VLM: an answer and one mask per [SEG]
                return (gr.update(visible=run.option == "box"),
                        gr.update(visible=generates, value=run.default_prompt or ""),
                        gr.update(value=run.threshold),
                        f"threshold starts at {run.threshold:.3f}: {run.threshold_source}",
                        gr.update(visible=generates), gr.update(visible=generates))

            def show_upload(path):
                if path is None:
                    return None, ""
                try:
                    from medtune.data.io import read_image
                    from medtune.tasks.mask_predict import overlay

                    image = read_image(bench.check_upload(path))
                    return overlay(image, np.zeros(image.shape[-2:], np.uint8)), ""
                except Exception as err:  # noqa: BLE001 - every failure is a line in the page
                    return None, _failure(err)

            def click_corner(points, evt: gr.SelectData):
                """A click is a box corner: the first shows as "x,y", the second completes the box; a third click
                starts a new box."""
                points = [evt.index] if len(points) != 1 else points + [evt.index]
                if len(points) == 1:
                    return points, f"{points[0][0]},{points[0][1]}"
                (xa, ya), (xb, yb) = points
                return points, f"{min(xa, xb)},{min(ya, yb)},{max(xa, xb)},{max(ya, yb)}"

            def segment(name, path, box_text, prompt, threshold, progress=gr.Progress()):
                try:
                    progress(0.1, desc="loading the model (first use) and predicting")
                    pred = bench.predict(name, path, box=_parse_box(box_text), prompt=prompt)
                    if pred.probs.shape[0] == 0:
                        return (pred, "the answer holds no [SEG]: no mask", pred.answer or "",
                                gr.update(choices=[0], value=0), display_image(pred), None, None)
                    over, heat, _ = pictures(pred, 0, threshold)
                    return (pred, f"{pred.probs.shape[0]} mask(s)", pred.answer or "",
                            gr.update(choices=list(range(pred.probs.shape[0])), value=0), over, heat,
                            _downloads(pred, 0, threshold, Path(path).stem))
                except Exception as err:  # noqa: BLE001
                    return None, _failure(err), "", gr.update(), None, None, None

            def rethreshold(pred, k, threshold, path):
                if pred is None or pred.probs.shape[0] == 0:
                    return gr.update(), gr.update(), gr.update()
                k = int(k or 0)
                over, heat, _ = pictures(pred, k, threshold)
                return over, heat, _downloads(pred, k, threshold, Path(path).stem if path else "image")

            run_outputs = [seg_box, seg_prompt, seg_thr, seg_status, seg_answer, seg_k]
            seg_run.change(run_changed, seg_run, run_outputs)
            demo.load(run_changed, seg_run, run_outputs)
            seg_file.change(show_upload, seg_file, [seg_preview, seg_status])
            seg_preview.select(click_corner, corners, [corners, seg_box])
            seg_go.click(segment, [seg_run, seg_file, seg_box, seg_prompt, seg_thr],
                         [seg_pred, seg_status, seg_answer, seg_k, seg_overlay, seg_prob, seg_files],
                         concurrency_id=INFERENCE)
            seg_thr.change(rethreshold, [seg_pred, seg_k, seg_thr, seg_file], [seg_overlay, seg_prob, seg_files],
                           show_progress="hidden")
            seg_k.input(rethreshold, [seg_pred, seg_k, seg_thr, seg_file], [seg_overlay, seg_prob, seg_files])

        with gr.Tab("Ask", visible=bool(answer_runs)):
            with gr.Row():
                with gr.Column():
                    ask_run = gr.Dropdown(answer_runs, value=answer_runs[0] if answer_runs else None, label="run",
                                          elem_id="ask-run")
                    ask_file = gr.File(label="image (PNG, JPEG, TIFF or DICOM)", type="filepath", elem_id="ask-file")
                    ask_question = gr.Textbox(label="question", elem_id="ask-question")
                    ask_go = gr.Button("Ask", variant="primary", elem_id="ask-go")
                with gr.Column():
                    ask_status = gr.Markdown(elem_id="ask-status")
                    ask_image = gr.Image(label="image", interactive=False, elem_id="ask-image",
                                         height=IMAGE_HEIGHT, format="png")
                    ask_answer = gr.Textbox(label="answer", interactive=False, elem_id="ask-answer")
                    ask_label = gr.Textbox(label="parsed label", interactive=False, elem_id="ask-label")

            def ask(name, path, question, progress=gr.Progress()):
                try:
                    progress(0.1, desc="loading the model (first use) and generating")
                    pred = bench.predict(name, path, question=question)
                    return "", display_image(pred), pred.answer, pred.label or "(the run has no label set)"
                except Exception as err:  # noqa: BLE001
                    return _failure(err), None, "", ""

            ask_go.click(ask, [ask_run, ask_file, ask_question], [ask_status, ask_image, ask_answer, ask_label],
                         concurrency_id=INFERENCE)

        with gr.Tab("Compare", visible=len(all_runs) > 1):
            with gr.Row():
                cmp_a = gr.Dropdown(all_runs, value=all_runs[0], label="run A", elem_id="cmp-a")
                cmp_b = gr.Dropdown(all_runs, value=all_runs[-1], label="run B", elem_id="cmp-b")
            with gr.Row():
                cmp_file = gr.File(label="image (PNG, JPEG, TIFF or DICOM)", type="filepath", elem_id="cmp-file")
                with gr.Column():
                    cmp_text = gr.Textbox(label="prompt / question (segmenting VLM: blank = the run's own prompt)",
                                          elem_id="cmp-text")
                    cmp_box = gr.Textbox(label="box x1,y1,x2,y2 (box-prompted runs)", elem_id="cmp-box")
                    cmp_go = gr.Button("Compare", variant="primary", elem_id="cmp-go")
            cmp_status = gr.Markdown(elem_id="cmp-status")
            with gr.Row():
                with gr.Column():
                    cmp_img_a = gr.Image(label="A", interactive=False, elem_id="cmp-img-a",
                                         height=IMAGE_HEIGHT, format="png")
                    cmp_md_a = gr.Markdown(elem_id="cmp-md-a")
                with gr.Column():
                    cmp_img_b = gr.Image(label="B", interactive=False, elem_id="cmp-img-b",
                                         height=IMAGE_HEIGHT, format="png")
                    cmp_md_b = gr.Markdown(elem_id="cmp-md-b")

            def one_side(name, path, text, box):
                run = bench.run(name)
                prompt = (text or run.default_prompt) if run.option == "prompt" else None
                pred = bench.predict(name, path, box=box, prompt=prompt, question=text)
                lines = [f"**{name}**"]
                if pred.answer is not None:
                    lines.append(f"answer: {pred.answer}" + (f" → **{pred.label}**" if pred.label else ""))
                if pred.probs.shape[0]:
                    lines.append(f"threshold {run.threshold:.3f} ({run.threshold_source})")
                    image = pictures(pred, 0, run.threshold)[0]
                else:
                    image = display_image(pred)
                lines.append(_metrics_text(bench.per_image_metrics(name, path)))
                return image, "\n\n".join(lines)

            def compare(a, b, path, text, box_text, progress=gr.Progress()):
                try:
                    box = _parse_box(box_text)
                    progress(0.1, desc=f"{a}")
                    img_a, md_a = one_side(a, path, text, box)
                    progress(0.5, desc=f"{b}")
                    img_b, md_b = one_side(b, path, text, box)
                    return "", img_a, md_a, img_b, md_b
                except Exception as err:  # noqa: BLE001
                    return _failure(err), None, "", None, ""

            cmp_go.click(compare, [cmp_a, cmp_b, cmp_file, cmp_text, cmp_box],
                         [cmp_status, cmp_img_a, cmp_md_a, cmp_img_b, cmp_md_b], concurrency_id=INFERENCE)

        with gr.Tab("Runs"):
            runs_pick = gr.Dropdown(all_runs, value=all_runs[0], label="run", elem_id="runs-pick")
            runs_info = gr.Markdown(elem_id="runs-info")
            runs_plot = gr.Plot(label="training curves", elem_id="runs-plot")
            runs_report = gr.Button("Write / open the report", elem_id="runs-report")
            runs_report_file = gr.File(label="report", interactive=False, elem_id="runs-report-file")
            timer = gr.Timer(CURVES_REFRESH_S)

            seen = gr.State(None)  # (run, metrics.jsonl size): redraw only when the log grew or the run changed

            def curves(name, last=None):
                try:
                    log_file = bench.run(name).run_dir / "metrics.jsonl"
                    key = (name, log_file.stat().st_size if log_file.exists() else 0)
                    if key == last:
                        return gr.update(), gr.update(), key
                    return _curves_figure(bench, name), _run_info(bench, name), key
                except Exception as err:  # noqa: BLE001
                    return None, _failure(err), None

            def report(name):
                try:
                    return str(bench.report(name)), gr.update()
                except Exception as err:  # noqa: BLE001
                    return None, _failure(err)

            runs_pick.change(curves, runs_pick, [runs_plot, runs_info, seen])
            demo.load(curves, runs_pick, [runs_plot, runs_info, seen])
            timer.tick(curves, [runs_pick, seen], [runs_plot, runs_info, seen], show_progress="hidden")
            runs_report.click(report, runs_pick, [runs_report_file, runs_info])
    return demo


def _run_info(bench: Workbench, name: str) -> str:
    run = bench.run(name)
    report = run.run_dir / "report.html"
    state = "finished" if (run.run_dir / "checkpoints" / "best").exists() else "in progress (or not started)"
    text = f"**{name}** · task {run.task.name} · {state} · `{run.run_dir}`"
    if report.is_file():
        text += f" · [report](/gradio_api/file={report})"
    return text


def _curves_figure(bench: Workbench, name: str):
    from matplotlib.figure import Figure

    panels = bench.curves(name)
    fig = Figure(figsize=(10, 2.6 * max(1, (len(panels) + 1) // 2)), layout="constrained")
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no metrics.jsonl records yet", ha="center", va="center")
        ax.set_axis_off()
        return fig
    rows = (len(panels) + 1) // 2
    for i, (title, series) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, 2, i + 1)
        for key, (steps, values) in series.items():
            ax.plot(steps, values, label=key, marker="." if len(steps) < 20 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(series) > 1:
            ax.legend(fontsize="small")
    return fig
