"""The golden fixture of the official code (``tests/data/official_small.pt``, described in
``tests/data/README.md``): loading it, building the matching model, replaying its random draws,
and computing every recorded stage two ways.

* **Teacher-forced** (:func:`teacher_forced_inference`, :func:`teacher_forced_training`): each stage
  is fed the *recorded* inputs of that stage (a ResNet stage its recorded predecessor, the FPN the
  recorded res2–res5, every head call the recorded pyramid, boxes and timesteps, the mask head the
  recorded filters, post-processing the recorded detections). Rounding differences between CPUs do
  not accumulate from stage to stage, so these comparisons hold at the fixture's own tolerance.
* **End to end** (:func:`end_to_end_inference`): the model's own chain from the image, as a user
  runs it; rounding differences are amplified along it (see ``tests/data/README.md``, "Drift").

``tests/parity_drift.py`` prints the relative error of every comparison of both kinds; the parity
tests assert them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from fastdiffinst.checkpoint import load_official, official_to_ours
from fastdiffinst.config import get_config, replace_path
from fastdiffinst.modeling import DiffusionInst
from fastdiffinst.modeling.fpn import FPN
from fastdiffinst.modeling.postprocess import (
    Candidates,
    nms_keep,
    scale_and_clip_boxes,
    select_detections,
    topk_candidates,
)
from fastdiffinst.modeling.targets import prepare_targets
from utils import official_mask_probabilities64

FIXTURE = Path(__file__).resolve().parent / "data" / "official_small.pt"
# Relative tolerance of a teacher-forced stage: max |ours - recorded| <= REL · max |recorded|
# (tests/data/README.md, "Tolerances").
REL = 1e-4
# End-to-end relative tolerances (of each tensor's max |recorded value|) by quantity, each with the
# largest error measured over both implementations, all runs and the drift settings
# (tests/data/README.md, "Drift"; why the chain amplifies: test_model_parity.py).
END_TO_END = {
    "backbone": 1e-4,      # res2-res5, P2-P5: measured 8.4e-6
    "mask_feat": 1e-4,     # measured 1.4e-5 (2.9e-5 in the training run)
    "boxes": 1e-4,         # head inputs and outputs, detections, final boxes: measured 2.2e-5
    "class_logits": 3e-4,  # and the scores derived from them: measured 8.1e-5
    "kernels": 1e-3,       # the mask-head parameters (controller) and the mask logits: measured 3.6e-4
}
INFERENCE_RUNS = ("infer_step1", "infer_step4")
# A pair of tensors to compare: (ours, recorded).
Pair = tuple[Tensor, Tensor]


@functools.lru_cache(maxsize=1)
def fixture() -> dict:
    """The fixture; a missing file is an error, never a skip: the parity evidence is part of the
    repository."""
    if not FIXTURE.is_file():
        raise FileNotFoundError(f"the golden fixture is missing: {FIXTURE} (it is part of the repository; "
                                f"restore it with git checkout)")
    return torch.load(FIXTURE, weights_only=True)


@contextlib.contextmanager
def fixture_threads() -> Iterator[None]:
    """The fixture's intra-op thread count (2) for the duration, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(fixture()["torch_num_threads"])
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def official_model(sample_steps: int, ops_impl: str) -> DiffusionInst:
    """The fixture's configuration with its official weights, reproducing the official ensemble."""
    cfg = replace_path(get_config("official_small"), "sampler.sample_steps", sample_steps)
    cfg = replace_path(cfg, "sampler.official_ensemble", True)
    model = DiffusionInst(cfg, ops_impl=ops_impl).eval()
    load_official(model, fixture()["state_dict"])
    return model


