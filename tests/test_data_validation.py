"""Bad COCO/LVIS json files: every malformed entry raises DatasetError at load time, naming the file,
the image and annotation and what was expected, before pycocotools sees it; good files still load
and decode as before; zero-area boxes are skipped with one warning; the compressed-RLE decoder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fastdiffinst.data import DatasetError, InstanceDataset
from fastdiffinst.data.coco import decode_rle_string
from test_data import COCO_CATEGORIES, COCO_IMAGES, coco_folder

NAN, INF = math.nan, math.inf
MISSING = object()  # a key to leave out
GOOD = {
    "id": 5,
    "image_id": 1,
    "category_id": 7,
    "bbox": [2, 2, 6, 6],
    "iscrowd": 0,
    "segmentation": [[2, 2, 8, 2, 8, 8]],
}
A5 = "annotation 5 of image 1 (annotations[0])"  # how errors name GOOD
I1 = "image 1 (images[0])"  # and the first image
RLE_SIZE = [20, 30]  # image 1


def _changed(entry: dict, changes: dict) -> dict:
    """``entry`` with ``changes`` applied; a value ``MISSING`` removes its key."""
    merged = {**entry, **changes}
    return {key: value for key, value in merged.items() if value is not MISSING}


def _file(images=None, annotations=(), categories=None) -> dict:
    """A COCO json object: the two images and two categories of test_data.py unless given."""
    images = COCO_IMAGES if images is None else images
    categories = COCO_CATEGORIES if categories is None else categories
    return {"images": images, "annotations": list(annotations), "categories": categories}


def _annotation(**changes) -> dict:
    """A file whose one annotation is GOOD with ``changes``."""
    return _file(annotations=[_changed(GOOD, changes)])


def _image(**changes) -> dict:
    """A file whose first image has ``changes``."""
    return _file(images=[_changed(COCO_IMAGES[0], changes), COCO_IMAGES[1]])


def _category(**changes) -> dict:
    """A file whose first category has ``changes``."""
    return _file(categories=[_changed(COCO_CATEGORIES[0], changes), COCO_CATEGORIES[1]])


def _rle(counts, size=MISSING, **changes) -> dict:
    """A file whose one annotation has an RLE of image 1 (20×30) with ``counts``."""
    rle = {"size": RLE_SIZE if size is MISSING else size, "counts": counts}
    return _annotation(segmentation=rle, **changes)


def _compressed(height: int, width: int) -> str:
    """pycocotools' compressed counts of a ``height × width`` mask with a square in it."""
    from pycocotools import mask as mask_utils

    mask = np.zeros((height, width), np.uint8, order="F")
    mask[2:9, 3:12] = 1
    return mask_utils.encode(mask)["counts"].decode()


