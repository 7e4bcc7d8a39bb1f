"""Parity with the official DiffusionInst, stage by stage, each stage fed the recorded inputs of
that stage (teacher-forced; ``model_fixture.teacher_forced_inference``/``_training``), on the fused
ops and on the official formulations.

Rounding differences between CPUs cannot accumulate here, so every continuous output holds the
fixture's own tolerance, 1e-4 of each tensor's max |value| (``model_fixture.REL``): measured at
most 1.1e-5 on AMD EPYC (Zen 3, AVX2) with torch's default kernels and with every kernel family
forced down to scalar/SSE code (tests/data/README.md, "Drift"). Discrete decisions are exact.
"""

from __future__ import annotations

import pytest
import torch

from fastdiffinst.checkpoint import official_to_ours
from model_fixture import (
    INFERENCE_RUNS,
    assert_close_rel,
    assert_masks_match_away_from_threshold,
    official_nms_input,
    recorded_candidates,
    teacher_forced_inference,
    teacher_forced_training,
)

IMPLS = ["fused", "reference"]


@pytest.fixture(scope="module", params=[(run, impl) for run in INFERENCE_RUNS for impl in IMPLS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def forced(request):
    return teacher_forced_inference(*request.param)


@pytest.fixture(scope="module", params=IMPLS)
def forced_training(request):
    return teacher_forced_training(request.param)


def test_preprocessing(forced):
    ours, recorded = forced["pairs"]["image_tensor"]
    # One subtraction and one division per value, correctly rounded on every CPU: exact.
    assert torch.equal(ours, recorded)


@pytest.mark.parametrize("stage", ["res2", "res3", "res4", "res5", "p2", "p3", "p4", "p5", "p6"])
def test_backbone_stage(forced, stage):
    """Each ResNet stage from the recorded output of the one before (res2 from the image), the FPN
    from the recorded res2–res5."""
    assert_close_rel(*forced["pairs"][stage], what=stage)


def test_every_head_call(forced):
    """The mask branch from the recorded P2–P5, every head call from the recorded pyramid, boxes
    (fp32 at the first DDIM step, float64 after) and timesteps."""
    calls = forced["record"]["head_calls"]
    for k in range(len(calls)):
        for name in ("mask_feat", "class_logits", "boxes", "kernels"):
            assert_close_rel(*forced["pairs"][f"head{k}.{name}"], what=f"head call {k} {name}")


def test_renewal_decisions(forced):
    """Box renewal from the recorded last-stage logits keeps the recorded proposals."""
    for k, (keep, call) in enumerate(zip(forced["keep"], forced["record"]["head_calls"])):
        assert torch.equal(keep[0], call["keep_mask"]), f"head call {k}"
        assert int(keep.sum()) == call["num_remain"]


def _pairs(candidates):
    return [(int(p), int(c)) for p, c in zip(candidates.proposals, candidates.labels)]


def test_topk_candidates(forced):
    """Our top-k of each ensembled step's recorded logits: the recorded (proposal, class) set, with
    the recorded scores, boxes and filters."""
    record = forced["record"]
    expected = recorded_candidates(forced["run"])
    per_step = len(record["topk"][0]["flat_index"])
    assert len(forced["topk"]) == len(record["topk"])
    for j, (ours, topk) in enumerate(zip(forced["topk"], record["topk"])):
        assert sorted(_pairs(ours)) == sorted(zip(topk["proposal_index"].tolist(), topk["class"].tolist())), j
        part = expected[torch.arange(j * per_step, (j + 1) * per_step)]
        order = torch.argsort(ours.proposals * 1000 + ours.labels)
        other = torch.argsort(part.proposals * 1000 + part.labels)
        for name in ("boxes", "scores", "kernels"):
            assert_close_rel(getattr(ours, name)[order], getattr(part, name)[other], what=f"step {j} {name}")


def test_nms(forced):
    """Class-aware NMS of the recorded candidates keeps the recorded ones, in the recorded order."""
    nms = forced["record"]["nms_calls"][0]
    assert nms["num_in"] == len(official_nms_input(recorded_candidates(forced["run"])).scores)
    assert torch.equal(forced["nms_keep"], nms["keep"])


def test_mask_head(forced):
    """The dynamic mask head on the recorded mask features and the kept instances' recorded filters."""
    assert_close_rel(*forced["pairs"]["mask_logits"], what="mask logits")


def test_postprocess(forced):
    """Post-processing of the recorded detections, with their masks from the recorded filters and
    mask features: the recorded boxes, scores and classes, and the recorded masks except where our
    probability, off by its error (a few 1e-7), may lie on the other side of 0.5."""
    record, final = forced["record"], forced["final"]
    expected = record["final"]
    assert torch.equal(final["labels"], expected["pred_classes"])
    assert_close_rel(final["boxes"], expected["pred_boxes"], what="boxes")
    assert_close_rel(final["scores"], expected["scores"], what="scores")
    ours, _ = forced["pairs"]["mask_logits"]
    error = float((torch.sigmoid(ours) - record["postprocess_in"]["mask_probs"]).abs().max())
    assert_masks_match_away_from_threshold(final["masks"], record, error)


def test_training_head_and_mask_branch(forced_training):
    """The mask branch (batch statistics) and the head in training mode, from the recorded pyramid,
    noisy boxes and timesteps; the BatchNorm running statistics after that forward."""
    for name in ("mask_feat", "class_logits", "boxes", "kernels"):
        assert_close_rel(*forced_training["pairs"][name], what=name)
    record = forced_training["record"]
    for name, expected in record["mask_branch_bn_buffers_after"].items():
        got = forced_training["buffers"][official_to_ours(name)]
        if name.endswith("num_batches_tracked"):
            assert int(got) == int(expected) == 1, name
        else:
            assert_close_rel(got, expected, what=name)


def test_training_matcher_and_losses(forced_training):
    """The matcher and every loss on the recorded head outputs and mask features: the recorded
    selections exactly, each loss within 1e-5 (the fixture's loss tolerance; float32 sums of a few
    hundred terms of order 1 round at ~1e-7)."""
    record, losses = forced_training["record"], forced_training["losses"]
    for j, (stage, call) in enumerate(zip(forced_training["matches"], record["matcher_calls"])):
        for b, match in enumerate(stage):
            assert torch.equal(match.selected, call["selected_query"][b]), f"call {j} image {b}"
            assert torch.equal(match.gt_index, call["gt_indices"][b]), f"call {j} image {b}"
            assert torch.equal(match.query_per_gt, call["matched_query_per_gt"][b]), f"call {j} image {b}"
    assert set(losses) == set(record["losses"])
    for name, expected in record["losses"].items():
        assert abs(float(losses[name]) - expected) <= 1e-5, f"{name}: {float(losses[name])} vs {expected}"