def replay(draws: list[dict]):
    """A ``draws(shape, dtype, device)`` hook returning the recorded draws in order; it checks that
    each request has the recorded shape and dtype."""
    pending = iter(draws)

    def draw(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        record = next(pending, None)
        assert record is not None, f"an extra draw {shape} {dtype} that the official code did not make"
        value = record["value"]
        assert tuple(value.shape) == tuple(shape) and value.dtype == dtype, (
            f"draw {record['role']}: asked for {dtype} {tuple(shape)}, "
            f"the official code drew {value.dtype} {tuple(value.shape)}")
        return value.clone()

    draw.remaining = lambda: sum(1 for _ in pending)
    return draw


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected| (0 for empty tensors)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    if expected.numel() == 0:
        return 0.0
    error = float((actual.detach().double() - expected.detach().double()).abs().max())
    return error / max(float(expected.detach().double().abs().max()), 1e-12)


def assert_close_rel(actual: Tensor, expected: Tensor, rel: float = REL, what: str = "") -> None:
    """max |actual - expected| <= rel · max |expected|."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    error = relative_error(actual, expected)
    assert error <= rel, f"{what}: max error {error:.3g} of max |recorded| > {rel:g}"


def recorded_pyramid(run: str) -> list[Tensor]:
    """The recorded P2–P5 of ``run`` (the inference runs share the step-1 recording: same image and
    weights)."""
    record = fixture()["train" if run == "train" else "infer_step1"]
    return [record["backbone_fpn"][f"p{level}"] for level in range(2, 6)]


def recorded_candidates(run: str) -> Candidates:
    """The official ensemble's candidates in its ``topk`` order: step 1 from the recorded top-k of
    the last stage, step 4 the recorded ``inference_calls`` of the non-final steps, concatenated."""
    record = fixture()[run]
    if record["inference_calls"]:
        return Candidates.cat([Candidates(c["boxes"], c["scores"], c["classes"], c["kernels"], c["proposal_index"])
                               for c in record["inference_calls"]])
    topk, last = record["topk"][0], record["head_calls"][-1]
    proposal = topk["proposal_index"]
    return Candidates(last["boxes"][-1, 0, proposal], topk["scores"], topk["class"], last["kernels"][-1, 0, proposal],
                      proposal)


def official_nms_input(candidates: Candidates) -> Candidates:
    """What the official NMS sees: the candidates in their recorded order, boxes as float32."""
    return Candidates(candidates.boxes.float(), *(getattr(candidates, f) for f in ("scores", "labels", "kernels",
                                                                                    "proposals")))


def assert_masks_match_away_from_threshold(masks: Tensor, record: dict, probability_error: float) -> None:
    """Final ``masks`` equal the recorded ones except at pixels where a stride-4 probability off by
    up to ``probability_error`` may lie on the other side of 0.5: those whose probability in the
    official chain, recomputed in float64 from the recorded stride-4 probabilities, is that close
    to the threshold (+ a few float32 ulps of 0.5). Bilinear resampling is a convex combination, so
    it never enlarges the error."""
    inputs, expected = record["postprocess_in"], record["final"]
    assert masks.dtype == torch.bool and masks.shape == expected["pred_masks"].shape
    boxes = scale_and_clip_boxes(inputs["boxes"], tuple(inputs["image_size"]), tuple(expected["image_size"]))
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    probs64 = official_mask_probabilities64(inputs["mask_probs"][nonempty], tuple(inputs["mid_size"]),
                                            tuple(expected["image_size"]))
    near = (probs64 - 0.5).abs() <= probability_error + 1e-6
    differ = masks != expected["pred_masks"].bool()
    assert not (differ & ~near).any(), f"{int((differ & ~near).sum())} mask pixels differ away from the threshold"


# ------------------------------------------------------------------------------------------------
# Teacher-forced stages
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def teacher_forced_inference(run: str, ops_impl: str) -> dict:
    """Every stage of inference run ``run`` fed its recorded inputs. Returns ``pairs`` (name ->
    (ours, recorded), compared at :data:`REL`), and the discrete results: ``keep`` (per head call,
    the renewal decision from the recorded logits), ``topk`` (per ensembled step, our top-k of the
    recorded logits as a Candidates), ``nms_keep`` (NMS of the recorded candidates) and ``final``
    (post-processing of the recorded detections)."""
    record, step1 = fixture()[run], fixture()["infer_step1"]
    model = official_model(record["sample_step"], ops_impl)
    pairs: dict[str, Pair] = {}
    with fixture_threads():
        batch = model.preprocess([record["input_image_uint8"]])
        pairs["image_tensor"] = (batch.tensor, record["image_tensor"])
        resnet, res = model.backbone.bottom_up, step1["backbone_res"]
        stage_inputs = [resnet.stem(record["image_tensor"])] + [res[name] for name in resnet.stage_names[:-1]]
        for name, x in zip(resnet.stage_names, stage_inputs):
            pairs[name] = (getattr(resnet, name)(x), res[name])
        pyramid = model.backbone.top_down([res[name] for name in resnet.stage_names])
        for level, ours in zip(range(2, 6), pyramid):
            pairs[f"p{level}"] = (ours, step1["backbone_fpn"][f"p{level}"])
        pairs["p6"] = (FPN.p6(step1["backbone_fpn"]["p5"]), step1["backbone_fpn"]["p6"])

        features = model.pyramid_features(recorded_pyramid(run))
        keep, topk = [], []
        for k, call in enumerate(record["head_calls"]):
            pairs[f"head{k}.mask_feat"] = (features.mask_feats, call["mask_feat"])
            head = model.run_head(features, call["in_boxes"], call["in_t"])
            for name in ("class_logits", "boxes", "kernels"):
                pairs[f"head{k}.{name}"] = (getattr(head, name), call[name])
            keep.append(torch.sigmoid(call["class_logits"][-1]).amax(-1) > model.cfg.sampler.renewal_threshold)
        for k in _ensembled_calls(record):
            last = record["head_calls"][k]
            parts = topk_candidates(last["class_logits"][-1], last["boxes"][-1], last["kernels"][-1],
                                    model.cfg.num_proposals)
            topk.append(Candidates(*(part[0] for part in parts)))

        candidates = recorded_candidates(run)
        kept = nms_keep(official_nms_input(candidates), model.cfg.sampler.nms_iou)
        detections = candidates[record["nms_calls"][0]["keep"]]
        mask_feat = record["head_calls"][0]["mask_feat"]
        logits = model.mask_logits(mask_feat, detections.kernels, torch.zeros_like(detections.labels))
        pairs["mask_logits"] = (logits, record["mask_head_calls"][0]["mask_logits"][0])

        # Post-processing of the recorded detections, their masks from the recorded filters.
        expected = record["postprocess_in"]
        recorded = Candidates(expected["boxes"], expected["scores"], expected["classes"], detections.kernels,
                              detections.proposals)
        final = model.postprocess(recorded, mask_feat, 0, tuple(expected["image_size"]),
                                  tuple(record["final"]["image_size"]))
    return dict(run=run, record=record, pairs=pairs, keep=keep, topk=topk, nms_keep=kept, final=final)


def _ensembled_calls(record: dict) -> list[int]:
    """Head calls whose last stage feeds the ensemble: the non-final ones (the official ensemble
    drops the last step), or the only one."""
    calls = len(record["head_calls"])
    return list(range(calls - 1)) if calls > 1 else [0]


def training_batch() -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """The images and targets of the recorded training batch."""
    inputs = fixture()["train"]["inputs"]
    images = [i["image_uint8"] for i in inputs]
    targets = [{"boxes": i["gt_boxes_xyxy"], "labels": i["gt_classes"], "masks": i["gt_masks_uint8"]} for i in inputs]
    return images, targets


def teacher_forced_training(ops_impl: str) -> dict:
    """The training run's stages fed their recorded inputs: the mask branch (training-mode
    BatchNorm) and the head on the recorded pyramid, noisy boxes and timesteps; the matcher and the
    losses on the recorded head outputs and mask features. Returns ``pairs``, ``losses``,
    ``matches`` and the mask branch's ``buffers`` after its forward."""
    record = fixture()["train"]
    call = record["head_call"]
    model = official_model(1, ops_impl).train()
    images, targets = training_batch()
    pairs: dict[str, Pair] = {}
    with fixture_threads(), torch.no_grad():
        batch = model.preprocess(images)
        prepared = prepare_targets(targets, batch.image_sizes, tuple(batch.tensor.shape[2:]), model.cfg.num_classes,
                                   model.device, batch.tensor.dtype)
        features = model.pyramid_features(recorded_pyramid("train"))
        buffers = {name: value.clone() for name, value in model.state_dict().items()}
        pairs["mask_feat"] = (features.mask_feats, call["mask_feat"])
        head = model.run_head(features, call["in_boxes"], call["in_t"])
        for name in ("class_logits", "boxes", "kernels"):
            pairs[name] = (getattr(head, name), call[name])
        losses, matches = model.criterion(call["class_logits"], call["boxes"], call["kernels"], call["mask_feat"],
                                          prepared, model.impl.dice_sums, model._class_sampler(None, None))
    return dict(record=record, pairs=pairs, losses=losses, matches=matches, buffers=buffers)


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def end_to_end_inference(run: str, ops_impl: str) -> dict:
    """Inference run ``run`` from the image with the recorded draws replayed: the model's own
    intermediates (``res``, ``features``, ``steps``, ``candidates``, ``detections``,
    ``mask_logits``) and its ``final`` output, and ``leftover`` draws never asked for."""
    record = fixture()[run]
    model = official_model(record["sample_step"], ops_impl)
    with fixture_threads():
        batch = model.preprocess([record["input_image_uint8"]])
        res = model.backbone.bottom_up(batch.tensor)
        features = model.pyramid_features(model.backbone.top_down(res))
        draws = replay(record["draws"])
        steps = model.sample(features, batch.images_whwh, draws=draws)
        leftover = draws.remaining()
        candidates = model.candidates(steps)[0]
        detections = select_detections(candidates, model.cfg.sampler.nms_iou, True)
        index = torch.zeros(len(detections.scores), dtype=torch.int64)
        mask_logits = model.mask_logits(features.mask_feats, detections.kernels, index)
        final = model([record["input_image_uint8"]], output_sizes=[(record["input_height"], record["input_width"])],
                      draws=replay(record["draws"]))[0]
    return dict(run=run, record=record, batch=batch, res=res, features=features, steps=steps, leftover=leftover,
                candidates=candidates, detections=detections, mask_logits=mask_logits, final=final)