# (id, file content: a json object, or the raw text or bytes of the file, fragments the message must hold)
_CASES = [
    # The file
    ("empty-file", "", "is not valid json"),
    ("not-json", "{not json", "is not valid json"),
    ("not-utf8", b"\xff\xfe\x00", "is not valid json"),
    ("json-list", "[1, 2]", "expected a json object", "got list"),
    ("json-number", "3", "expected a json object", "got int 3"),
    ("json-null", "null", "expected a json object", "got NoneType"),
    ("json-string", '"images"', "expected a json object", "got str"),
    ("no-images-key", {"annotations": [], "categories": []}, "'images' must be a list, got nothing"),
    ("no-annotations-key", {"images": COCO_IMAGES, "categories": []}, "'annotations' must be a list, got nothing"),
    ("no-categories-key", {"images": COCO_IMAGES, "annotations": []}, "'categories' must be a list, got nothing"),
    ("images-an-object", {**_file(), "images": {"id": 1}}, "'images' must be a list, got dict"),
    ("no-images", _file(images=[]), "no images in "),
    ("no-categories", _file(categories=[], annotations=[]), "no categories in "),
    # Images
    ("image-not-object", _file(images=[5]), "images[0] must be an object, got 5"),
    ("image-id-missing", _image(id=MISSING), "image None (images[0]): needs an integer 'id', got None"),
    ("image-id-string", _image(id="1"), "image '1' (images[0]): needs an integer 'id'"),
    ("image-id-bool", _image(id=True), "image True (images[0]): needs an integer 'id'"),
    ("image-id-float", _image(id=1.0), "image 1.0 (images[0]): needs an integer 'id'"),
    ("image-id-duplicate", _image(id=2), "image 2 (images[1]): has the id of an earlier image"),
    ("image-height-zero", _image(height=0), I1, "'height' must be an integer in [1, 65536], got 0"),
    ("image-height-negative", _image(height=-20), I1, "'height' must be an integer in [1, 65536], got -20"),
    ("image-width-absurd", _image(width=10**9), I1, "'width' must be an integer in [1, 65536], got 1000000000"),
    ("image-width-bool", _image(width=True), I1, "'width' must be an integer in [1, 65536], got True"),
    ("image-height-float", _image(height=20.0), I1, "'height' must be an integer in [1, 65536], got 20.0"),
    ("image-height-string", _image(height="20"), I1, "'height' must be an integer in [1, 65536], got '20'"),
    ("image-width-missing", _image(width=MISSING), I1, "'width' must be an integer in [1, 65536], got None"),
    ("image-file-name-missing", _image(file_name=MISSING), "image 1 (images[0]): needs a 'file_name' or 'coco_url'"),
    ("image-file-name-number", _image(file_name=3), "image 1 (images[0]): needs a 'file_name' or 'coco_url'"),
    # Categories
    ("category-id-duplicate", _category(id=3), "category 3 (categories[1]): has the id of an earlier category"),
    ("category-id-string", _category(id="7"), "categories[0] needs an integer 'id'"),
    ("category-id-bool", _category(id=True), "categories[0] needs an integer 'id'"),
    ("category-not-object", _file(categories=[7]), "categories[0] needs an integer 'id', got 7"),
    ("category-image-count-negative", _category(image_count=-1), "category 7 (categories[0])", "'image_count'"),
    ("category-image-count-string", _category(image_count="many"), "category 7 (categories[0])", "got 'many'"),
    # Annotations: ids and references
    ("annotation-not-object", _file(annotations=[[1, 2]]), "annotations[0] must be an object, got [1, 2]"),
    ("annotation-id-missing", _annotation(id=MISSING), "annotation None of image 1 (annotations[0]): needs an integer"),
    ("annotation-id-string", _annotation(id="5"), "annotation '5' of image 1 (annotations[0]): needs an integer 'id'"),
    ("annotation-id-bool", _annotation(id=True), "annotation True of image 1 (annotations[0]): needs an integer 'id'"),
    ("annotation-id-twice", _file(annotations=[GOOD, GOOD]), "annotation 5 of image 1 (annotations[1]): has the id"),
    ("image-id-unknown", _annotation(image_id=9), "annotation 5 of image 9", "has image_id 9, which is not"),
    ("image-id-string-ref", _annotation(image_id="1"), "annotation 5 of image '1'", "has image_id '1', which is not"),
    ("image-id-float-ref", _annotation(image_id=1.0), "annotation 5 of image 1.0", "has image_id 1.0, which is not"),
    ("image-id-missing-ref", _annotation(image_id=MISSING), "annotation 5 of image None", "has image_id None"),
    ("category-unknown", _annotation(category_id=99), A5, "has category_id 99, which is not a category id"),
    ("category-float", _annotation(category_id=7.0), A5, "has category_id 7.0, which is not a category id"),
    ("category-bool", _annotation(category_id=True), A5, "has category_id True, which is not a category id"),
    ("category-missing", _annotation(category_id=MISSING), A5, "has category_id None, which is not a category id"),
    ("iscrowd-2", _annotation(iscrowd=2), A5, "'iscrowd' must be 0 or 1, got 2"),
    ("iscrowd-bool", _annotation(iscrowd=True), A5, "'iscrowd' must be 0 or 1, got True"),
    ("iscrowd-string", _annotation(iscrowd="0"), A5, "'iscrowd' must be 0 or 1, got '0'"),
    ("iscrowd-negative", _annotation(iscrowd=-1), A5, "'iscrowd' must be 0 or 1, got -1"),
    # Annotations: boxes
    ("bbox-nan", _annotation(bbox=[2, 2, NAN, 6]), A5, "'bbox' must be [x, y, w, h] of finite numbers", "nan"),
    ("bbox-inf", _annotation(bbox=[INF, 2, 6, 6]), A5, "'bbox' must be [x, y, w, h] of finite numbers", "inf"),
    ("bbox-minus-inf", _annotation(bbox=[2, -INF, 6, 6]), A5, "of finite numbers with w, h >= 0", "-inf"),
    ("bbox-huge-int", _annotation(bbox=[2, 2, 10**400, 6]), A5, "of finite numbers with w, h >= 0", "1000000"),
    ("bbox-negative-width", _annotation(bbox=[2, 2, -6, 6]), A5, "with w, h >= 0, got [2, 2, -6, 6]"),
    ("bbox-negative-height", _annotation(bbox=[2, 2, 6, -0.5]), A5, "with w, h >= 0, got [2, 2, 6, -0.5]"),
    ("bbox-3-values", _annotation(bbox=[2, 2, 6]), A5, "'bbox' must be [x, y, w, h], got [2, 2, 6]"),
    ("bbox-5-values", _annotation(bbox=[2, 2, 6, 6, 1]), A5, "'bbox' must be [x, y, w, h], got [2, 2, 6, 6, 1]"),
    ("bbox-string", _annotation(bbox="2,2,6,6"), A5, "'bbox' must be [x, y, w, h], got '2,2,6,6'"),
    ("bbox-object", _annotation(bbox={"x": 2}), A5, "'bbox' must be [x, y, w, h], got {'x': 2}"),
    ("bbox-missing", _annotation(bbox=MISSING), A5, "'bbox' must be [x, y, w, h], got None"),
    ("bbox-string-value", _annotation(bbox=[2, "2", 6, 6]), A5, "of finite numbers", "got [2, '2', 6, 6]"),
    ("bbox-bool-value", _annotation(bbox=[2, 2, True, 6]), A5, "of finite numbers", "got [2, 2, True, 6]"),
    ("bbox-null-value", _annotation(bbox=[2, 2, 6, None]), A5, "of finite numbers", "got [2, 2, 6, None]"),
    # Annotations: the segmentation's type
    ("segmentation-number", _annotation(segmentation=5), A5, "'segmentation' must be polygons", "got 5"),
    ("segmentation-string", _annotation(segmentation="abc"), A5, "'segmentation' must be polygons", "got 'abc'"),
    ("segmentation-missing", _annotation(segmentation=MISSING), A5, "'segmentation' must be polygons", "got None"),
    ("segmentation-empty", _annotation(segmentation=[]), A5, "'segmentation' is an empty list of polygons"),
    ("polygon-a-number", _annotation(segmentation=[5]), A5, "segmentation[0] must be a polygon", "got 5"),
    ("polygon-an-object", _annotation(segmentation=[{"x": 1}]), A5, "segmentation[0] must be a polygon"),
    # Polygons (image 1 is 20×30: x within [-30, 60], y within [-20, 40])
    ("polygon-null", _annotation(segmentation=[[2, 2, 8, None, 8, 8]]), A5, "segmentation[0][3] (y)", "got None"),
    ("polygon-nan", _annotation(segmentation=[[2, 2, NAN, 2, 8, 8]]), A5, "segmentation[0][2] (x)", "got nan"),
    ("polygon-inf", _annotation(segmentation=[[2, 2, 8, 2, INF, 8]]), A5, "segmentation[0][4] (x)", "got inf"),
    ("polygon-1e9", _annotation(segmentation=[[2, 2, 1e9, 2, 8, 8]]), A5, "[0][2] (x)", "within [-30, 60]"),
    ("polygon-minus-1e9", _annotation(segmentation=[[2, 2, 8, -1e9, 8, 8]]), A5, "[0][3] (y)", "within [-20, 40]"),
    ("polygon-huge-int", _annotation(segmentation=[[2, 2, 8, 2, 10**400, 8]]), A5, "segmentation[0][4] (x)"),
    ("polygon-x-past-margin", _annotation(segmentation=[[2, 2, 60.5, 2, 8, 8]]), A5, "within [-30, 60]", "got 60.5"),
    ("polygon-y-past-margin", _annotation(segmentation=[[2, 2, 8, 2, 8, -21]]), A5, "within [-20, 40]", "got -21"),
    ("polygon-string", _annotation(segmentation=[[2, "2", 8, 2, 8, 8]]), A5, "segmentation[0][1] (y)", "got '2'"),
    ("polygon-bool", _annotation(segmentation=[[2, 2, 8, 2, True, 8]]), A5, "segmentation[0][4] (x)", "got True"),
    ("polygon-odd-length", _annotation(segmentation=[[2, 2, 8, 2, 8, 8, 1]]), A5, "segmentation[0] must be a polygon"),
    ("polygon-length-4", _annotation(segmentation=[[2, 2, 8, 2]]), A5, "segmentation[0] must be a polygon"),
    ("polygon-nested-pairs", _annotation(segmentation=[[[2, 2], [8, 2], [8, 8]]]), A5, "segmentation[0] must be"),
    ("polygon-nested-deeper", _annotation(segmentation=[[[2, 2]] * 6]), A5, "segmentation[0][0] (x)", "got [2, 2]"),
    ("second-polygon-bad", _annotation(segmentation=[[2, 2, 8, 2, 8, 8], [1, 1, 5, 1, None, 5]]), A5, "[1][4] (x)"),
    ("crowd-polygon-1e9", _annotation(iscrowd=1, segmentation=[[2, 2, 1e9, 2, 8, 8]]), A5, "within [-30, 60]"),
    # RLE (image 1: 20×30 = 600 pixels)
    ("rle-size-swapped", _rle([600], size=[30, 20]), A5, "RLE 'size' must be its image's [height, width] = [20, 30]"),
    ("rle-size-wrong", _rle([600], size=[20, 31]), A5, "RLE 'size' must be", "got [20, 31]"),
    ("rle-size-strings", _rle([600], size=["20", "30"]), A5, "RLE 'size' must be", "got ['20', '30']"),
    ("rle-size-floats", _rle([600], size=[20.0, 30.0]), A5, "RLE 'size' must be", "got [20.0, 30.0]"),
    ("rle-size-3", _rle([600], size=[20, 30, 1]), A5, "RLE 'size' must be", "got [20, 30, 1]"),
    ("rle-size-null", _rle([600], size=None), A5, "RLE 'size' must be", "got None"),
    ("rle-counts-beyond", _rle([0, 601]), A5, "must sum to height × width = 20 × 30 = 600", "to 601"),
    ("rle-counts-short", _rle([0, 500, 99]), A5, "RLE counts must sum to", "got 3 runs summing to 599"),
    ("rle-counts-empty", _rle([]), A5, "RLE counts must sum to", "got 0 runs summing to 0"),
    ("rle-counts-negative", _rle([0, 700, -100]), A5, "RLE counts must be >= 0, got -100 at counts[2]"),
    ("rle-counts-float", _rle([0, 600.0]), A5, "RLE counts must be integers, got 600.0 at counts[1]"),
    ("rle-counts-bool", _rle([0, True, 599]), A5, "RLE counts must be integers, got True at counts[1]"),
    ("rle-counts-null", _rle([None, 600]), A5, "RLE counts must be integers, got None at counts[0]"),
    ("rle-counts-missing", _rle(None), A5, "RLE counts must be a list of integers or a compressed string, got None"),
    ("rle-counts-number", _rle(600), A5, "RLE counts must be a list of integers or a compressed string, got 600"),
    ("rle-counts-object", _rle({"a": 1}), A5, "RLE counts must be a list of integers or a compressed string"),
    ("rle-string-garbage", _rle("zz!"), A5, "not a compressed RLE string", "character 'z' at 0"),
    ("rle-string-space", _rle("0 0"), A5, "not a compressed RLE string", "character ' ' at 1"),
    ("rle-string-unicode", _rle("0é"), A5, "not a compressed RLE string", "non-ASCII"),
    ("rle-string-over-runs", _rle(_compressed(21, 30)), A5, "RLE counts must sum to", "summing to 630"),
    ("rle-string-under-runs", _rle(_compressed(19, 30)), A5, "RLE counts must sum to", "summing to 570"),
    ("rle-string-cut-mid-run", _rle("0P"), A5, "not a compressed RLE string", "ends in the middle of a run"),
    ("rle-string-negative", _rle("A"), A5, "RLE counts must be >= 0, got -15 at counts[0]"),
    ("rle-string-run-too-long", _rle("P" * 7 + "0"), A5, "not a compressed RLE string", "more than 6 characters"),
    # A run padded with zero groups ("P": continuation, value 0) to 7 characters: pycocotools' 32-bit
    # shifts would misread it.
    ("rle-string-padded-run", _rle("X" + "P" * 5 + "0"), A5, "more than 6 characters"),
    ("polygon-zig-zag", _annotation(segmentation=[[-30, -20, 60, 40] * 400]), A5, "segmentation[0] has an outline",
     "more than 100 times"),
    ("bbox-outside", _annotation(bbox=[40, 2, 6, 6]), A5, "'bbox' [40, 2, 6, 6] lies outside its 30×20 image"),
    ("bbox-outside-left", _annotation(bbox=[-9, 2, 9, 6]), A5, "lies outside"),
    ("area-negative", _annotation(area=-1), A5, "'area' must be a finite number >= 0, got -1"),
    ("area-string", _annotation(area="big"), A5, "'area' must be a finite number >= 0, got 'big'"),
    ("category-name-number", _category(name=5), "category 7 (categories[0])", "'name' must be a string, got 5"),
    ("category-name-null", _category(name=None), "'name' must be a string, got None"),
    ("rle-string-empty", _rle(""), A5, "RLE counts must sum to", "got 0 runs"),
    ("crowd-rle-bad", _rle([0, 601], iscrowd=1), A5, "RLE counts must sum to"),
]
CASES = [pytest.param(content, fragments, id=name) for name, content, *fragments in _CASES]


