"""`medtune app` without a browser: what its pages compute (service.py) equals what `medtune predict` writes, uploads
are checked, per-image metrics and curves come from the run folder; DICOM reads through pydicom."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_cfg
from PIL import Image

from medtune.app.service import BYTES_PER_MB, Workbench, pictures
from medtune.errors import DataError, UserError


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    from medtune.evaluate import evaluate_run
    from medtune.train import train

    root = tmp_path_factory.mktemp("app")
    run = train(tiny_cfg(root, steps=2, name="unet"))
    evaluate_run(run)
    test_ids = json.loads((run / "split.json").read_text())["test"]
    image = next((root / "data").rglob(f"{test_ids[0]}.png"))  # ids are paths relative to the data set
    return run, image


def test_the_app_predicts_what_predict_writes(unet_run, tmp_path):
    from medtune.predict import predict_images

    run, image = unet_run
    bench = Workbench([run])
    name = bench.names()[0]
    pred = bench.predict(name, image)
    assert pred.probs.shape == (1, *pred.image.shape[-2:]) and pred.answer is None
    predict_images(run, [image], tmp_path / "pred")
    written = np.asarray(Image.open(tmp_path / "pred" / f"{image.stem}_prob.png"))
    np.testing.assert_array_equal((pred.probs[0] * 255).round().astype(np.uint8), written)
    assert bench.loaded(bench.run(name)) is bench.loaded(bench.run(name))  # one load per run

    # the threshold slider: everything in the FOV at 0, nothing above the maximum probability
    thr = bench.run(name).threshold
    assert thr == json.loads((run / "eval" / "test" / "calibration.json").read_text())["threshold"]
    _, _, everything = pictures(pred, 0, 0.0)
    _, _, nothing = pictures(pred, 0, float(pred.probs.max()) + 1e-6)
    assert everything.max() == 255 and nothing.max() == 0
    _, _, at_cal = pictures(pred, 0, thr)
    assert np.array_equal(at_cal > 0, pred.probs[0] >= thr)


def test_per_image_metrics_and_curves_come_from_the_run_folder(unet_run):
    run, image = unet_run
    bench = Workbench([run])
    name = bench.names()[0]
    rows = bench.per_image_metrics(name, image)
    assert [r["id"] for r in rows] == [f"images/{image.stem}"] and rows[0]["split"] == "test"
    assert 0 <= rows[0]["dice@cal"] <= 1
    assert bench.per_image_metrics(name, image.with_name("elsewhere.png")) == []
    report = bench.report(name)  # written on request from the evaluation, then served as it is
    assert report == run.resolve() / "report.html" and "<html" in report.read_text()[:200]
    panels = bench.curves(name)
    assert panels["loss"]["loss"][0] == [1, 2]  # two training steps logged
    assert any(k.startswith("val_") for k in panels["validation"])


def test_bad_uploads_are_one_line(unet_run, tmp_path):
    run, image = unet_run
    bench = Workbench([run], max_upload_mb=1)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(DataError, match="not an image this app reads"):
        bench.check_upload(text)
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="fake.png: cannot be read as an image"):
        bench.check_upload(fake)
    big = tmp_path / "big.png"
    with big.open("wb") as f:
        f.truncate(2 * BYTES_PER_MB)  # sparse: no disk written
    with pytest.raises(DataError, match="big.png is 2 MB, more than the 1 MB"):
        bench.check_upload(big)
    with pytest.raises(DataError, match="upload an image first"):
        bench.predict(bench.names()[0], None)
    with pytest.raises(UserError, match="not a run folder"):
        Workbench([tmp_path])


def test_dicom_reads_like_the_same_pixels_in_png(tmp_path):
    pydicom = pytest.importorskip("pydicom", reason="DICOM needs pydicom (pip install 'medtune[test]')")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    from medtune.data.io import read_image

    pixels = (np.arange(12 * 10).reshape(12, 10) * 30).astype(np.uint16)  # 12-bit detector values up to 3570
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 12, 10, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "slice.dcm", enforce_file_format=True)
    image = read_image(tmp_path / "slice.dcm", channels=1)
    np.testing.assert_allclose(image[0], pixels / 4095.0, atol=1e-6)  # the 12-bit tier, as for a 16-bit PNG

    ds.PhotometricInterpretation = "MONOCHROME1"  # 0 is white: inverted
    ds.save_as(tmp_path / "inverted.dcm", enforce_file_format=True)
    inverted = read_image(tmp_path / "inverted.dcm", channels=1)
    np.testing.assert_allclose(inverted[0], (pixels.max() - pixels) / 4095.0, atol=1e-6)


def test_the_command_binds_this_machine_unless_told_and_serves_only_reports(unet_run, capsys):
    from medtune.app import launch
    from medtune.cli import main

    assert main(["app", str(unet_run[0].parent / "no-such-run")]) == 2
    assert "not a run folder (no config.yaml)" in capsys.readouterr().err

    class Demo:  # records what Gradio would be asked
        def queue(self, **kwargs):
            self.queued = kwargs

        def launch(self, **kwargs):
            self.kwargs = kwargs

    bench = Workbench([unet_run[0]], max_upload_mb=3)
    for host, warned in (("127.0.0.1", False), ("0.0.0.0", True)):
        demo = Demo()
        launch(demo, bench, host=host, port=1234, block=False)
        assert ("WARNING" in capsys.readouterr().out) == warned
        assert demo.kwargs["server_name"] == host and demo.kwargs["max_file_size"] == 3 * BYTES_PER_MB
        assert demo.kwargs["allowed_paths"] == [str(unet_run[0].resolve() / "report.html")]
        assert demo.kwargs["share"] is False


def test_a_segmenting_vlm_asks_each_prompt_line_as_a_turn_like_predict(tmp_path):
    """The Segment page's prompt, one request per line, is `medtune predict --prompt A --prompt B`: the same turns,
    answers and per-[SEG] probability maps; a blank prompt is refused in one line."""
    from test_segvlm import _scripted_generation, segvlm_cfg

    from medtune.data.layouts import discover
    from medtune.predict import predict_images
    from medtune.train import train

    cfg = segvlm_cfg(tmp_path, "sv", steps=2)
    run = train(cfg)
    image = Path(discover(cfg.data)[0].image)
    bench = Workbench([run])
    name = bench.names()[0]
    assert "blood vessel" in bench.run(name).default_prompt  # task.prompt with the run's class name, as predict asks
    two = ["Please segment the blood vessel in this image.", "Please segment the optic disc in this image."]
    # an untrained tiny model may answer without [SEG]: every turn answers with one, so each turn has a map
    with _scripted_generation(bench.loaded(bench.run(name)).model, "It is [SEG]."):
        pred = bench.predict(name, image, prompt="\n".join(two) + "\n\n")  # blank lines are no requests
        predict_images(run, [image], tmp_path / "pred", prompt=two)
    info = json.loads((tmp_path / "pred" / "predict.json").read_text())
    assert [q for q, _, _ in pred.turns] == two and [n for _, _, n in pred.turns] == [1, 1]
    assert pred.answer == info["answers"][str(image)]
    assert [a for _, a, _ in pred.turns] == [t["answer"] for t in info["turns"][str(image)]]
    assert pred.probs.shape == (2, *pred.image.shape[-2:])
    for k in range(2):
        written = np.asarray(Image.open(tmp_path / "pred" / f"{image.stem}_seg{k}_prob.png"))
        np.testing.assert_array_equal((pred.probs[k] * 255).round().astype(np.uint8), written)
    with pytest.raises(DataError, match="the prompt is empty"):
        bench.predict(name, image, prompt=" \n ")