def end_to_end_training(ops_impl: str) -> dict:
    """The training run from the images with the recorded draws replayed, forward and backward:
    ``outputs`` (:class:`~fastdiffinst.modeling.detector.TrainingOutputs`), ``grads`` by our
    parameter name, the state's ``buffers`` after the forward and ``leftover`` draws."""
    model = official_model(1, ops_impl).train()
    images, targets = training_batch()
    with fixture_threads():
        draws = replay(fixture()["train"]["draws"])
        outputs = model.training_outputs(images, targets, draws=draws)
        leftover = draws.remaining()
        buffers = {k: v.clone() for k, v in model.state_dict().items()}
        sum(outputs.losses.values()).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return dict(record=fixture()["train"], outputs=outputs, leftover=leftover, buffers=buffers, grads=grads)


def end_to_end_pairs(run: str, result: dict) -> dict[str, Pair]:
    """The continuous end-to-end comparisons of an inference run, by name (the same names as the
    teacher-forced ones where a stage is the same)."""
    record = result["record"]
    pairs: dict[str, Pair] = {}
    if "backbone_res" in record:
        for name, ours in zip(("res2", "res3", "res4", "res5"), result["res"]):
            pairs[name] = (ours, record["backbone_res"][name])
        for level, ours in zip(range(2, 6), result["features"].pyramid):
            pairs[f"p{level}"] = (ours, record["backbone_fpn"][f"p{level}"])
    for k, (step, call) in enumerate(zip(result["steps"], record["head_calls"])):
        pairs[f"head{k}.in_boxes"] = (step.in_boxes, call["in_boxes"])
        pairs[f"head{k}.mask_feat"] = (result["features"].mask_feats, call["mask_feat"])
        for name in ("class_logits", "boxes", "kernels"):
            pairs[f"head{k}.{name}"] = (getattr(step.head, name), call[name])
    expected = record["postprocess_in"]
    detections = result["detections"]
    if len(detections.scores) == len(expected["scores"]):
        pairs["detections.boxes"] = (detections.boxes, expected["boxes"])
        pairs["detections.scores"] = (detections.scores, expected["scores"])
        pairs["mask_logits"] = (result["mask_logits"], record["mask_head_calls"][0]["mask_logits"][0])
        pairs["mask_probs"] = (torch.sigmoid(result["mask_logits"]), expected["mask_probs"])
    final, recorded = result["final"], record["final"]
    if len(final["scores"]) == len(recorded["scores"]):
        pairs["final.boxes"] = (final["boxes"], recorded["pred_boxes"])
        pairs["final.scores"] = (final["scores"], recorded["scores"])
    return pairs