def _assert_rejected(tmp_path, content, fragments) -> None:
    """Loading ``content`` raises exactly DatasetError, whose message names the file and holds ``fragments``."""
    path = tmp_path / "instances.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(json.dumps(content))  # NaN and Infinity as the literals Python's json reads back
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError) as error:
        InstanceDataset(path, tmp_path / "images")
    assert type(error.value) is DatasetError
    for fragment in (str(path), *fragments):
        assert fragment in str(error.value), f"{fragment!r} not in {str(error.value)!r}"


@pytest.mark.parametrize(("content", "fragments"), CASES)
def test_malformed_files_raise_dataset_error_naming_the_culprit(tmp_path, content, fragments):
    _assert_rejected(tmp_path, content, fragments)


def test_enough_distinct_cases():
    names = [case[0] for case in _CASES]
    assert len(names) >= 80 and len(set(names)) == len(names)


def test_a_1e9_polygon_never_reaches_pycocotools(tmp_path, monkeypatch):
    from pycocotools import mask as mask_utils

    def refuse(*args, **kwargs):
        raise AssertionError("pycocotools was called")

    for name in ("frPyObjects", "merge", "decode"):
        monkeypatch.setattr(mask_utils, name, refuse)
    path = coco_folder(tmp_path, [_changed(GOOD, {"segmentation": [[2, 2, 1e9, 2, 8, 8]]})])
    with pytest.raises(DatasetError, match=r"annotation 5 of image 1 .* must be a number within \[-30, 60\]"):
        InstanceDataset(path, tmp_path / "images")  # at construction: no sample can be drawn from the file


