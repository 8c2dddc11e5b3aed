"""`medtune` command line. Only parses arguments and calls the library; errors a user can fix (medtune.errors.UserError)
print one line, any other exception its traceback."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from medtune.errors import UserError, one_line
from medtune.threads import prepare_openmp


def _train(args) -> None:
    from medtune.config import load_config
    from medtune.train.setup import RESUME_AUTO

    if args.resume == RESUME_AUTO:
        if not args.config:
            raise UserError("--resume auto needs the CONFIG (and overrides) of the run: medtune train CONFIG --resume "
                            "auto; it starts output_dir/run.name or continues it")
        cfg = load_config(args.config, args.overrides)
    elif args.resume:
        if args.config or args.overrides:
            raise UserError("--resume continues a run with its own config.yaml; drop the CONFIG/overrides (start a "
                            "new run to change settings), or use `medtune train CONFIG --resume auto`")
        run_dir = Path(args.resume)
        from medtune.runs.files import load_run_config

        if not (run_dir / "config.yaml").is_file() and run_dir.is_dir():
            raise UserError(f"{run_dir} has no config.yaml (killed before it wrote one?): start it again with "
                            "`medtune train CONFIG --resume auto`, which starts or continues output_dir/run.name")
        cfg = load_run_config(run_dir)
    else:
        if not args.config:
            raise SystemExit("medtune train: give a CONFIG file (or --resume RUN)")
        cfg = load_config(args.config, args.overrides)
    from medtune.train import train

    run_dir = train(cfg, resume=args.resume)
    print(f"run folder: {run_dir}")


def _eval(args) -> None:
    from medtune.evaluate import evaluate_run, format_summary

    if args.data is not None and args.split is not None:
        raise UserError("--split names a split of the run's own data and --data another data file (all of it is "
                        "evaluated): give one of them")
    if args.image_root is not None and args.data is None:
        raise UserError("--image-root goes with --data (the folder the file's image paths are relative to)")
    summary = evaluate_run(args.run, split=args.split or "test", checkpoint=args.checkpoint,
                           strategy=args.calibration, data_file=args.data, image_root=args.image_root)
    print(format_summary(summary))
    print(f"written: {Path(args.run) / 'eval' / summary['split']}")


def _predict(args) -> None:
    from medtune.predict import predict_images

    box = None
    if args.box:
        try:
            box = tuple(float(v) for v in args.box.split(","))
        except ValueError:
            box = ()
        if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
            raise UserError(f"--box {args.box!r}: give x1,y1,x2,y2 in pixels with x1 < x2 and y1 < y2")
    for line in predict_images(args.run, args.images, args.out, checkpoint=args.checkpoint, threshold=args.threshold,
                               box=box, prompt=args.prompt, question=args.question, frame=args.frame):
        print(line)


def _app(args) -> None:
    from medtune.app import serve
    from medtune.app.service import DEFAULT_MAX_UPLOAD_MB

    serve(args.runs, host=args.host, port=args.port, checkpoint=args.checkpoint,
          max_upload_mb=args.max_upload_mb or DEFAULT_MAX_UPLOAD_MB)


def _demo(args) -> None:
    from medtune.demo import run_demo, run_segvlm_demo, run_video_demo

    if args.which == "segvlm":
        run_segvlm_demo(Path(args.out if args.out != "runs/demo" else "runs/demo-segvlm"), fast=args.fast)
    elif args.which == "video":
        run_video_demo(Path(args.out if args.out != "runs/demo" else "runs/demo-video"), fast=args.fast)
    else:
        run_demo(Path(args.out), fast=args.fast)


INSPECT_PROBLEMS_EXIT = 1  # `data inspect` listed problems (2 stays "could not run": a usage or user error)


def _inspect(args) -> int:
    from medtune.config import build_config
    from medtune.data.inspect import format_inspection, inspect_dataset
    from medtune.data.video import is_video_data
    from medtune.data.video_inspect import format_video_inspection, inspect_videos

    overrides = [f"data.path={args.path}", f"data.layout={args.layout}", *args.overrides]
    cfg = build_config({}, overrides)
    split = None
    if args.split:
        try:
            split = json.loads(Path(args.split).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"--split {args.split}: cannot read it as a split.json ({err})") from None
    if is_video_data(cfg.data):
        report = inspect_videos(cfg.data, split=split)
        print(format_video_inspection(report))
    else:
        report = inspect_dataset(cfg.data, split=split)
        print(format_inspection(report))
    return INSPECT_PROBLEMS_EXIT if report["problems"] else 0


def _to_vqa(args) -> None:
    from medtune.data.to_vqa import format_conversion, to_vqa

    result = to_vqa(args.folder, args.out, seed=args.seed, drop_conflicting=args.drop_conflicting,
                    duplicate_hash_distance=args.duplicate_hash_distance)
    print(format_conversion(result, args.folder))


def _export(args) -> None:
    from medtune.models.lora import export_merged
    from medtune.runs.load import load_run_model

    _, model, ckpt = load_run_model(args.run, args.checkpoint, "cpu", overrides=args.overrides)
    export_merged(model, Path(args.out))
    print(f"merged model from {ckpt} written to {args.out} (usable as model.path)")


def _report(args) -> None:
    from medtune.reporting import write_report

    print(f"report: {write_report(Path(args.run), split=args.split)}")


def _compare(args) -> None:
    from medtune.reporting import compare_runs

    at = {"calibrated": "cal", "0.5": "t050"}[args.threshold]
    print(compare_runs([Path(r) for r in args.runs], out_dir=Path(args.out) if args.out else None, split=args.split,
                       at=at, allow_eval_mismatch=args.allow_eval_mismatch))


def _cv(args) -> None:
    from medtune.config import load_config
    from medtune.report.cv import run_cv

    print(run_cv(load_config(args.config, args.overrides), folds=args.folds))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medtune", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a run (objective supervised or rl, from the config)")
    p.add_argument("config", nargs="?", help="YAML config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.r=32 optim.lr=5e-4")
    p.add_argument("--resume", metavar="RUN|auto",
                   help="continue RUN from its newest complete checkpoint (from step 0 when it has none); `auto`, "
                        "with CONFIG: start output_dir/run.name, or continue it when it exists (for scheduler "
                        "requeues: re-run the same command). A folder named auto: ./auto")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="calibrate on val, evaluate a split (or another data file: --data)")
    p.add_argument("run")
    p.add_argument("--split", default=None, help="a split of the run's data (default test)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="evaluate the run on every sample of another data file (or folder) in the run's layout, "
                        "e.g. an external test set; results in RUN/eval/data-<its name>, the run's own evaluations "
                        "stay (mask runs: threshold still calibrated on the run's val); compare runs on it with "
                        "--split data-<its name>")
    p.add_argument("--image-root", default=None, metavar="DIR",
                   help="with --data (llava_json): the folder its image paths are relative to (default: its folder)")
    p.add_argument("--checkpoint", default="best")
    p.add_argument("--calibration", choices=["max_dice", "max_fbeta", "target_recall"], default=None)
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="masks, probability maps and overlays for images (VLM runs: answers to "
                                       "--question; video runs: a video file or a folder of frames each)")
    p.add_argument("run")
    p.add_argument("images", nargs="+", metavar="INPUT", help="image files; for a video run (family sam2_video) "
                                                              "video files (mp4, avi ...) or folders of frames")
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default="best")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--box", default=None, help="x1,y1,x2,y2 for box-prompted runs")
    p.add_argument("--prompt", default=None, action="append",
                   help="segmenting VLM runs: the question asked (default: the run's task.prompt); the answer and one "
                        "mask per [SEG] are written. Repeat it to ask several questions about one image, one turn each. "
                        "Mask-prompted video runs: a mask PNG of frame --frame")
    p.add_argument("--frame", type=int, default=None, metavar="N",
                   help="video runs: the frame the --prompt mask or the --box is drawn on (default 0)")
    p.add_argument("--question", default=None, help="instruction-tuned VLM runs: the question asked about each "
                                                    "image; answers are printed and saved")
    p.set_defaults(func=_predict)

    p = sub.add_parser("app", help="local web app: segment, ask, compare and watch runs in the browser (needs "
                                   "pip install 'medtune[app]')")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders; the app reads only these and the uploads")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--checkpoint", default="best")
    p.add_argument("--max-upload-mb", type=float, default=None, help="larger uploads are refused in the page "
                                                                     "(default 50)")
    p.set_defaults(func=_app)

    p = sub.add_parser("demo", help="the embedded default: adapt a vessel model to a new site with LoRA; "
                                    "`demo segvlm`: a tiny segmenting VLM learns vessels from a text prompt; "
                                    "`demo video`: a tiny SAM 2 video model on synthetic angiography runs, trained "
                                    "through its memory vs image-only")
    p.add_argument("which", nargs="?", choices=["unet", "segvlm", "video"], default="unet")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--fast", action="store_true", help="fewer steps (a quick smoke run)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("inspect", help="layout, counts, sizes, foreground, near-duplicates, every problem; "
                                            f"exits {INSPECT_PROBLEMS_EXIT} when it lists problems")
    q.add_argument("path")
    q.add_argument("--layout", default="auto")
    q.add_argument("--split", default=None, help="a split.json to check for duplicates straddling splits")
    q.add_argument("overrides", nargs="*", help="data.* overrides, e.g. data.mask_suffixes=[_seg]")
    q.set_defaults(func=_inspect)
    q = data_sub.add_parser("to-vqa", help="classification folder (one sub-folder per class) -> image + conversation "
                                           "JSON (llava_json layout), near-duplicates grouped")
    q.add_argument("folder")
    q.add_argument("--out", required=True, help="JSON file to write")
    q.add_argument("--seed", type=int, default=0, help="picks each image's question template")
    q.add_argument("--duplicate-hash-distance", type=int, default=4)
    q.add_argument("--drop-conflicting", action="store_true",
                   help="leave out near-duplicate groups whose images are filed under different classes")
    q.set_defaults(func=_to_vqa)

    p = sub.add_parser("export", help="merge the adapter into the base and save a loadable model folder")
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default="best")
    p.add_argument("overrides", nargs="*", help="e.g. model.quantize_4bit=false to merge a QLoRA adapter into a "
                                                "full-precision base")
    p.set_defaults(func=_export)

    p = sub.add_parser("report", help="self-contained HTML report of a run")
    p.add_argument("run")
    p.add_argument("--split", default="test")
    p.set_defaults(func=_report)

    p = sub.add_parser("compare", help="side-by-side comparison of runs with paired tests")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--threshold", choices=["calibrated", "0.5"], default="calibrated",
                   help="compare at each run's calibrated threshold, or all at 0.5")
    p.add_argument("--allow-eval-mismatch", action="store_true",
                   help="compare runs evaluated with different eval settings (TTA, tiling, calibration) anyway")
    p.set_defaults(func=_compare)

    p = sub.add_parser("cv", help="k-fold (group-aware) cross-validation")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--folds", type=int, default=5)
    p.set_defaults(func=_cv)
    return parser


def main(argv: list[str] | None = None) -> int:
    prepare_openmp()  # before anything imports torch: OpenMP reads its wait policy once, when torch loads it
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)  # None (done) or the command's own exit status
    except UserError as err:  # anything else is a bug: its traceback is what a bug report needs
        if args.debug or os.environ.get("MEDTUNE_DEBUG"):
            raise
        print(f"medtune {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
