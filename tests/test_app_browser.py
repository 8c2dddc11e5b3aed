"""`medtune app` in a real headless Chromium (Debian's, driven by Playwright): segment with a tiny U-Net run and a
tiny segmenting VLM, move the threshold, ask a tiny VLM, compare two runs, watch the curves; bad input is a message in
the page and the app keeps serving.

The app is served from its own environment, .venv-app (`make app-venv`; Gradio pins pillow<13, while this test
environment keeps the Pillow 13 the preprocessing parity tests need): `.venv-app/bin/python -m medtune.cli app` runs
as a subprocess on a free 127.0.0.1 port, and this environment drives it with Playwright. What the page shows is
checked against `medtune predict` run in the same .venv-app (same Pillow, so the same preprocessing). Without
.venv-app, Chromium or Playwright the tests skip and say why.
"""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from helpers import NO_BROWSER, REPO, find_chromium, tiny_cfg
from PIL import Image
from test_segvlm import segvlm_cfg
from vlm_helpers import instruct_cfg, write_vqa

pytestmark = [pytest.mark.slow, pytest.mark.ci]

# Seconds a page action may wait for the app (model loading and a forward on CPU take about a second here).
WAIT_MS = 60_000
# A file box's clear button can vanish as the box resets itself: how long a click on it may wait.
CLEAR_WAIT_MS = 2_000
BIG_UPLOAD_MB = 200  # the oversized upload; a sparse file, so nothing is written to disk
BOX_CLICK_PX = 10  # the box's corners: this far up-left and down-right of the shown image's centre
QUESTION = "Is the lesion benign or malignant?"
# The environment the app is served from (Gradio and its pillow<13 live there, not in the test environment).
APP_PYTHON = REPO / ".venv-app" / "bin" / "python"
NO_APP_VENV = (f"no {APP_PYTHON}: the app is served from its own environment (Gradio pins pillow<13; this test "
               "environment keeps Pillow 13 for the preprocessing parity tests); create it with `make app-venv`")
# How long the served app may take to answer its first request (importing Gradio and torch on a busy CPU).
STARTUP_S = 180
POLL_S = 0.5
STOP_S = 10  # after SIGTERM, how long the server may take to exit before it is killed
LOG_TAIL_CHARS = 3000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _app_env() -> dict[str, str]:
    """The test's environment for a .venv-app subprocess, with this checkout's sources first (as PYTHONPATH=src does
    for the tests) and torch on one thread."""
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def _in_app_venv(*args: str) -> subprocess.CompletedProcess:
    """`medtune ARGS` run by .venv-app's interpreter (what the served app computes with)."""
    done = subprocess.run([str(APP_PYTHON), "-m", "medtune.cli", *args], env=_app_env(), capture_output=True,
                          text=True, timeout=STARTUP_S)
    assert done.returncode == 0, f"medtune {' '.join(args)} in .venv-app failed:\n{done.stderr[-LOG_TAIL_CHARS:]}"
    return done


def _wait_until_served(proc: subprocess.Popen, url: str, log) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`medtune app` exited with {proc.returncode} before serving:\n"
                        f"{log.read_text()[-LOG_TAIL_CHARS:]}")
        try:
            with urllib.request.urlopen(url, timeout=POLL_S * 4) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(POLL_S)
    pytest.fail(f"`medtune app` did not answer {url} within {STARTUP_S} s:\n{log.read_text()[-LOG_TAIL_CHARS:]}")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    if not APP_PYTHON.exists():
        pytest.skip(NO_APP_VENV)
    from medtune.app.service import Workbench
    from medtune.evaluate import evaluate_run
    from medtune.models.sam import tiny_sam_config_dict
    from medtune.train import train

    root = tmp_path_factory.mktemp("app-browser")
    unet = train(tiny_cfg(root, steps=2, name="unet"))
    evaluate_run(unet)  # a calibrated threshold and per-image metrics for Compare
    segvlm = train(segvlm_cfg(root, "segvlm", steps=2))
    sam = json.dumps(tiny_sam_config_dict())
    train(tiny_cfg(root, "model.family=sam", f"model.config={sam}", "model.finetune=lora", "model.prompt=box",
                   "data.sampling=whole_image", steps=1, name="sam-box"))  # a box-prompted run
    vlm = train(instruct_cfg(root, data=write_vqa(root / "vqa", n=8), steps=2, name="vlm"))
    test_id = json.loads((unet / "split.json").read_text())["test"][0]
    image = next((root / "data").rglob(f"{test_id}.png"))
    run_dirs = [unet, segvlm, vlm, root / "runs" / "sam-box"]

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log = root / "app.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(APP_PYTHON), "-m", "medtune.cli", "app", *map(str, run_dirs), "--port",
                                 str(port)], env=_app_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_until_served(proc, url, log)
        # the runs as the app sees them (names, thresholds: read from the run folders, no model loaded here)
        yield {"url": url, "image": image, "root": root, "bench": Workbench(run_dirs), "unet": unet,
               "segvlm": segvlm, "vlm": vlm, "answer_image": root / "vqa" / "images" / "case0.png", "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_served_app_answers_and_serves_only_reports(app):
    config = json.loads(_fetch(f"{app['url']}config"))  # the page's layout, as Gradio serves it to the browser
    assert config["title"] == "medtune"
    assert {"seg-go", "ask-go", "cmp-go", "runs-plot"} <= {c.get("props", {}).get("elem_id") for c in config["components"]}
    # files of the run folder other than its report are not served, nor anything else on the machine
    for path in (app["unet"] / "config.yaml", app["image"]):
        with pytest.raises(urllib.error.HTTPError, match="403"):
            _fetch(f"{app['url']}gradio_api/file={path}")


@pytest.fixture(scope="module")
def page(app):
    exe = find_chromium()
    if exe is None:
        pytest.skip(NO_BROWSER)
    pytest.importorskip("playwright", reason="the browser test drives Chromium with Playwright: pip install "
                                             "'medtune[test]'")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1300, "height": 1100})
        page.set_default_timeout(WAIT_MS)
        page.goto(app["url"])
        page.wait_for_selector("#seg-file input[type=file]", state="attached")
        yield page
        browser.close()


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def _downloads(page) -> dict[str, bytes]:
    links = page.eval_on_selector_all("#seg-downloads a", "els => els.map(e => e.href)")
    return {link.rsplit("/", 1)[-1]: _fetch(link) for link in links}