def test_pycocotools_errors_name_the_annotation(tmp_path, monkeypatch):
    from pycocotools import mask as mask_utils

    dataset = InstanceDataset(coco_folder(tmp_path, [GOOD]), tmp_path / "images")

    def invalid(*args, **kwargs):
        raise ValueError("Invalid RLE mask representation")

    monkeypatch.setattr(mask_utils, "decode", invalid)
    with pytest.raises(DatasetError, match="annotation 5 of image 1: Invalid RLE mask representation") as error:
        dataset[0]
    assert str(tmp_path / "ann.json") in str(error.value)


def test_good_files_load_and_decode_as_pycocotools_does(tmp_path):
    from pycocotools import mask as mask_utils

    square = np.zeros((20, 30), np.uint8, order="F")
    square[5:9, 10:20] = 1
    compressed = mask_utils.encode(square)
    uncompressed = {"size": RLE_SIZE, "counts": [255, 4, 16, 4, 321]}  # rows 15..18 of columns 12, 13
    segmentations = [
        [[-1, -1, 31, -1, 31, 21, -1, 21]],  # a pixel outside the image on every side
        [[2, 2, 8, 2, 8, 8], [20, 10, 29.5, 10, 29.5, 19.5, 20, 19.5]],  # two polygons, fractional
        {"size": RLE_SIZE, "counts": compressed["counts"].decode()},
        uncompressed,
    ]
    boxes = [[-1, -1, 32, 22], [2, 2, 27.5, 17.5], [10, 5, 10, 4], [12, 15, 2, 4]]
    annotations = [
        _changed(GOOD, {"id": i, "bbox": box, "segmentation": segmentation})
        for i, (box, segmentation) in enumerate(zip(boxes, segmentations), 1)
    ]
    crowd = [
        _changed(GOOD, {"id": 10, "iscrowd": 1, "segmentation": uncompressed}),
        _changed(GOOD, {"id": 11, "iscrowd": 1, "segmentation": annotations[2]["segmentation"]}),
    ]
    dataset = InstanceDataset(coco_folder(tmp_path, annotations + crowd), tmp_path / "images")
    masks = dataset[0]["masks"]
    expected = [
        mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentations[0], 20, 30))),
        mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentations[1], 20, 30))),
        square,
        mask_utils.decode(mask_utils.frPyObjects(uncompressed, 20, 30)),
    ]
    assert masks.shape == (4, 20, 30) and int(expected[0].sum()) == 600 and int(expected[3].sum()) == 8
    for mask, reference in zip(masks, expected):
        assert torch.equal(mask, torch.from_numpy(np.ascontiguousarray(reference)))
    assert dataset[0]["boxes"][0].tolist() == [0.0, 0.0, 30.0, 20.0]  # clipped to the image