def training_pairs(result: dict) -> dict[str, Pair]:
    """The continuous end-to-end comparisons of the training run's forward, by name."""
    call, outputs = result["record"]["head_call"], result["outputs"]
    pairs: dict[str, Pair] = {"in_boxes": (outputs.boxes, call["in_boxes"]),
                              "mask_feat": (outputs.features.mask_feats, call["mask_feat"])}
    for name in ("class_logits", "boxes", "kernels"):
        pairs[name] = (getattr(outputs.head, name), call[name])
    return pairs


def gradient_errors(result: dict) -> dict[str, float]:
    """Relative L2 error ``‖ours - recorded‖ / ‖recorded‖`` of every recorded gradient (official
    parameter names)."""
    errors = {}
    for name in result["record"]["grad_keys"]:
        expected, got = result["record"]["grads"][name].double(), result["grads"][official_to_ours(name)]
        assert got is not None, f"{name}: no gradient"
        errors[name] = float((got.double() - expected).norm() / expected.norm())
    return errors


def end_to_end_tolerance(name: str) -> float:
    """The :data:`END_TO_END` tolerance of comparison ``name`` (a key of :func:`end_to_end_pairs` or
    :func:`training_pairs`)."""
    quantity = name.split(".")[-1]
    if quantity in ("res2", "res3", "res4", "res5", "p2", "p3", "p4", "p5"):
        return END_TO_END["backbone"]
    if quantity in ("in_boxes", "boxes"):
        return END_TO_END["boxes"]
    if quantity in ("class_logits", "scores"):
        return END_TO_END["class_logits"]
    if quantity in ("kernels", "mask_logits"):
        return END_TO_END["kernels"]
    return END_TO_END[quantity]
