"""`medtune app RUN [RUN ...]`: a local web app (Gradio) to segment, ask, compare and watch runs in the browser.

Gradio is an optional extra (``pip install 'medtune[app]'``) imported only here, when the app starts. It belongs in an
environment of its own (``make app-venv``): Gradio pins pillow<13, medtune's preprocessing parity needs Pillow 13."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from medtune.app.service import DEFAULT_MAX_UPLOAD_MB, Workbench
from medtune.errors import UserError

log = logging.getLogger("medtune")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORT = 7860


def build_app(run_dirs: list[str | Path], checkpoint: str = "best", device=None,
              max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB):
    """(Workbench, Gradio Blocks) for the runs; nothing is served yet."""
    bench = Workbench(run_dirs, checkpoint=checkpoint, device=device, max_upload_mb=max_upload_mb)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app phones nobody
    try:
        from medtune.app.ui import build_ui
    except ImportError as err:
        raise UserError(f"medtune app needs Gradio ({err}): `make app-venv`, or pip install 'medtune[app]' in a "
                        "separate venv (Gradio pins pillow<13)") from None
    return bench, build_ui(bench)


def launch(demo, bench: Workbench, host: str = "127.0.0.1", port: int = DEFAULT_PORT, block: bool = True):
    """Serve on host:port. Only the runs' report pages are served from the run folders; uploads are capped at the
    workbench's limit by Gradio itself (the page says so) and checked again before decoding."""
    if host not in LOCAL_HOSTS:
        print(f"WARNING: medtune app listens on {host}:{port}: anyone who can reach this machine can upload images "
              "and run the models. There is no login; use 127.0.0.1 (the default) unless you mean it.")
    reports = [str(r.run_dir / "report.html") for r in bench.runs.values()]
    demo.queue(default_concurrency_limit=1)  # with ui.INFERENCE: one inference at a time
    return demo.launch(server_name=host, server_port=port, max_file_size=bench.max_upload_bytes,
                       allowed_paths=reports, prevent_thread_lock=not block, inbrowser=False, share=False,
                       show_error=False, quiet=not block)


def serve(run_dirs: list[str | Path], host: str = "127.0.0.1", port: int = DEFAULT_PORT, checkpoint: str = "best",
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB) -> None:
    bench, demo = build_app(run_dirs, checkpoint=checkpoint, max_upload_mb=max_upload_mb)
    print(f"medtune app: {len(bench.runs)} run(s) ({', '.join(bench.runs)}) on http://{host}:{port}")
    launch(demo, bench, host, port, block=True)