def test_zero_area_boxes_are_skipped_with_one_warning_per_data_set(tmp_path):
    annotations = [_changed(GOOD, {"id": i}) for i in (1, 2)]
    annotations += [
        _changed(GOOD, {"id": i, "bbox": box})
        for i, box in ((4, [2, 2, 0, 6]), (9, [2, 2, 6, 0.0]), (12, [2, 2, 0, 0]))
    ]
    annotations.append(_changed(GOOD, {"id": 13, "bbox": [2, 2, 0, 6], "iscrowd": 1}))  # crowd: skipped anyway
    path = coco_folder(tmp_path, annotations)
    with pytest.warns(UserWarning) as record:
        dataset = InstanceDataset(path, tmp_path / "images")
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert messages == [f"3 annotations have a zero-area bbox in {path} and are skipped (ids 4, 9, 12)"]
    assert [a["id"] for a in dataset.annotations[1]] == [1, 2]
    assert dataset[0]["boxes"].shape == (2, 4)


def test_instances_empty_after_clipping_are_dropped_without_a_warning(tmp_path, recwarn):
    # The box reaches into the image, the polygon (within the margin) does not: an empty mask.
    outside = _changed(GOOD, {"bbox": [25, 2, 10, 6], "segmentation": [[31, 2, 40, 2, 40, 8]]})
    dataset = InstanceDataset(coco_folder(tmp_path, [outside]), tmp_path / "images")
    assert dataset[0]["boxes"].shape == (0, 4)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def _runs(mask: np.ndarray) -> list[int]:
    """COCO's run lengths of ``mask``: column-major, starting with a run of zeros."""
    flat = mask.ravel(order="F")
    bounds = np.concatenate(([0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]))
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


@pytest.mark.parametrize("seed", range(6))
def test_rle_string_decoder_reads_what_pycocotools_writes(seed):
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(1, 400, 2))
    masks = [
        rng.random((height, width)) < 0.5,  # many short runs: negative differences
        np.zeros((height, width), bool),
        np.ones((height, width), bool),
    ]
    block = np.zeros((height, width), bool)
    block[height // 3 :, width // 2 :] = True  # long runs: many characters per run
    for mask in [*masks, block]:
        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
        assert decode_rle_string(encoded) == decode_rle_string(encoded.decode()) == _runs(mask)
