"""Image + conversation data: the llava_json layout, its bad-input lines, and `data to-vqa`."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medtune.config import DataCfg
from medtune.data.layouts import detect_layout, discover
from medtune.data.types import DataError


def _image(path, seed=0, size=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _write(path, entries):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    else:
        path.write_text(json.dumps(entries))
    return path


def _llava(image, question="<image>\nBenign or malignant?", answer="benign", **extra):
    return {"image": image, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
            **extra}


def _problems(path, **cfg):
    with pytest.raises(DataError) as err:
        discover(DataCfg(path=str(path), layout="llava_json", **cfg))
    return str(err.value)


def test_llava_json_both_spellings_multi_turn_and_auto_detection(tmp_path):
    _image(tmp_path / "imgs" / "a.png")
    _image(tmp_path / "imgs" / "b.png", seed=1)
    entries = [
        _llava("imgs/a.png", label="benign"),
        {"images": ["imgs/b.png"], "messages": [
            {"role": "system", "content": "You are a radiologist."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What organ?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Breast."}]},
            {"role": "user", "content": "Benign or malignant?"},
            {"role": "assistant", "content": "malignant"},
        ]},
        _llava("imgs/a.png", question="Describe it. <image>", answer="A round lesion."),  # 2nd question, same image
    ]
    path = _write(tmp_path / "train.json", entries)
    assert detect_layout(path) == "llava_json"
    samples = {s.id: s for s in discover(DataCfg(path=str(path)))}  # layout auto
    assert sorted(samples) == ["imgs/a", "imgs/a#2", "imgs/b"]
    a, b = samples["imgs/a"], samples["imgs/b"]
    assert a.label == "benign" and a.image == (tmp_path / "imgs" / "a.png")
    assert a.conversations == [{"role": "user", "content": "<image>\nBenign or malignant?"},
                                {"role": "assistant", "content": "benign"}]
    assert [t["role"] for t in b.conversations] == ["system", "user", "assistant", "user", "assistant"]
    assert b.conversations[1]["content"] == "<image>What organ?"
    # two questions about one image are one group: they can never straddle train and test
    assert samples["imgs/a"].group == samples["imgs/a#2"].group != b.group

    # a folder holding annotations.json with conversations is llava_json, not polygon_json; JSONL works too
    (tmp_path / "annotations.json").write_text(json.dumps(entries[:1]))
    assert detect_layout(tmp_path) == "llava_json"
    jsonl = _write(tmp_path / "train.jsonl", entries)
    assert [s.id for s in discover(DataCfg(path=str(jsonl)))] == ["imgs/a", "imgs/a#2", "imgs/b"]


def test_llava_json_image_root_and_given_ids(tmp_path):
    _image(tmp_path / "data" / "x" / "c.png")
    path = _write(tmp_path / "meta" / "train.json", [_llava("x/c.png", id="case-7", group="patient-3")])
    with pytest.raises(DataError, match="not found under"):
        discover(DataCfg(path=str(path)))
    [s] = discover(DataCfg(path=str(path), image_root=str(tmp_path / "data")))
    assert (s.id, s.group, s.image) == ("case-7", "patient-3", tmp_path / "data" / "x" / "c.png")
    dup = _write(tmp_path / "data" / "dup.json", [_llava("x/c.png", id="k"), _llava("x/c.png", id="k")])
    assert "id 'k' is used by 2 entries" in _problems(dup)


@pytest.mark.parametrize("entry, expected", [
    (_llava("a.png", question="Benign or malignant?"), "has no '<image>' placeholder"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}]}, "no assistant turn"),
    (_llava("../outside.png"), "escapes the image root"),
    (_llava("/etc/passwd"), "escapes the image root"),
    (_llava("a.png", question="<image><image> two?"), "2 '<image>' placeholder(s) for 1 image"),
    (_llava("a.png", answer="see <image>", question="<image> q"), "inside an assistant turn"),
    ({"image": "a.png", "conversations": [{"from": "doctor", "value": "<image>"}]}, "has role 'doctor'"),
    ({"images": ["a.png", "a.png"], "conversations": []}, "multi-image samples are not supported"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ho"}]}, "text-only"),
    (_llava("a.png", answer="  "), "assistant turn is empty"),
])
def test_llava_json_bad_input_is_one_line_naming_the_entry(tmp_path, entry, expected):
    _image(tmp_path / "a.png")
    _image(tmp_path.parent / "outside.png")
    path = _write(tmp_path / "train.json", [_llava("a.png"), entry])
    message = _problems(path)
    assert "\n" not in message, message  # one problem, one line
    assert expected in message and "entry 1" in message, message


def test_llava_json_lists_every_problem_at_once(tmp_path):
    _image(tmp_path / "a.png")
    path = _write(tmp_path / "train.jsonl", [_llava("missing.png"), _llava("a.png", question="no image"),
                                              _llava("a.png")])
    message = _problems(path)
    assert "line 1" in message and "line 2" in message and "2 problem(s)" in message


def _class_folder(root):
    """benign/ + malignant/ with masks next to the images and one image filed under both classes."""
    for i in range(4):
        _image(root / "benign" / f"benign ({i}).png", seed=i, size=48)
        _image(root / "benign" / f"benign ({i})_mask.png", seed=100 + i, size=48)
    for i in range(3):
        _image(root / "malignant" / f"malignant ({i}).png", seed=10 + i, size=48)
    # the same picture in both classes (BUSI has a few of these)
    (root / "malignant" / "malignant (9).png").write_bytes((root / "benign" / "benign (2).png").read_bytes())
    return root


def test_to_vqa_groups_duplicates_reports_cross_class_ones_and_loads_as_llava_json(tmp_path):
    from medtune.data.to_vqa import to_vqa

    folder = _class_folder(tmp_path / "busi")
    result = to_vqa(folder, tmp_path / "out" / "vqa.json", seed=3)
    assert result.counts == {"benign": 4, "malignant": 4} and result.n_written == 8  # masks skipped
    assert result.conflicts == [["benign/benign (2) [benign]", "malignant/malignant (9) [malignant]"]]
    entries = json.loads((tmp_path / "out" / "vqa.json").read_text())
    by_id = {e["id"]: e for e in entries}
    assert by_id["benign/benign (2)"]["group"] == by_id["malignant/malignant (9)"]["group"]
    assert by_id["malignant/malignant (1)"]["conversations"][1] == {"from": "gpt", "value": "malignant"}
    question = by_id["benign/benign (0)"]["conversations"][0]["value"]
    assert question.startswith("<image>\n") and "benign or malignant" in question
    # reproducible: the same seed writes the same file
    again = to_vqa(folder, tmp_path / "again.json", seed=3)
    assert again.n_written == 8 and (tmp_path / "again.json").read_text() == (tmp_path / "out" / "vqa.json").read_text()

    samples = {s.id: s for s in discover(DataCfg(path=str(tmp_path / "out" / "vqa.json"), image_root=str(folder)))}
    assert len(samples) == 8 and samples["benign/benign (2)"].group == samples["malignant/malignant (9)"].group
    assert samples["malignant/malignant (0)"].label == "malignant"

    from medtune.config import SplitCfg
    from medtune.data.splits import make_split

    for seed in range(6):
        split = make_split(list(samples.values()), SplitCfg(val_fraction=0.3, test_fraction=0.3), seed)
        where = {i: name for name, ids in split.items() for i in ids}
        assert where["benign/benign (2)"] == where["malignant/malignant (9)"]

    dropped = to_vqa(folder, tmp_path / "dropped.json", seed=3, drop_conflicting=True)
    assert dropped.n_written == 6 and sorted(dropped.dropped) == ["benign/benign (2)", "malignant/malignant (9)"]


def test_to_vqa_cli_and_one_class_folder_error(tmp_path, capsys):
    from medtune.cli import main

    folder = _class_folder(tmp_path / "busi")
    assert main(["data", "to-vqa", str(folder), "--out", str(tmp_path / "v.json")]) == 0
    out = capsys.readouterr().out
    assert "8 image + conversation entries" in out and "different classes: 1 group" in out
    assert "task.labels=[benign,malignant]" in out
    _image(tmp_path / "one" / "benign" / "a.png")
    assert main(["data", "to-vqa", str(tmp_path / "one"), "--out", str(tmp_path / "w.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "1 class folder" in err
