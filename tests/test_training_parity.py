"""Training parity with the official DiffusionInst on the golden fixture's ``train`` run: its
weights, batch, targets and replayed draws; the noisy head boxes, the matcher's selections
(exactly), the head outputs, every loss (1e-5 absolute), the gradients (last layers 1e-4, deeper
1e-2 relative L2) and the mask-branch BatchNorm buffers after the forward, on both ``ops_impl``s."""

from __future__ import annotations

import pytest
import torch

from fastdiffinst.checkpoint import official_to_ours as ours
from model_fixture import assert_close_rel, fixture, official_model, replay

LAST_LAYERS = ("controller", "mask_head.4", "class_logits", "bboxes_delta", "time_mlp")


@pytest.fixture(scope="module", params=["fused", "reference"])
def trained(request):
    record = fixture()["train"]
    model = official_model(1, request.param).train()
    images = [i["image_uint8"] for i in record["inputs"]]
    targets = [{"boxes": i["gt_boxes_xyxy"], "labels": i["gt_classes"], "masks": i["gt_masks_uint8"]}
               for i in record["inputs"]]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        draws = replay(record["draws"])
        outputs = model.training_outputs(images, targets, draws=draws)
        leftover = draws.remaining()
        buffers = {k: v.clone() for k, v in model.state_dict().items()}
        sum(outputs.losses.values()).backward()
    finally:
        torch.set_num_threads(threads)
    grads = {name: p.grad for name, p in model.named_parameters()}
    return dict(record=record, outputs=outputs, leftover=leftover, buffers=buffers, grads=grads)


def test_noisy_proposals_and_timesteps(trained):
    record, outputs = trained["record"], trained["outputs"]
    assert trained["leftover"] == 0
    assert outputs.boxes.dtype == torch.float64 == record["head_call"]["in_boxes"].dtype
    assert_close_rel(outputs.boxes, record["head_call"]["in_boxes"], rel=1e-6, what="noisy boxes")
    assert torch.equal(outputs.t, record["head_call"]["in_t"])
    torch.testing.assert_close(outputs.batch.tensor, record["image_tensor"], rtol=0, atol=1e-6)


def test_matcher_selections_exactly(trained):
    record, matches = trained["record"], trained["outputs"].matches
    assert len(matches) == len(record["matcher_calls"]) == 3  # the last stage, then stages 0 and 1
    for j, (stage, call) in enumerate(zip(matches, record["matcher_calls"])):
        for b, match in enumerate(stage):
            assert torch.equal(match.selected, call["selected_query"][b]), f"call {j} image {b}"
            assert torch.equal(match.gt_index, call["gt_indices"][b]), f"call {j} image {b}"
            assert torch.equal(match.query_per_gt, call["matched_query_per_gt"][b]), f"call {j} image {b}"
        assert [int(m.selected.sum()) for m in stage] == [4, 3]


def test_head_outputs(trained):
    call, head = trained["record"]["head_call"], trained["outputs"].head
    assert_close_rel(head.class_logits, call["class_logits"], what="class_logits")
    assert_close_rel(head.boxes, call["boxes"], what="boxes")
    assert_close_rel(head.kernels, call["kernels"], what="kernels")
    assert_close_rel(trained["outputs"].features.mask_feats, call["mask_feat"], what="mask_feat")


def test_every_loss(trained):
    record, losses = trained["record"], trained["outputs"].losses
    assert set(losses) == set(record["losses"])
    for name, expected in record["losses"].items():
        assert abs(float(losses[name]) - expected) <= 1e-5, f"{name}: {float(losses[name])} vs {expected}"
        weight = record["loss_weights"].get(name, 1.0)
        assert abs(float(losses[name]) / weight - record["losses_unweighted"][name]) <= 1e-5, name
    assert abs(float(sum(losses.values())) - record["total_loss"]) <= 1e-4


def test_gradients(trained):
    record, grads = trained["record"], trained["grads"]
    assert len(record["grad_keys"]) == 13
    for name in record["grad_keys"]:
        expected, got = record["grads"][name], grads[ours(name)]
        assert got is not None, name
        error = float((got.double() - expected.double()).norm() / expected.double().norm())
        limit = 1e-4 if any(part in name for part in LAST_LAYERS) else 1e-2
        assert error <= limit, f"{name}: relative L2 error {error:.2e} > {limit}"


def test_mask_branch_batchnorm_buffers_after_the_forward(trained):
    record, buffers = trained["record"], trained["buffers"]
    for name, expected in record["mask_branch_bn_buffers_after"].items():
        got = buffers[ours(name)]
        if name.endswith("num_batches_tracked"):
            assert int(got) == int(expected) == 1, name
        else:
            assert_close_rel(got, expected, rel=1e-5, what=name)
