"""Bad input gets one clear line naming the file and the fix, never a deep traceback."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tiny_cfg, write_generic
from PIL import Image

from medtune.cli import main


def run_cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def generic_cfg(tmp_path, data_dir, *overrides):
    cfg = tiny_cfg(tmp_path, "data.layout=generic", f"data.path={data_dir}", "data.split.val_fraction=0.2",
                   "data.split.test_fraction=0.2", *overrides, steps=2)
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml())
    return path


def expect_error(capsys, tmp_path, data_dir, *needles, overrides=()):
    code, out, err = run_cli(capsys, "train", str(generic_cfg(tmp_path, data_dir, *overrides)))
    assert code == 2, out + err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_missing_mask(tmp_path, capsys):
    data = write_generic(tmp_path / "d", n=5)
    (data / "masks" / "img3.png").unlink()
    expect_error(capsys, tmp_path, data, "img3", "mask")


def test_size_mismatch(tmp_path, capsys):
    data = write_generic(tmp_path / "d", n=5)
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(data / "masks" / "img2.png")
    expect_error(capsys, tmp_path, data, "img2", "20")


def test_truncated_image(tmp_path, capsys):
    data = write_generic(tmp_path / "d", n=5)
    raw = (data / "images" / "img1.png").read_bytes()
    (data / "images" / "img1.png").write_bytes(raw[: len(raw) // 2])
    expect_error(capsys, tmp_path, data, "img1.png")


def test_empty_dataset(tmp_path, capsys):
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "masks").mkdir(parents=True)
    expect_error(capsys, tmp_path, tmp_path / "d", str(tmp_path / "d"))


def test_non_binary_mask_is_binarised_with_a_warning(tmp_path, capsys):
    data = write_generic(tmp_path / "d", n=5)
    mask = np.array(Image.open(data / "masks" / "img0.png"))
    mask[mask > 0] = 200
    mask[:2, :2] = 90
    Image.fromarray(mask).save(data / "masks" / "img0.png")
    with pytest.warns(Warning, match="img0"):
        code, out, err = run_cli(capsys, "train", str(generic_cfg(tmp_path, data)))
    assert code == 0, err


def test_unknown_config_key(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    code, _, err = run_cli(capsys, "train", str(path))
    assert code == 2 and "optim.learning_rate" in err and "optim.lr" in err and "Traceback" not in err


def test_missing_model_path(tmp_path, capsys):
    data = write_generic(tmp_path / "d", n=5)
    expect_error(capsys, tmp_path, data, str(tmp_path / "nowhere"), overrides=(f"model.path={tmp_path / 'nowhere'}",))


def test_remote_code_model_needs_the_flag(tmp_path, capsys):
    from transformers import SamModel

    from medtune.models.sam import tiny_sam_config

    model_dir = tmp_path / "remote"
    SamModel(tiny_sam_config()).save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomSam"}
    (model_dir / "config.json").write_text(json.dumps(config))
    data = write_generic(tmp_path / "d", n=5)
    expect_error(capsys, tmp_path, data, "trust_remote_code",
                 overrides=("model.family=sam", f"model.path={model_dir}"))


def test_eval_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", str(tmp_path))
    assert code == 2 and "not a medtune run folder" in err


def test_eval_of_a_mask_run_on_another_data_folder(tmp_path, capsys):
    """`medtune eval RUN --data FOLDER` on a mask run: the threshold from the run's val, every image of FOLDER
    measured, in RUN/eval/data-<name>; the run's own test evaluation untouched."""
    data = write_generic(tmp_path / "d", n=5)
    code, out, err = run_cli(capsys, "train", str(generic_cfg(tmp_path, data)))
    assert code == 0, err
    run = tmp_path / "runs" / "t"
    code, _, err = run_cli(capsys, "eval", str(run))
    assert code == 0, err
    own = (run / "eval" / "test" / "summary.json").read_text()
    other = write_generic(tmp_path / "site-b", n=3, seed=1)
    code, out, err = run_cli(capsys, "eval", str(run), "--data", str(other))
    assert code == 0, err
    summary = json.loads((run / "eval" / "data-site-b" / "summary.json").read_text())
    assert summary["n_images"] == 3 and summary["data"] == str(other) and summary["split"] == "data-site-b"
    assert summary["threshold"] == json.loads(own)["threshold"]  # calibrated on the run's val, as its own eval
    assert f"data: {other}" in out
    assert (run / "eval" / "test" / "summary.json").read_text() == own


def test_resume_refuses_extra_settings(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path), "optim.max_steps=5")
    assert code == 2 and "own config.yaml" in err


def test_predict_rejects_a_malformed_box(tmp_path, capsys):
    code, _, err = run_cli(capsys, "predict", str(tmp_path), "x.png", "--out", str(tmp_path), "--box", "1,2,3")
    assert code == 2 and "x1,y1,x2,y2" in err


def test_flag_errors_are_one_line(tmp_path, capsys):
    data = write_generic(tmp_path / "d", n=5)
    code, _, err = run_cli(capsys, "data", "inspect", str(data), "--split", str(tmp_path / "missing.json"))
    assert code == 2 and "--split" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "cv", str(generic_cfg(tmp_path, data)), "--folds", "1")
    assert code == 2 and "at least 2 folds" in err


def test_resume_auto_needs_the_config(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--resume", "auto")
    assert code == 2 and "CONFIG" in err and "--resume auto" in err


def test_inspect_exit_status_says_whether_it_found_problems(tmp_path, capsys):
    from medtune.cli import INSPECT_PROBLEMS_EXIT

    data = write_generic(tmp_path / "d", n=5)
    code, out, _ = run_cli(capsys, "data", "inspect", str(data))
    assert code == 0 and "problems: none" in out
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(data / "masks" / "img2.png")
    code, out, _ = run_cli(capsys, "data", "inspect", str(data))
    assert INSPECT_PROBLEMS_EXIT != 0 and code == INSPECT_PROBLEMS_EXIT, out
    assert "problems: 1" in out and "img2" in out


def test_one_bad_file_is_counted_once(tmp_path, capsys):
    data = write_generic(tmp_path / "d", n=5)
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(data / "masks" / "img2.png")
    err = expect_error(capsys, tmp_path, data, "img2")
    assert "in 1 of " in err, err