def _upload(page, elem_id: str, path) -> None:
    """Put a file into a Gradio file box, clearing the one it holds (a filled box hides its file input)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    clear = page.locator(f"#{elem_id} button[aria-label='Clear']")
    if clear.count() and clear.first.is_visible():
        try:  # after a refused upload the box resets itself and the button may vanish before the click
            clear.first.click(timeout=CLEAR_WAIT_MS)
        except PlaywrightTimeout:
            pass
    page.set_input_files(f"#{elem_id} input[type=file]", str(path))


def _pick(page, elem_id: str, value: str) -> None:
    """Choose a value of a Gradio dropdown (type to filter, Enter takes the first match)."""
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(value)
    box.press("Enter")


def _wait_status(page, elem_id: str, text: str) -> str:
    page.wait_for_function("([id, t]) => document.querySelector('#' + id)?.innerText.includes(t)", arg=[elem_id, text])
    return page.inner_text(f"#{elem_id}")


def _wait_new_downloads(page, before: set[str]) -> dict[str, bytes]:
    page.wait_for_function("old => { const h = [...document.querySelectorAll('#seg-downloads a')].map(e => e.href);"
                           " return h.length > 0 && h.some(x => !old.includes(x)); }", arg=sorted(before))
    return _downloads(page)


def _mask_and_prob(files: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray]:
    mask = next(np.asarray(Image.open(io.BytesIO(v))) for k, v in files.items() if k.endswith("_mask.png"))
    prob = next(np.load(io.BytesIO(v)) for k, v in files.items() if k.endswith("_prob.npy"))
    return mask, prob


def test_segment_threshold_ask_compare_and_runs_in_chromium(app, page, tmp_path):
    # Segment, U-Net: the overlay and downloads appear; the mask is the probabilities at the slider's threshold
    _upload(page, "seg-file", app["image"])
    page.wait_for_selector("#seg-preview img")
    page.click("#seg-go")
    _wait_status(page, "seg-status", "1 mask(s)")
    page.wait_for_selector("#seg-overlay img")
    mask, prob = _mask_and_prob(_downloads(page))
    threshold = float(page.input_value("#seg-thr input[type=number]"))
    assert threshold == pytest.approx(app["bench"].run("unet").threshold)  # starts at the calibrated threshold
    assert prob.shape == mask.shape == app_image_shape(app)
    np.testing.assert_array_equal(mask > 0, prob >= threshold)

    # move the threshold: a low one marks more pixels, and the page's mask follows the slider
    counts = {}
    for value in (0.01, 0.99):
        before = set(page.eval_on_selector_all("#seg-downloads a", "els => els.map(e => e.href)"))
        page.fill("#seg-thr input[type=range]", str(value))
        mask, prob = _mask_and_prob(_wait_new_downloads(page, before))
        np.testing.assert_array_equal(mask > 0, prob >= value)
        counts[value] = int((mask > 0).sum())
    assert counts[0.01] > 0 and counts[0.01] > counts[0.99]

    # Segment, segmenting VLM: its default prompt is filled in; the page shows the answer the model generates (an
    # untrained tiny model's may be blank) and one mask per [SEG] of it
    _pick(page, "seg-run", "segvlm")
    page.wait_for_function("() => document.querySelector('#seg-prompt textarea')?.value.includes('blood vessel')")
    prompt = page.input_value("#seg-prompt textarea")
    page.click("#seg-go")
    page.wait_for_function("() => /mask\\(s\\)|no mask/.test(document.querySelector('#seg-status').innerText)")
    answer = page.input_value("#seg-answer textarea")
    # what `medtune predict` answers in the app's environment (greedy: deterministic)
    _in_app_venv("predict", str(app["segvlm"]), str(app["image"]), "--out", str(tmp_path / "segvlm"), "--prompt",
                 prompt)
    assert answer == json.loads((tmp_path / "segvlm" / "predict.json").read_text())["answers"][str(app["image"])]
    n_seg = answer.count("[SEG]")
    status = page.inner_text("#seg-status")
    assert (f"{n_seg} mask(s)" in status) if n_seg else ("no mask" in status)

    # Segment, box-prompted SAM: two clicks on the image give the box, which the run is prompted with
    _pick(page, "seg-run", "sam-box")
    page.wait_for_selector("#seg-box textarea")
    frame = page.locator("#seg-preview .image-frame").bounding_box()
    centre_x, centre_y = frame["x"] + frame["width"] / 2, frame["y"] + frame["height"] / 2
    for n_values, step in ((2, -BOX_CLICK_PX), (4, BOX_CLICK_PX)):  # the image sits centred in its frame
        page.mouse.click(centre_x + step, centre_y + step)  # the first corner shows as "x,y", then the box
        page.wait_for_function("n => document.querySelector('#seg-box textarea')?.value.split(',').length == n",
                               arg=n_values)
    x1, y1, x2, y2 = map(float, page.input_value("#seg-box textarea").split(","))
    assert x1 < x2 and y1 < y2
    page.click("#seg-go")
    _wait_status(page, "seg-status", "1 mask(s)")

    # Ask: the tiny VLM answers a question about an uploaded image
    page.click("button[role=tab]:has-text('Ask')")
    _upload(page, "ask-file", app["answer_image"])
    page.fill("#ask-question textarea", QUESTION)
    page.click("#ask-go")
    page.wait_for_function("() => document.querySelector('#ask-label textarea')?.value.trim().length > 0")
    _in_app_venv("predict", str(app["vlm"]), str(app["answer_image"]), "--out", str(tmp_path / "vlm"), "--question",
                 QUESTION)
    expected = json.loads((tmp_path / "vlm" / "answers.json").read_text())["answers"][0]
    assert page.input_value("#ask-answer textarea") == expected["answer"]
    assert page.input_value("#ask-label textarea") == (expected["label"] or "(the run has no label set)")

    # Compare: U-Net and segmenting VLM on the same test image, the U-Net's per-image metrics from its evaluation
    page.click("button[role=tab]:has-text('Compare')")
    _pick(page, "cmp-a", "unet")
    _pick(page, "cmp-b", "segvlm")
    _upload(page, "cmp-file", app["image"])
    page.click("#cmp-go")
    page.wait_for_selector("#cmp-img-a img")
    page.wait_for_selector("#cmp-img-b img")
    side_a = _wait_status(page, "cmp-md-a", "dice@cal")
    assert f"images/{app['image'].stem}" in side_a and "test" in side_a

    # Runs: curves of the run's metrics.jsonl are drawn
    page.click("button[role=tab]:has-text('Runs')")
    page.wait_for_selector("#runs-plot img, #runs-plot svg, #runs-plot canvas")
    assert "task masks" in page.inner_text("#runs-info")

    page.click("button[role=tab]:has-text('Segment')")
    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10  # the page was painted, not blank


def app_image_shape(app) -> tuple[int, int]:
    return np.asarray(Image.open(app["image"])).shape[:2]


def test_bad_input_is_a_message_in_the_page(app, page, tmp_path):
    page.click("button[role=tab]:has-text('Segment')")
    _pick(page, "seg-run", "segvlm")
    page.wait_for_function("() => document.querySelector('#seg-prompt textarea')?.value.length > 0")

    # not an image
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    _upload(page, "seg-file", text)
    assert "not an image this app reads" in _wait_status(page, "seg-status", "notes.txt")

    # an empty prompt for the segmenting VLM
    _upload(page, "seg-file", app["image"])
    page.wait_for_selector("#seg-preview img")
    page.fill("#seg-prompt textarea", "")
    page.click("#seg-go")
    _wait_status(page, "seg-status", "the prompt is empty")

    # 200 MB: refused by the upload limit, with a message
    big = tmp_path / "big.png"
    with big.open("wb") as f:
        f.truncate(BIG_UPLOAD_MB * 1024 * 1024)
    _upload(page, "seg-file", big)
    page.wait_for_function("() => /exceed|too large|maximum/i.test(document.body.innerText)")

    # the app still serves: the U-Net segments again
    _pick(page, "seg-run", "unet")
    _upload(page, "seg-file", app["image"])
    page.wait_for_selector("#seg-preview img")
    page.click("#seg-go")
    _wait_status(page, "seg-status", "1 mask(s)")
