"""Video data (issue 15): the three layouts, splits by video, the clip sampler, the clip dataset, bad input, data
inspect, and the synthetic angiography generator."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medtune.cli import main
from medtune.config import build_config
from medtune.data.layouts import detect_layout
from medtune.data.run_split import check_readable, load_split_samples, prepare_split
from medtune.data.synthetic_video import synthetic_angiography_run, write_synthetic_video_dataset
from medtune.data.types import DataError
from medtune.data.video import (
    PAD_FRAME_INDEX,
    VideoClipDataset,
    VideoSample,
    collate_clips,
    decode_rle,
    encode_rle,
    open_frames,
    read_video_mask,
    sample_clip,
)
from medtune.data.video_layouts import discover_videos

N_VIDEOS, N_FRAMES, SIZE, EVERY = 6, 10, 40, 3


@pytest.fixture(scope="module")
def frames_root(tmp_path_factory) -> Path:
    return write_synthetic_video_dataset(tmp_path_factory.mktemp("vf"), N_VIDEOS, N_FRAMES, SIZE, EVERY, seed=1)


def copy_of(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "copy"))


def data_cfg(path: Path, *overrides: str):
    return build_config({}, [f"data.path={path}", "data.patch_size=32", *overrides]).data


def write_video_file(path: Path, n: int = 12, size: tuple[int, int] = (48, 64), fps: int = 10) -> None:
    """An mp4 whose frame i is a flat grey of level 20 * i (so a frame read back says which frame it is)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        stream.gop_size = 4  # several key frames: random access must seek
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((*size, 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(path)


def square_mask(size: tuple[int, int], top: int, side: int = 8) -> np.ndarray:
    mask = np.zeros(size, np.uint8)
    mask[top:top + side, 4:4 + side] = 1
    return mask


def write_sa2va(root: Path) -> dict:
    """Two videos in Sa2VA's / MeViS's files: a list of per-frame RLEs (null = absent) and a sparse {index: RLE}
    object; one video has two expressions. -> the masks written, {(video, expression, frame): mask}."""
    def rle(mask):
        return encode_rle(mask) if len(mask_dict) % 2 else {"size": list(mask.shape), "counts": uncompressed(mask)}

    truth, meta, mask_dict = {}, {"videos": {}}, {}
    for v, name in enumerate(["clipA", "clipB"]):
        frames = [f"{i:05d}" for i in range(5)]
        for f in frames:
            (root / "JPEGImages" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((24, 32), 100, np.uint8)).save(root / "JPEGImages" / name / f"{f}.jpg")
        meta["videos"][name] = {"frames": frames, "expressions": {}}
        for e in range(v + 1):
            anno_id = f"{v}{e}"
            masks = {i: square_mask((24, 32), 2 * i + 4 * e) for i in range(5)}
            if v == 0:  # every frame listed; frame 4: object absent
                mask_dict[anno_id] = [rle(masks[i]) for i in range(4)] + [None]
                masks[4] = np.zeros((24, 32), np.uint8)
            else:  # sparse: frames 1 and 3 annotated
                masks = {i: masks[i] for i in (1, 3)}
                mask_dict[anno_id] = {str(i): rle(m) for i, m in masks.items()}
            meta["videos"][name]["expressions"][str(e)] = {"exp": f"vessel {e}", "anno_id": [anno_id]}
            truth.update({(name, e, i): m for i, m in masks.items()})
    (root / "meta_expressions.json").write_text(json.dumps(meta))
    (root / "mask_dict.json").write_text(json.dumps(mask_dict))
    return truth


def uncompressed(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts: alternating background / foreground runs down the columns."""
    flat = mask.ravel(order="F")
    runs, value, n = [], 0, 0
    for v in flat:
        if v != value:
            runs.append(n)
            value, n = v, 0
        n += 1
    return runs + [n]


def test_rle_codec_matches_coco_strings():
    # written by pycocotools.mask.encode (COCO's reference implementation) for this mask
    coco = {"size": [7, 9], "counts": "012040N3O000002M1000L0"}
    mask = np.zeros((7, 9), np.uint8)
    mask[1:5, 2:6] = 1
    mask[3, :] = mask[0, 0] = mask[6, 8] = 1
    assert np.array_equal(decode_rle(coco, "x"), mask) and encode_rle(mask) == coco
    rng = np.random.default_rng(0)
    for shape in [(40, 50), (3, 1), (64, 64)]:
        m = (rng.random(shape) < 0.3).astype(np.uint8)
        assert np.array_equal(decode_rle(encode_rle(m), "x"), m)
        assert np.array_equal(decode_rle({"size": list(shape), "counts": uncompressed(m)}, "x"), m)
    with pytest.raises(DataError, match="frame 3: not a run-length encoded mask"):
        decode_rle({"size": [7, 9], "counts": "01"}, "frame 3")


# ---- layouts ------------------------------------------------------------------------------------------------------
def test_video_frames_layout_is_detected_and_read(frames_root):
    cfg = data_cfg(frames_root)
    assert detect_layout(frames_root, cfg) == "video_frames"
    videos = discover_videos(cfg)
    assert [v.id for v in videos] == [f"run{i:03d}" for i in range(N_VIDEOS)]
    video = videos[0]
    assert video.n_frames == N_FRAMES and video.annotated == list(range(0, N_FRAMES, EVERY))
    assert video.frame_size == (SIZE, SIZE) and video.frame_numbers == list(range(N_FRAMES))
    with open_frames(video, cfg) as reader:
        frames = list(reader)
        assert len(reader) == N_FRAMES
        assert np.array_equal(reader.read(4), frames[4])
    assert frames[0].shape == (3, SIZE, SIZE) and frames[0].dtype == np.float32
    assert 0.0 <= frames[0].min() and frames[0].max() <= 1.0
    mask = read_video_mask(video, 9, cfg)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1} and mask.any()
    with pytest.raises(DataError, match="frame 1 .*not annotated"):
        read_video_mask(video, 1, cfg)


def test_video_files_layout_decodes_an_mp4_with_random_access(tmp_path):
    write_video_file(tmp_path / "videos" / "run1.mp4", n=12)
    write_mask(tmp_path / "masks" / "run1" / "00003.png", square_mask((48, 64), 10))
    write_mask(tmp_path / "masks" / "run1" / "7.png", square_mask((48, 64), 20))
    cfg = data_cfg(tmp_path, "data.channels=1")
    assert detect_layout(tmp_path, cfg) == "video_files"
    (video,) = discover_videos(cfg)
    assert (video.id, video.n_frames, video.annotated, video.fps, video.frame_size) == ("run1", 12, [3, 7], 10.0,
                                                                                         (48, 64))
    level = lambda frame: float(frame.mean()) * 255 / 20  # noqa: E731 - the frame number the test wrote
    with open_frames(video, cfg) as reader:
        in_order = [round(level(f)) for f in reader]
        jumps = [round(level(reader.read(i))) for i in (9, 2, 3, 11, 0)]  # back and forth: seeks
    assert in_order == list(range(12)) and jumps == [9, 2, 3, 11, 0]
    assert np.array_equal(read_video_mask(video, 7, cfg), square_mask((48, 64), 20))


def test_sa2va_video_layout_reads_rle_masks_per_expression(tmp_path):
    truth = write_sa2va(tmp_path)
    cfg = data_cfg(tmp_path)
    assert detect_layout(tmp_path, cfg) == "sa2va_video"
    a, b = discover_videos(cfg)
    assert (a.id, a.annotated, a.expressions) == ("clipA", [0, 1, 2, 3, 4], ["vessel 0"])
    assert (b.id, b.annotated, b.expressions) == ("clipB", [1, 3], ["vessel 0", "vessel 1"])
    assert np.array_equal(read_video_mask(a, 2, cfg), truth[("clipA", 0, 2)])
    assert not read_video_mask(a, 4, cfg).any()  # null: annotated, object absent
    assert np.array_equal(read_video_mask(b, 3, cfg, target=1), truth[("clipB", 1, 3)])
    union = truth[("clipB", 0, 1)] | truth[("clipB", 1, 1)]
    assert np.array_equal(read_video_mask(b, 1, cfg), union)


# ---- splits -------------------------------------------------------------------------------------------------------
def run_cfg(tmp_path: Path, data: Path, *overrides: str):
    return build_config({}, [f"run.output_dir={tmp_path / 'runs'}", f"data.path={data}",
                             "data.split.val_fraction=0.2", "data.split.test_fraction=0.2", *overrides])


def test_split_is_by_video_and_run_split_serves_videos(frames_root, tmp_path):
    cfg = run_cfg(tmp_path, frames_root)
    data = prepare_split(cfg, tmp_path / "run")
    ids = [i for name in ("train", "val", "test") for i in data.split[name]]
    assert sorted(ids) == sorted(data.samples) and len(ids) == len(set(ids)) == N_VIDEOS
    assert data.split["val"] and data.split["test"]
    train = load_split_samples(cfg, data, "train", tmp_path / "run", lazy=True)
    assert all(isinstance(v, VideoSample) for v in train) and [v.id for v in train] == data.split["train"]
    check_readable(cfg, data, ("val", "test"))
    again = prepare_split(cfg, tmp_path / "run")  # resumes read RUN/split.json
    assert again.split == data.split


def test_kfold_and_group_by_keep_videos_whole(frames_root, tmp_path):
    tested = []
    for fold in range(3):
        cfg = run_cfg(tmp_path, frames_root, "data.split.folds=3", f"data.split.fold={fold}",
                      "data.split.group_by=(run00(?=[01])|run\\d+)")  # run000 + run001: one patient
        split = prepare_split(cfg, tmp_path / f"fold{fold}").split
        ids = [i for name in ("train", "val", "test") for i in split[name]]
        assert len(ids) == len(set(ids)) == N_VIDEOS
        where = {i: name for name in split for i in split[name]}
        assert where["run000"] == where["run001"]
        tested += split["test"]
    assert sorted(tested) == [f"run{i:03d}" for i in range(N_VIDEOS)]  # every video tested exactly once


# ---- clips --------------------------------------------------------------------------------------------------------
def test_clip_sampler_is_pure_and_holds_annotated_frames():
    annotated = [3, 40, 41, 90]
    clip = sample_clip(100, annotated, 8, seed=0, epoch=2, index=5)
    assert clip == sample_clip(100, annotated, 8, seed=0, epoch=2, index=5)
    clips = [sample_clip(100, annotated, 8, 0, epoch, index) for epoch in range(3) for index in range(20)]
    assert len({tuple(c) for c in clips}) > 10  # (epoch, index) change the clip
    for c in clips:
        assert len(c) == 8 and c == list(range(c[0], c[0] + 8)) and 0 <= c[0] and c[-1] < 100
        assert set(c) & set(annotated)
    strided = sample_clip(100, annotated, 4, 1, 0, 0, stride=3)
    assert np.all(np.diff(strided) == 3) and set(strided) & set(annotated)
    sparse = sample_clip(500, [250], 8, 0, 0, 0)  # one annotated frame in 500: the clip still has it
    assert 250 in sparse and len(sparse) == 8
    assert sample_clip(5, [2], 8, 0, 0, 0) == [0, 1, 2, 3, 4]  # a short video: a shorter clip, no repeats


def test_clip_dataset_items_and_collate(frames_root):
    cfg = data_cfg(frames_root, "data.video.clip_length=6", "data.augment.enabled=true")
    videos = discover_videos(cfg)
    ds = VideoClipDataset(videos, cfg, seed=3)
    assert len(ds) == N_VIDEOS * cfg.video.clips_per_video
    item = ds[(7, 1)]
    assert item["frames"].shape == (6, 3, 32, 32) and item["frames"].dtype == torch.float32
    assert item["masks"].shape == item["fov"].shape == (6, 1, 32, 32)
    assert item["annotated"].dtype == torch.bool and item["frame_index"].dtype == torch.long
    assert item["id"] == videos[7 % N_VIDEOS].id
    idx = item["frame_index"].tolist()
    assert item["annotated"].tolist() == [i % EVERY == 0 for i in idx] and item["annotated"].any()
    assert not item["masks"][~item["annotated"]].any()  # unannotated frames carry no mask
    again = ds[(7, 1)]
    assert all(torch.equal(item[k], again[k]) for k in ("frames", "masks", "annotated", "frame_index", "fov"))
    short = dict(item, **{k: item[k][:4] for k in ("frames", "masks", "annotated", "frame_index", "fov")})
    batch = collate_clips([item, short])
    assert batch["frames"].shape == (2, 6, 3, 32, 32) and batch["id"] == [item["id"]] * 2
    assert batch["frame_index"][1, 4:].tolist() == [PAD_FRAME_INDEX] * 2 and not batch["annotated"][1, 4:].any()


# ---- bad input ----------------------------------------------------------------------------------------------------
def one_line_error(cfg) -> str:
    with pytest.raises(DataError) as caught:
        discover_videos(cfg)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_bad_frame_folders_each_say_which_video_and_frame(frames_root, tmp_path):
    root = copy_of(frames_root, tmp_path)
    cfg = data_cfg(root)
    shutil.rmtree(root / "Annotations" / "run001")
    assert "video run001: no annotated frame" in one_line_error(cfg)
    shutil.copytree(frames_root / "Annotations" / "run001", root / "Annotations" / "run001")

    Image.fromarray(np.zeros((SIZE, SIZE + 8), np.uint8)).save(root / "JPEGImages" / "run002" / "00004.png")
    assert "video run002 frame 4 (00004.png): frame is 40x48 but frame 0 is 40x40" in one_line_error(cfg)
    shutil.copy(frames_root / "JPEGImages" / "run002" / "00004.png", root / "JPEGImages" / "run002" / "00004.png")

    (root / "JPEGImages" / "run003" / "00005.png").unlink()
    assert "video run003 frame 00004.png: gap in the frame numbering, the next frame is 00006.png" in one_line_error(cfg)
    shutil.copy(frames_root / "JPEGImages" / "run003" / "00005.png", root / "JPEGImages" / "run003" / "00005.png")

    write_mask(root / "Annotations" / "run004" / "00099.png", np.ones((SIZE, SIZE)))
    assert "video run004 frame 00099: mask" in one_line_error(cfg)
    assert "for a frame that does not exist" in one_line_error(cfg)


def test_bad_video_files_and_rle_masks_each_say_which_video_and_frame(tmp_path):
    (tmp_path / "v" / "videos").mkdir(parents=True)
    (tmp_path / "v" / "videos" / "broken.mp4").write_bytes(b"not a video at all" * 50)
    write_mask(tmp_path / "v" / "masks" / "broken" / "0.png", np.ones((8, 8)))
    assert "video broken: " in one_line_error(data_cfg(tmp_path / "v", "data.layout=video_files"))
    assert "cannot be read as a video" in one_line_error(data_cfg(tmp_path / "v", "data.layout=video_files"))

    write_video_file(tmp_path / "w" / "videos" / "run1.mp4", n=6)
    write_mask(tmp_path / "w" / "masks" / "run1" / "2.png", np.ones((48, 64)))
    write_mask(tmp_path / "w" / "masks" / "run1" / "6.png", np.ones((48, 64)))
    assert "video run1 frame 6: mask" in one_line_error(data_cfg(tmp_path / "w"))

    write_sa2va(tmp_path / "s")
    masks = json.loads((tmp_path / "s" / "mask_dict.json").read_text())
    masks["10"]["7"] = masks["10"]["1"]  # clipB has frames 0-4
    (tmp_path / "s" / "mask_dict.json").write_text(json.dumps(masks))
    assert "video clipB frame 7: mask_dict.json anno_id 10 has a mask for a frame that does not exist" in \
        one_line_error(data_cfg(tmp_path / "s"))


def test_a_frame_that_does_not_decode_fails_in_check_readable_naming_it(frames_root, tmp_path):
    root = copy_of(frames_root, tmp_path)
    cfg = run_cfg(tmp_path, root, "data.split.val_fraction=0", "data.split.test_fraction=0.5")
    data = prepare_split(cfg, tmp_path / "run")
    victim = data.split["test"][0]
    path = root / "JPEGImages" / victim / "00002.png"
    path.write_bytes(path.read_bytes()[:60])  # header intact (the size still reads), pixels cut off
    with pytest.raises(DataError, match=f"{victim}/00002.png: cannot be read as an image"):
        check_readable(cfg, data)


# ---- inspect ------------------------------------------------------------------------------------------------------
def test_data_inspect_reports_per_video_and_exits_1_on_problems(frames_root, tmp_path, capsys):
    assert main(["data", "inspect", str(frames_root)]) == 0
    out = capsys.readouterr().out
    assert f"layout: video_frames, {N_VIDEOS} videos, {N_VIDEOS * N_FRAMES} frames" in out
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("run000"))
    assert row[:6] == ["run000", str(N_FRAMES), "4", "0", f"{SIZE}x{SIZE}", "-"] and row[-1] == "ok"
    assert "problems: none" in out

    root = copy_of(frames_root, tmp_path)
    (root / "JPEGImages" / "run003" / "00005.png").unlink()
    assert main(["data", "inspect", str(root), "data.video.fps=15"]) == 1
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("run003"))
    assert row[1:4] == [str(N_FRAMES - 1), "4", "1"] and row[5] == "15" and row[-1] == "PROBLEM"
    assert "problems: 1" in out and "gap in the frame numbering" in out


# ---- synthetic angiography ----------------------------------------------------------------------------------------
def test_synthetic_angiography_runs_fill_move_and_repeat():
    started = time.perf_counter()
    frames, masks = synthetic_angiography_run(seed=4, n_frames=24, size=64)
    assert time.perf_counter() - started < 1.0
    assert frames.shape == masks.shape == (24, 64, 64) and frames.dtype == np.float32 and masks.dtype == np.uint8
    assert 0.0 <= frames.min() and frames.max() <= 1.0 and set(np.unique(masks)) <= {0, 1}
    again = synthetic_angiography_run(seed=4, n_frames=24, size=64)
    assert np.array_equal(frames, again[0]) and np.array_equal(masks, again[1])
    assert not np.array_equal(masks, synthetic_angiography_run(seed=5, n_frames=24, size=64)[1])

    fill = masks.reshape(24, -1).mean(axis=1)
    assert fill[0] == 0.0 and fill[8] > 0.03  # contrast arrives, then the tree is full (a third of the run)
    assert np.all(np.diff(fill[:8]) > 0)  # the opacified part grows frame by frame over the first frames
    # after filling, the heart moves the tree: the masks of one beat's frames differ by more than a few pixels
    full = masks[9:]
    moved = [np.mean(full[0] != full[k]) for k in range(1, len(full))]
    assert max(moved) > 0.02
    # vessels are darker than the background around them
    assert frames[12][masks[12] == 1].mean() < frames[12][masks[12] == 0].mean() - 0.1


def test_synthetic_video_dataset_is_sparse_and_deterministic(tmp_path):
    a = write_synthetic_video_dataset(tmp_path / "a", n_videos=2, n_frames=9, size=32, annotate_every=4, seed=7)
    b = write_synthetic_video_dataset(tmp_path / "b", n_videos=3, n_frames=9, size=32, annotate_every=4, seed=7)
    assert sorted(p.name for p in (a / "Annotations" / "run001").iterdir()) == ["00000.png", "00004.png", "00008.png"]
    for name in ("JPEGImages/run001/00005.png", "Annotations/run001/00004.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes()  # run i does not depend on n_videos
