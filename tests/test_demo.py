"""The Predictor (every kind of image in, the same results out; batches; bad inputs named), the
demo's pictures (labels inside the picture, mask opacity, ground truth beside the predictions) and
the demo command (folders with unreadable images, video refused, --synthetic writes no data set)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiffinst.checkpoint import save_model
from fastdiffinst.cli import main
from fastdiffinst.config import get_config, override
from fastdiffinst.data import DatasetError
from fastdiffinst.data.synthetic import render_sample
from fastdiffinst.engine.demo import _colour, _overlap, draw_instances, label_rects, place_label
from fastdiffinst.predictor import Predictor
from test_train import SMALL

ROOT = Path(__file__).resolve().parents[1]
NAMES = [f"class {i}" for i in range(8)]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    from fastdiffinst.modeling import DiffusionInst

    torch.manual_seed(0)
    model = DiffusionInst(override(get_config("tiny"), SMALL[:2] + ["num_classes=8", "input.min_size_test=64",
                                                                     "input.max_size_test=96"]))
    path = tmp_path_factory.mktemp("demo_model") / "model.pth"
    save_model(model, path, NAMES)
    return path


@pytest.fixture(scope="module")
def predictor(model_file) -> Predictor:
    return Predictor(model_file, device="cpu")


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return render_sample(0)["image"]


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _close(a: dict, b: dict) -> None:
    """Equal up to the float rounding of batched kernels."""
    assert torch.equal(a["labels"], b["labels"])
    torch.testing.assert_close(a["scores"], b["scores"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a["boxes"], b["boxes"], atol=0.05, rtol=1e-4)
    assert (a["masks"] != b["masks"]).float().mean() < 1e-3


def test_predictor_gives_the_same_results_for_every_kind_of_image(predictor, image, tmp_path):
    rgb = image.permute(1, 2, 0).numpy()
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    reference = predictor(image)
    height, width = rgb.shape[:2]
    assert reference["boxes"].shape[1] == 4 and reference["masks"].shape[1:] == (height, width)
    assert reference["masks"].dtype == torch.bool and len(reference["scores"]) == len(reference["labels"])
    alpha = np.full((height, width, 1), 7, np.uint8)
    for same in (tmp_path / "rgb.png", str(tmp_path / "rgb.png"), rgb, np.concatenate([rgb, alpha], 2),
                 Image.fromarray(rgb)):
        assert _same(predictor(same), reference)
    gray = rgb[:, :, 1].copy()
    Image.fromarray(gray).save(tmp_path / "gray.png")
    gray_reference = predictor(torch.from_numpy(gray)[None].expand(3, -1, -1).contiguous())
    for same in (gray, gray[:, :, None], tmp_path / "gray.png"):
        assert _same(predictor(same), gray_reference)
    # A float tensor at the test size already (no resize): the same pixels as uint8.
    small = image[:, :64, :90]
    assert _same(predictor(small.float()), predictor(small))
    assert predictor.class_names == NAMES


def test_batched_is_one_by_one(predictor):
    crops = [render_sample(i)["image"][:, :128, :140] for i in range(2)]
    images = [crops[0], crops[1], crops[0]]
    batched = predictor(images, batch_size=2)
    assert isinstance(batched, list) and len(batched) == 3
    for one, result in zip(images, batched):
        _close(result, predictor(one))
    assert predictor([]) == []


@pytest.mark.parametrize("bad, error, named", [
    (np.zeros((10, 10, 2), np.uint8), ValueError, "(10, 10, 2)"),
    (np.zeros((3, 10, 10), np.uint8), ValueError, "transpose(1, 2, 0)"),
    (np.zeros((10, 10, 3), np.float32), TypeError, "float32"),
    (np.zeros((0, 10, 3), np.uint8), ValueError, "empty"),
    (torch.zeros(10, 10, 3, dtype=torch.uint8), ValueError, "permute(2, 0, 1)"),
    (torch.zeros(1, 3, 10, 10), ValueError, "list"),
    (torch.zeros(3, 10, 10, dtype=torch.int32), TypeError, "torch.int32"),
    (torch.full((3, 10, 10), 1e6), ValueError, "out-of-range"),
    (torch.full((3, 10, 10), float("nan")), ValueError, "non-finite"),
    (42, TypeError, "int"),
    ("no/such/image.png", DatasetError, "image not found"),
    ("clip.mp4", ValueError, "video is not supported"),
])
def test_predictor_names_bad_inputs(predictor, bad, error, named):
    with pytest.raises(error, match=None) as caught:
        predictor(bad)
    assert named in str(caught.value)


def test_predictor_names_the_bad_image_of_a_list_and_checks_batch_size(predictor, image):
    with pytest.raises(ValueError, match=r"images\[1\].*\(10, 10, 2\)"):
        predictor([image, np.zeros((10, 10, 2), np.uint8)])
    with pytest.raises(ValueError, match="batch_size"):
        predictor([image], batch_size=0)
    with pytest.raises(TypeError, match="model_or_path"):
        Predictor(3.5)


def _corner_instances(height: int, width: int) -> dict:
    boxes = torch.tensor([[0, 0, 30, 20], [width - 30, 0, width, 20], [0, height - 20, 30, height],
                          [width - 20, height - 15, width, height], [60, 40, 80, 60]], dtype=torch.float32)
    masks = torch.zeros(len(boxes), height, width, dtype=torch.bool)
    for i, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        masks[i, y1:y2, x1:x2] = True
    return {"boxes": boxes, "scores": torch.tensor([0.93, 0.9, 0.8, 0.7, 0.6]), "labels": torch.tensor([0, 1, 2, 3, 4]),
            "masks": masks}


def test_labels_stay_inside_the_picture(tmp_path):
    height, width = 100, 160
    instances = _corner_instances(height, width)
    rects = label_rects((height, width), instances, NAMES)
    assert [text for text, _ in rects] == ["class 0 0.93", "class 1 0.90", "class 2 0.80", "class 3 0.70",
                                           "class 4 0.60"]
    for _, (left, top, right, bottom) in rects:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
    assert rects[0][1][:2] == (0, 0)  # no room above the top-left box: just below its top edge
    assert rects[1][1][2] == width  # shifted left at the right edge
    assert rects[4][1][3] == 40  # room above: the label ends at the box's top edge
    image = torch.full((3, height, width), 128, dtype=torch.uint8)
    picture = np.asarray(draw_instances(image, instances, NAMES, alpha=0.0))
    assert picture.shape == (height, width, 3)
    for rank, (_, (left, top, right, bottom)) in enumerate(rects):
        region = picture[top:bottom, left:right]
        background = (region == np.array(_colour(rank))).all(-1)
        assert background.mean() > 0.4  # the label's filled box, drawn over the outlines
        text_columns = np.flatnonzero((~background).any(0))
        # The text, score included, is drawn inside its box: ink up to near its right end.
        assert text_columns.size and text_columns.max() >= (right - left) * 0.8
    # Overlapping boxes: the second label goes where it does not cover the first.
    crowded = {"boxes": torch.tensor([[10.0, 30, 60, 80], [14, 33, 70, 90], [100, 0, 150, 50]]),
               "scores": torch.tensor([0.8, 0.9, 0.7]), "labels": torch.tensor([0, 1, 2])}
    placed = label_rects((height, width), crowded, NAMES)
    assert [text for text, _ in placed] == ["class 1 0.90", "class 0 0.80", "class 2 0.70"]  # best first
    assert placed[0][1][3] == 33 and placed[1][1][1] == 80  # above its box; below its box, clear of the first
    for a in range(3):
        assert all(_overlap(placed[a][1], placed[b][1]) == 0 for b in range(a))
    # A label wider than the picture starts at its left edge; one taller at its top edge.
    assert place_label((50, 5, 60, 9), (200, 12), (100, 160)) == (0, 5, 200, 17)
    assert place_label((5, 50, 9, 60), (20, 300), (100, 160)) == (5, 0, 25, 300)


def test_mask_opacity(image):
    height, width = image.shape[1:]
    instances = _corner_instances(height, width)
    inside = (slice(45, 55), slice(65, 75))  # inside instance 4's mask, away from its outline and labels
    solid = np.asarray(draw_instances(image, instances, NAMES, alpha=1.0))
    assert (solid[inside] == np.array(_colour(4))).all()
    clear = np.asarray(draw_instances(image, instances, NAMES, alpha=0.0))
    assert np.array_equal(clear[inside], image.permute(1, 2, 0).numpy()[inside])
    with pytest.raises(ValueError, match="alpha"):
        draw_instances(image, instances, NAMES, alpha=1.5)


def _demo(model_file, *args) -> list[str]:
    return ["demo", "--checkpoint", str(model_file), "--device", "cpu", "--score-threshold", "0", "--no-progress",
            *map(str, args)]


def test_demo_folder_with_an_unreadable_image(model_file, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(render_sample(i)["image"][:, :128, :128].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "out"
    assert main(_demo(model_file, "--input", folder, "--out", out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png"]
    printed = capsys.readouterr()
    assert f"skipped {folder / 'broken.jpg'}: " in printed.err
    assert "2 pictures written" in printed.out and "1 skipped" in printed.out


def test_demo_folder_of_unreadable_images_fails(model_file, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        (folder / name).write_bytes(b"garbage")
    assert main(_demo(model_file, "--input", folder, "--out", tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.count("\nskipped ") + err.startswith("skipped ") == 2
    assert err.rstrip().splitlines()[-1] == "error: no picture written: all 2 images were skipped"


@pytest.mark.parametrize("exists", [True, False])
def test_demo_refuses_video(model_file, tmp_path, capsys, exists):
    video = tmp_path / "clip.MP4"
    if exists:
        video.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    assert main(_demo(model_file, "--input", video, "--out", tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "video is not supported" in err and "ffmpeg -i" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "x"])
def test_demo_mask_alpha_is_range_checked(model_file, tmp_path, capsys, value):
    assert main(_demo(model_file, "--synthetic", 1, "--out", tmp_path / "out", "--mask-alpha", value)) == 2
    assert "--mask-alpha" in capsys.readouterr().err


def test_demo_synthetic_writes_no_data_set_and_shows_ground_truth(model_file, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    monkeypatch.setenv("FASTDIFFINST_DATA", str(data))
    out = tmp_path / "out"
    assert main(_demo(model_file, "--synthetic", 2, "--out", out, "--mask-alpha", "0.3")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["synthetic-00000.png", "synthetic-00001.png"]
    assert not data.exists() or not any(data.iterdir())
    width = render_sample(0)["image"].shape[2]
    assert main(_demo(model_file, "--synthetic", 1, "--show-gt", "--out", tmp_path / "gt")) == 0
    with Image.open(tmp_path / "gt" / "synthetic-00000.png") as picture:
        assert picture.width == 2 * width
    assert not data.exists() or not any(data.iterdir())
    # The same from a data set on disk (--data), with its class names.
    assert main(_demo(model_file, "--data", "synthetic:2", "--limit", 1, "--show-gt", "--out", tmp_path / "d")) == 0
    with Image.open(tmp_path / "d" / "00000.png") as picture:
        assert picture.width == 2 * width
    capsys.readouterr()
    assert main(_demo(model_file, "--input", tmp_path / "d", "--show-gt", "--out", tmp_path / "x")) == 2
    assert "--show-gt" in capsys.readouterr().err
    assert main(_demo(model_file, "--synthetic", 1, "--limit", 1, "--out", tmp_path / "x")) == 2
    assert "--limit" in capsys.readouterr().err


@pytest.mark.parametrize("name, content, named", [("clip.avi", b"RIFF....AVI ", "video is not supported"),
                                                   ("broken.png", b"\x89PNG not really", "broken.png")])
def test_demo_process_errors_are_one_line(model_file, tmp_path, name, content, named):
    path = tmp_path / name
    path.write_bytes(content)
    command = [sys.executable, "-m", "fastdiffinst", "demo", "--checkpoint", str(model_file), "--input", str(path),
               "--out", str(tmp_path / "out"), "--threads", "1"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stderr.startswith("error: ") and named in run.stderr
