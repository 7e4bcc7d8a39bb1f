"""Box-diffusion ops: the schedule, q_sample_boxes and ddim_step_boxes against the official
formulation (per image, float64 buffers), the batched reference, the golden fixture, and each other;
the op contract (opcheck, torch.compile, unwritten outputs, empty batches: tests/op_contract.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastdiffinst.ops as fops
from conftest import devices
from fastdiffinst import _extension
from fastdiffinst.common.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, boxes_to_signal, signal_to_boxes
from fastdiffinst.common.diffusion import (
    FAKE_GT_BOX,
    PLACEHOLDER_MIN_SIZE,
    DiffusionSchedule,
    cosine_schedule,
    ddim_time_pairs,
)
from fastdiffinst.reference import box_diffusion as bd
from model_fixture import fixture as golden_fixture
from op_contract import OpContract

native = torch.ops.fastdiffinst
SCHEDULE = cosine_schedule()
SCALE = 2.0


@pytest.fixture(scope="module")
def fixture():
    return golden_fixture()


# ------------------------------------------------------------------------------------------------
# Schedule and box math
# ------------------------------------------------------------------------------------------------

def test_schedule_reference_values():
    """Reference values of ᾱ (docs/official-model.md §3.1), to 7 significant digits."""
    ac = SCHEDULE.alphas_cumprod
    assert ac.dtype == torch.float64 and ac.shape == (1000,)
    expected = {0: 0.9999587, 249: 0.8470122, 499: 0.4938436, 749: 0.1442721, 999: 2.428767e-09}
    for index, value in expected.items():
        assert f"{ac[index].item():.7g}" == f"{value:.7g}", (index, ac[index].item(), value)
    assert SCHEDULE.betas.max().item() == pytest.approx(0.999)  # only β_999 is clipped
    assert (SCHEDULE.betas[:-1] < 0.999).all()


def test_schedule_equals_official_buffers(fixture):
    """All 12 buffers equal the official model's registered buffers to within the rounding of
    float64 ``cos`` and ``log``. Both sides compute them with torch's vectorised float64 ``cos``
    and ``log``, whose AVX2 and AVX-512 variants are each accurate to 1 ulp but not equal: the
    official buffers themselves differ between CPUs (``betas`` by 2.2e-16 on an Intel Xeon against
    the AMD EPYC recording), and are bit-identical where the kernels are the recording's (AMD EPYC,
    AVX2). Moving every ``cos`` and ``log`` value by ±1 ulp moves the buffers by at most 1.1e-11
    relative (1.3e-15 absolute for ``betas``), measured over 40 random trials; the tolerance is 5×
    that."""
    state = fixture["state_dict"]
    for name in DiffusionSchedule.__dataclass_fields__:
        torch.testing.assert_close(getattr(SCHEDULE, name), state[name], rtol=5e-11, atol=5e-15, msg=name)


def test_ddim_time_pairs():
    assert ddim_time_pairs(1) == [(999, -1)]
    assert ddim_time_pairs(4) == [(999, 749), (749, 499), (499, 249), (249, -1)]
    with pytest.raises(ValueError, match="sampling_steps"):
        ddim_time_pairs(0)


def test_box_conversions_round_trip():
    g = torch.Generator().manual_seed(1)
    boxes = torch.rand(7, 4, generator=g, dtype=torch.float64)
    xyxy = box_cxcywh_to_xyxy(boxes)
    torch.testing.assert_close(xyxy[:, 2] - xyxy[:, 0], boxes[:, 2])
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), boxes)
    whwh = torch.tensor([[90.0, 60.0, 90.0, 60.0]], dtype=torch.float64)
    inside = box_cxcywh_to_xyxy(torch.tensor([[[0.5, 0.5, 0.4, 0.2]]], dtype=torch.float64)) * whwh[:, None]
    torch.testing.assert_close(signal_to_boxes(boxes_to_signal(inside, whwh), whwh), inside)


# ------------------------------------------------------------------------------------------------
# q_sample_boxes
# ------------------------------------------------------------------------------------------------

def make_gt(counts, max_gt, generator, dtype=torch.float32):
    """Per-image absolute xyxy GT boxes, image sizes, and the padded normalised cxcywh batch."""
    sizes = [(float(60 + 7 * b), float(45 + 5 * b)) for b in range(len(counts))]
    per_image, padded = [], torch.full((len(counts), max_gt, 4), float("nan"), dtype=dtype)
    for b, (count, (w, h)) in enumerate(zip(counts, sizes)):
        cxcywh = torch.rand(count, 4, generator=generator, dtype=torch.float64) * 0.5 + 0.2
        whwh = torch.tensor([w, h, w, h], dtype=torch.float64)
        xyxy = (box_cxcywh_to_xyxy(cxcywh) * whwh).to(dtype)
        per_image.append(xyxy)
        padded[b, :count] = box_xyxy_to_cxcywh(xyxy / whwh.to(dtype))
    whwh = torch.tensor([[w, h, w, h] for w, h in sizes], dtype=dtype)
    return per_image, sizes, padded, whwh


def official_batch(per_image, sizes, draws):
    """The official per-image formulation on the same draws."""
    whwh = torch.tensor([[w, h, w, h] for w, h in sizes])
    gt = [box_xyxy_to_cxcywh(boxes / whwh[b]) for b, boxes in enumerate(per_image)]
    return bd.official_training_boxes(gt, whwh, draws=draws, schedule=SCHEDULE, scale=SCALE)


def q_sample(padded, counts, draws, whwh, fn=fops.q_sample_boxes):
    return fn(padded, torch.tensor(counts), whwh, draws=draws, schedule=SCHEDULE, scale=SCALE)


COUNTS = [0, 1, 7, 23]  # no GT, one, some, more than N = 19


@pytest.mark.parametrize("counts", [COUNTS, [3], [0], [19, 19]])
def test_q_sample_matches_official_formulation(counts):
    g = torch.Generator().manual_seed(100 + sum(counts))
    n = 19
    per_image, sizes, padded, whwh = make_gt(counts, max(max(counts), 1), g)
    draws = fops.draw_q_sample_inputs(counts, n, g)
    ours = q_sample(padded, counts, draws, whwh)
    expected = official_batch(per_image, sizes, draws)
    assert ours.dtype == torch.float64 and ours.shape == (len(counts), n, 4)
    # The official code normalises and pads in float32, we in float64: ~1e-7 of the image size.
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(q_sample(padded, counts, draws, whwh, bd.q_sample_boxes), ours, rtol=0, atol=1e-12)


def test_q_sample_matches_golden_fixture(fixture):
    """The recorded training corruption of the official code, from its recorded draws."""
    train = fixture["train"]
    draws = [d["value"] for d in train["draws"]]  # per image: t, noise, placeholders
    n = train["head_call"]["in_boxes"].shape[1]
    whwh = train["images_whwh"]
    counts = [len(inp["gt_boxes_xyxy"]) for inp in train["inputs"]]
    padded = torch.zeros(len(counts), max(counts), 4)
    t, noise, placeholder = torch.zeros(2, dtype=torch.int64), torch.zeros(2, n, 4), torch.zeros(2, n, 4)
    select = torch.full((2, n), -1, dtype=torch.int64)
    for b, inp in enumerate(train["inputs"]):
        padded[b, :counts[b]] = box_xyxy_to_cxcywh(inp["gt_boxes_xyxy"] / whwh[b])
        t[b], noise[b], placeholder[b, counts[b]:] = draws[3 * b], draws[3 * b + 1], draws[3 * b + 2]
        select[b, :counts[b]] = torch.arange(counts[b])
    ours = q_sample(padded, counts, fops.QSampleDraws(t, noise, placeholder, select), whwh)
    torch.testing.assert_close(t, train["head_call"]["in_t"])
    torch.testing.assert_close(ours, train["head_call"]["in_boxes"], rtol=0, atol=1e-4)
    gt = [box_xyxy_to_cxcywh(inp["gt_boxes_xyxy"] / whwh[b]) for b, inp in enumerate(train["inputs"])]
    official = bd.official_training_boxes(gt, whwh, draws=fops.QSampleDraws(t, noise, placeholder, select),
                                          schedule=SCHEDULE)
    torch.testing.assert_close(official, train["head_call"]["in_boxes"], rtol=0, atol=0)


def test_q_sample_batch_equals_per_image():
    g = torch.Generator().manual_seed(5)
    per_image, sizes, padded, whwh = make_gt(COUNTS, 23, g)
    draws = fops.draw_q_sample_inputs(COUNTS, 19, g)
    batch = q_sample(padded, COUNTS, draws, whwh)
    for b in range(len(COUNTS)):
        one = fops.QSampleDraws(*(d[b:b + 1] for d in draws))
        torch.testing.assert_close(q_sample(padded[b:b + 1], COUNTS[b:b + 1], one, whwh[b:b + 1]), batch[b:b + 1],
                                   rtol=0, atol=0)


def test_q_sample_ignores_padding_rows_and_uses_placeholders():
    g = torch.Generator().manual_seed(6)
    _, _, padded, whwh = make_gt([2, 0], 4, g)  # padding rows are NaN
    draws = fops.draw_q_sample_inputs([2, 0], 6, g)
    out = q_sample(padded, [2, 0], draws, whwh)
    assert torch.isfinite(out).all()
    assert draws.select_index.tolist() == [[0, 1, -1, -1, -1, -1], [0, -1, -1, -1, -1, -1]]
    # At t = 0 the boxes are (almost) x0: image 1's slot 0 is the fake box (0.5, 0.5, 1, 1).
    zero = fops.QSampleDraws(torch.zeros(2, dtype=torch.int64), torch.zeros_like(draws.noise),
                             draws.placeholder_noise, draws.select_index)
    out0 = q_sample(padded, [2, 0], zero, whwh)
    torch.testing.assert_close(out0[1, 0], whwh[1].double() * torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64),
                               rtol=0, atol=1e-3)


@pytest.mark.parametrize("device", devices())
def test_q_sample_start_box_constants_are_the_references(device):
    """The kernels' constants of the starting boxes (csrc/ops/common/box_diffusion_math.h, exported
    as fastdiffinst._C.FAKE_GT_BOX and PLACEHOLDER_MIN_SIZE) are the references'
    (fastdiffinst.common.diffusion): an image without GT starts from the fake box, and placeholder
    sizes are clamped to at least the minimum size."""
    assert _extension.has_ops(), "fastdiffinst._C is not loaded"
    assert _extension._C.FAKE_GT_BOX == FAKE_GT_BOX
    assert _extension._C.PLACEHOLDER_MIN_SIZE == PLACEHOLDER_MIN_SIZE
    # With sqrt(alpha) = 1 and no noise, x_t is the starting box itself. Image 0 has no GT (slot 0:
    # the fake box); image 1 one GT and a placeholder (slot 0) whose draw of -6 gives the size
    # 0.5 - 1 < 0, clamped.
    whwh = torch.tensor([[64.0, 48.0, 64.0, 48.0]] * 2, dtype=torch.float64, device=device)
    placeholder_noise = torch.tensor([[[0.0] * 4], [[0.0, 0.0, -6.0, -6.0]]], device=device)
    out = native.q_sample_boxes(torch.zeros(2, 1, 4, device=device), torch.tensor([0, 1], device=device),
                                torch.zeros(2, dtype=torch.int64, device=device), torch.zeros(2, 1, 4, device=device),
                                placeholder_noise, torch.tensor([[0], [-1]], device=device),
                                torch.ones(1, dtype=torch.float64, device=device),
                                torch.zeros(1, dtype=torch.float64, device=device), SCALE, whwh)
    start = torch.tensor([FAKE_GT_BOX, [0.5, 0.5, PLACEHOLDER_MIN_SIZE, PLACEHOLDER_MIN_SIZE]], dtype=torch.float64,
                         device=device)
    expected = (box_cxcywh_to_xyxy(start) * whwh)[:, None]
    torch.testing.assert_close(out[0], expected[0], rtol=0, atol=0)  # exactly, in float64
    torch.testing.assert_close(out[1], expected[1], rtol=0, atol=1e-12)  # the size goes through the signal space


class TestQSampleContract(OpContract):
    """tests/op_contract.py on ``q_sample_boxes`` against the batched reference: no GT, one, some,
    more than N (NaN padding rows, which must be ignored), and an empty batch."""

    op = "q_sample_boxes"

    def make_inputs(self, variant):
        g = torch.Generator().manual_seed(7)
        _, _, padded, whwh = make_gt(COUNTS, 23, g)
        return padded, torch.tensor(COUNTS), whwh, fops.draw_q_sample_inputs(COUNTS, 19, g)

    def make_empty_inputs(self, variant):
        draws = fops.QSampleDraws(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 5, 4), torch.zeros(0, 5, 4),
                                  torch.zeros(0, 5, dtype=torch.int64))
        return torch.zeros(0, 0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4), draws

    def call(self, gt_boxes, gt_counts, images_whwh, draws):
        return fops.q_sample_boxes(gt_boxes, gt_counts, images_whwh, draws=draws, schedule=SCHEDULE, scale=SCALE)

    def reference(self, gt_boxes, gt_counts, images_whwh, draws):
        return bd.q_sample_boxes(gt_boxes, gt_counts, images_whwh, draws=draws, schedule=SCHEDULE, scale=SCALE)

    def opcheck_cases(self, backend, requires_grad):
        padded, counts, whwh, draws = self.make_inputs("default")
        return [(native.q_sample_boxes, (torch.nan_to_num(padded), counts, *draws, SCHEDULE.sqrt_alphas_cumprod,
                                         SCHEDULE.sqrt_one_minus_alphas_cumprod, SCALE, whwh))]


# ------------------------------------------------------------------------------------------------
# ddim_step_boxes
# ------------------------------------------------------------------------------------------------

def make_step(batch, n, generator, keep_fraction=0.5):
    whwh = torch.tensor([[80.0 + 9 * b, 50.0 + 4 * b] * 2 for b in range(batch)])
    x_t = torch.randn(batch, n, 4, generator=generator)
    pred = box_cxcywh_to_xyxy(torch.rand(batch, n, 4, generator=generator) * 0.6 + 0.2) * whwh[:, None]
    keep = torch.rand(batch, n, generator=generator) < keep_fraction
    noise, renew = fops.draw_ddim_noise(batch, n, generator)
    return x_t, pred, whwh, keep, noise, renew


def ddim_step(x_t, pred, whwh, keep, t, t_next, noise, renew, eta=1.0, fn=fops.ddim_step_boxes, schedule=SCHEDULE):
    return fn(x_t, whwh, pred_boxes=pred, keep=keep, t=t, t_next=t_next, schedule=schedule, noise=noise,
              renew_noise=renew, eta=eta, scale=SCALE)


def official_step(x_t, pred, whwh, keep, t, t_next, noise, renew, eta=1.0):
    """The official step per image; our fixed-shape draws mapped to its shapes."""
    outs = []
    for b in range(x_t.shape[0]):
        kept = int(keep[b].sum())
        img, _ = bd.official_ddim_step(x_t[b:b + 1], pred[b:b + 1], whwh[b:b + 1], keep[b], t, t_next, SCHEDULE, eta,
                                       noise[b:b + 1, :kept], renew[b:b + 1, kept:])
        outs.append(img)
    return outs


@pytest.mark.parametrize("t, t_next", [(999, 749), (749, 499), (249, 0), (999, -1)])
def test_ddim_matches_official_formulation(t, t_next):
    g = torch.Generator().manual_seed(200 + t)
    x_t, pred, whwh, keep, noise, renew = make_step(3, 17, g)
    keep[1] = False          # nothing kept
    keep[2] = True           # everything kept
    x_next, x0, next_boxes, num_kept = ddim_step(x_t, pred, whwh, keep, t, t_next, noise, renew)
    assert num_kept.tolist() == keep.sum(1).tolist()
    assert x_next.dtype == x0.dtype == next_boxes.dtype == torch.float64 and num_kept.dtype == torch.int64
    official = official_step(x_t, pred, whwh, keep, t, t_next, noise, renew)
    for b in range(3):
        kept = int(num_kept[b])
        if t_next < 0:
            # The final step returns x̂0; the official code keeps only the renewed rows.
            torch.testing.assert_close(x_next[b, keep[b]], official[b][0].double(), rtol=1e-6, atol=1e-6)
        else:
            torch.testing.assert_close(x_next[b], official[b][0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(x_next[b, kept:], renew[b, kept:].double(), rtol=0, atol=0)
    torch.testing.assert_close(next_boxes, signal_to_boxes(x_next, whwh.double()), rtol=0, atol=1e-9)
    ref = ddim_step(x_t, pred, whwh, keep, t, t_next, noise, renew, fn=bd.ddim_step_boxes)
    for a, e in zip((x_next, x0, next_boxes, num_kept), ref):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_ddim_renewal_order_and_counts():
    """Kept proposals move to the front in their original order; each image keeps its own count."""
    g = torch.Generator().manual_seed(300)
    x_t, pred, whwh, keep, noise, renew = make_step(4, 11, g)
    keep = torch.tensor([[i % 2 == 0 for i in range(11)], [i in (3, 10) for i in range(11)],
                         [False] * 11, [True] * 11])
    x_next, x0, _, num_kept = ddim_step(x_t, pred, whwh, keep, 749, 499, noise, renew, eta=0.0)
    assert num_kept.tolist() == [6, 2, 0, 11]
    # With eta = 0 the update is deterministic per proposal: x_next[p] depends only on the p-th kept one.
    alpha, alpha_next = SCHEDULE.alphas_cumprod[749], SCHEDULE.alphas_cumprod[499]
    eps = (torch.sqrt(1 / alpha) * x_t.double() - x0) / torch.sqrt(1 / alpha - 1)
    expected = x0 * torch.sqrt(alpha_next) + torch.sqrt(1 - alpha_next) * eps
    for b in range(4):
        kept = keep[b].nonzero().squeeze(1)
        torch.testing.assert_close(x_next[b, :len(kept)], expected[b, kept], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x_next[b, len(kept):], renew[b, len(kept):].double(), rtol=0, atol=0)


def test_ddim_batch_equals_per_image():
    g = torch.Generator().manual_seed(301)
    args = make_step(3, 13, g)
    batch = ddim_step(*args[:4], 999, 749, *args[4:])
    for b in range(3):
        one = [a[b:b + 1] for a in args]
        single = ddim_step(*one[:4], 999, 749, *one[4:])
        for a, e in zip(single, batch):
            torch.testing.assert_close(a, e[b:b + 1], rtol=0, atol=0)


STORAGE_TYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", STORAGE_TYPES)
def test_inputs_are_read_in_their_storage_type(dtype):
    """The kernels read float64, float32, float16 and bfloat16 inputs (contiguous or not) as the
    float64 values they hold, without converted copies: the results equal those of the float64 inputs."""
    g = torch.Generator().manual_seed(302)
    x_t, pred, whwh, keep, noise, renew = make_step(2, 9, g)
    stored = [a.to(dtype) for a in (x_t, pred, whwh, noise, renew)]
    # Every other proposal of a twice-as-long tensor: not contiguous.
    strided = [torch.stack([a, torch.full_like(a, float("nan"))], dim=-2).flatten(-3, -2)[..., ::2, :]
               if a.dim() == 3 else a for a in stored]
    assert not strided[0].is_contiguous()
    x_t, pred, whwh, noise, renew = (a.double() for a in stored)
    expected = ddim_step(x_t, pred, whwh, keep, 999, 749, noise, renew)
    for inputs in (stored, strided):
        x_t, pred, whwh, noise, renew = inputs
        for a, e in zip(ddim_step(x_t, pred, whwh, keep, 999, 749, noise, renew), expected):
            torch.testing.assert_close(a, e, rtol=0, atol=0)

    _, _, padded, whwh = make_gt(COUNTS, 23, g)
    padded = torch.nan_to_num(padded)
    draws = fops.draw_q_sample_inputs(COUNTS, 19, g)
    stored_draws = draws._replace(noise=draws.noise.to(dtype), placeholder_noise=draws.placeholder_noise.to(dtype))
    wide_draws = draws._replace(noise=stored_draws.noise.double(),
                                placeholder_noise=stored_draws.placeholder_noise.double())
    expected = q_sample(padded.to(dtype).double(), COUNTS, wide_draws, whwh.to(dtype).double())
    ours = q_sample(padded.to(dtype), COUNTS, stored_draws, whwh.to(dtype))
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_valid_calls_skip_the_python_checks(monkeypatch):
    """On the native kernels the Python argument checks run only to name an argument the kernel
    refused: a valid call pays none of their host time, a bad one still gets their message."""
    from fastdiffinst.ops import box_diffusion as ops_module

    calls = []
    for name in ("_check_ddim_step_args", "_check_q_sample_args"):
        check = getattr(ops_module, name)
        monkeypatch.setattr(ops_module, name, lambda *a, check=check, name=name: calls.append(name) or check(*a))
    fops.ddim_step_boxes(**_d_args())
    fops.q_sample_boxes(**_q_args())
    assert calls == []
    with pytest.raises(ValueError, match="pred_boxes has batch size 3") as refused:
        fops.ddim_step_boxes(**_d_args(pred_boxes=torch.zeros(3, 5, 4)))
    assert refused.value.__context__ is None  # not chained to the kernel's error
    with pytest.raises(ValueError, match="draws.noise has batch size 3"):
        fops.q_sample_boxes(**_q_args(noise=torch.zeros(3, 4, 4)))
    assert calls == ["_check_ddim_step_args", "_check_q_sample_args"]
    # The reference backend has no checks of its own: they run first.
    with fops.use_backend("ddim_step_boxes", "reference"):
        fops.ddim_step_boxes(**_d_args())
    assert calls[-1] == "_check_ddim_step_args"


def test_ddim_matches_golden_fixture(fixture):
    """Four official DDIM steps with renewal, replayed from the recorded draws: every recorded head
    input is reproduced from the previous step's recorded predictions."""
    run = fixture["infer_step4"]
    draws = [d["value"] for d in run["draws"]]
    whwh = run["images_whwh"]
    x_t = draws[0]
    n = x_t.shape[1]
    torch.testing.assert_close(signal_to_boxes(x_t.double(), whwh.double()).float(),
                               run["head_calls"][0]["in_boxes"], rtol=0, atol=1e-4)
    eta_draws = iter(draws[1:])
    for k, (t, t_next) in enumerate(run["ddim_time_pairs"]):
        call = run["head_calls"][k]
        keep = call["keep_mask"][None]
        kept = int(keep.sum())
        noise, renew = torch.zeros(1, n, 4), torch.zeros(1, n, 4)
        if t_next >= 0:
            noise[:, :kept] = next(eta_draws).float()
            renew[:, kept:] = next(eta_draws)
        x_next, _, next_boxes, num_kept = ddim_step(x_t, call["boxes"][-1], whwh, keep, t, t_next, noise, renew)
        assert int(num_kept) == call["num_remain"]
        if t_next >= 0:
            torch.testing.assert_close(next_boxes, run["head_calls"][k + 1]["in_boxes"].double(), rtol=1e-6, atol=1e-4)
        x_t = x_next


class TestDDIMStepContract(OpContract):
    """tests/op_contract.py on ``ddim_step_boxes`` against the batched reference: a step with
    renewal and the final step (t_next = -1), and no proposals."""

    op = "ddim_step_boxes"
    variants = ("749 -> 499", "749 -> -1")
    compile_variants = ("999 -> 749",)

    def make_inputs(self, variant):
        t, t_next = (int(step) for step in variant.split(" -> "))
        x_t, pred, whwh, keep, noise, renew = make_step(3, 9, torch.Generator().manual_seed(302))
        return x_t, whwh, pred, keep, t, t_next, noise, renew

    def make_empty_inputs(self, variant):
        empty = torch.zeros(2, 0, 4)
        return empty, torch.ones(2, 4), empty, torch.zeros(2, 0, dtype=torch.bool), 999, 749, empty, empty

    def call(self, x_t, images_whwh, pred_boxes, keep, t, t_next, noise, renew_noise):
        return ddim_step(x_t, pred_boxes, images_whwh, keep, t, t_next, noise, renew_noise)

    def reference(self, x_t, images_whwh, pred_boxes, keep, t, t_next, noise, renew_noise):
        return ddim_step(x_t, pred_boxes, images_whwh, keep, t, t_next, noise, renew_noise, fn=bd.ddim_step_boxes)

    def opcheck_cases(self, backend, requires_grad):
        x_t, whwh, pred, keep, t, t_next, noise, renew = self.make_inputs("999 -> 749")
        return [(native.ddim_step_boxes,
                 (x_t, pred, whwh, keep, t, t_next, SCHEDULE.alphas_cumprod, 1.0, SCALE, noise, renew))]


# ------------------------------------------------------------------------------------------------
# Draw helpers
# ------------------------------------------------------------------------------------------------

def test_draw_distributions():
    g = torch.Generator().manual_seed(400)
    draws = fops.draw_q_sample_inputs([0, 3, 700], 500, g)
    assert draws.t.dtype == torch.int64 and draws.select_index.dtype == torch.int64
    for name in ("noise", "placeholder_noise"):
        x = getattr(draws, name)
        assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02, name
    many = fops.draw_q_sample_inputs([1] * 4000, 1, g).t.double()
    assert 0 <= many.min() and many.max() <= 999
    assert abs(many.mean().item() - 499.5) < 15 and abs(many.std().item() - 288.7) < 10
    subset = draws.select_index[2]
    assert len(set(subset.tolist())) == 500 and subset.max() < 700 and (subset.diff() > 0).all()
    assert draws.select_index[0].tolist() == [0] + [-1] * 499
    assert draws.select_index[1, :4].tolist() == [0, 1, 2, -1]
    # Every GT is equally likely to be kept.
    hits = torch.zeros(10)
    for _ in range(400):
        hits[fops.draw_q_sample_inputs([10], 5, g).select_index[0]] += 1
    assert (hits / 400 - 0.5).abs().max() < 0.1
    noise, renew = fops.draw_ddim_noise(2, 300, g)
    assert abs(noise.std().item() - 1) < 0.05 and abs(renew.mean().item()) < 0.05
    # Same seed, same draws.
    a = fops.draw_q_sample_inputs([2, 9], 7, torch.Generator().manual_seed(1))
    b = fops.draw_q_sample_inputs([2, 9], 7, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def _q_args(**changes):
    """The arguments of q_sample_boxes for a small valid case (B = 2, G = 3, N = 4), with
    ``changes``: arguments by name, or fields of the draws (``t``, ``noise``, ...)."""
    g = torch.Generator().manual_seed(500)
    _, _, padded, whwh = make_gt([2, 1], 3, g)
    draws = fops.draw_q_sample_inputs([2, 1], 4, g)
    draws = draws._replace(**{name: changes.pop(name) for name in list(changes) if name in draws._fields})
    args = dict(gt_boxes=torch.nan_to_num(padded), gt_counts=torch.tensor([2, 1]), images_whwh=whwh, draws=draws,
                schedule=SCHEDULE, scale=SCALE)
    return args | changes


@pytest.mark.parametrize("name, value, error, match", [
    ("gt_boxes", torch.zeros(2, 3), ValueError, r"gt_boxes must be \[B, G, 4\]"),
    ("gt_counts", torch.tensor([2]), ValueError, r"gt_counts must be \[2\]"),
    ("gt_counts", torch.tensor([2.0, 1.0]), TypeError, "gt_counts must be torch.int64"),
    ("t", torch.tensor([1, 2, 3]), ValueError, r"draws.t must be \[2\]"),
    ("noise", torch.zeros(3, 4, 4), ValueError, "draws.noise has batch size 3"),
    ("placeholder_noise", torch.zeros(2, 5, 4), ValueError, "draws.placeholder_noise has 5 proposals"),
    ("select_index", torch.zeros(2, 4), ValueError, "draws.select_index must be int64"),
    ("images_whwh", torch.zeros(2, 3), ValueError, r"images_whwh must be \[B, 4\]"),
    ("scale", 0.0, ValueError, "scale must be a positive"),
    ("draws", (1, 2, 3, 4), TypeError, "draws must be a QSampleDraws"),
    ("schedule", SCHEDULE.sqrt_alphas_cumprod, TypeError, "schedule must be a DiffusionSchedule"),
    ("schedule", dataclasses.replace(SCHEDULE, sqrt_one_minus_alphas_cumprod=SCHEDULE.betas[:10]), ValueError,
     r"schedule.sqrt_one_minus_alphas_cumprod must be a non-empty \[T\] buffer"),
])
def test_q_sample_bad_arguments(name, value, error, match):
    with pytest.raises(error, match=match):
        fops.q_sample_boxes(**_q_args(**{name: value}))


@pytest.mark.parametrize("name, value, match", [
    ("gt_counts", torch.tensor([4, 1]), r"gt_counts\[0\] must be in \[0, G = 3\]"),
    ("gt_counts", torch.tensor([-1, 1]), r"gt_counts\[0\] must be in"),
    ("t", torch.tensor([0, 1000]), r"q_sample_boxes: draws.t\[1\] must be in \[0, 1000\)"),
    ("t", torch.tensor([-1, 5]), r"draws.t\[0\] must be in"),
    ("select_index", torch.tensor([[0, 1, 2, -1], [0, -1, -1, -1]]),
     r"draws.select_index\[0, 2\] must be -1 or in \[0, 2\)"),
    ("select_index", torch.tensor([[0, 1, -1, -1], [0, -2, -1, -1]]), r"draws.select_index\[1, 1\]"),
    ("noise", torch.full((2, 4, 4), float("nan")), r"draws.noise\[0, 0\] must be finite"),
    ("placeholder_noise", torch.full((2, 4, 4), float("inf")), r"draws.placeholder_noise\[0, 0\] must be finite"),
])
def test_q_sample_bad_values(name, value, match):
    with pytest.raises(RuntimeError, match=match):
        fops.q_sample_boxes(**_q_args(**{name: value}))


def test_q_sample_non_finite_gt_and_whwh():
    args = _q_args()
    args["gt_boxes"][1, 0, 2] = float("inf")
    with pytest.raises(RuntimeError, match=r"gt_boxes\[1, 0\] must be finite"):
        fops.q_sample_boxes(**args)
    args = _q_args()
    args["images_whwh"][0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"images_whwh\[0\] must be finite"):
        fops.q_sample_boxes(**args)


def test_q_sample_bad_schedule_and_sizes():
    args = _q_args()
    bad = SCHEDULE.sqrt_alphas_cumprod.clone()
    bad[args["draws"].t[1]] = float("nan")  # the entry image 1 reads
    with pytest.raises(RuntimeError, match=r"schedule must hold values in \[0, 1\].*sqrt_alphas_cumprod\["):
        fops.q_sample_boxes(**(args | dict(schedule=dataclasses.replace(SCHEDULE, sqrt_alphas_cumprod=bad))))
    args = _q_args()
    args["images_whwh"][1, 2] = 0.0
    with pytest.raises(RuntimeError, match=r"images_whwh\[1\] must hold positive sizes"):
        fops.q_sample_boxes(**args)


def _d_args(**changes):
    """The arguments of ddim_step_boxes for a small valid case (B = 2, N = 5), with ``changes``."""
    g = torch.Generator().manual_seed(501)
    x_t, pred, whwh, keep, noise, renew = make_step(2, 5, g)
    args = dict(x_t=x_t, images_whwh=whwh, pred_boxes=pred, keep=keep, t=999, t_next=749, schedule=SCHEDULE,
                noise=noise, renew_noise=renew, eta=1.0, scale=SCALE)
    return args | changes


@pytest.mark.parametrize("name, value, error, match", [
    ("x_t", torch.zeros(2, 5), ValueError, r"x_t must be \[B, N, 4\]"),
    ("pred_boxes", torch.zeros(3, 5, 4), ValueError, "pred_boxes has batch size 3"),
    ("keep", torch.ones(2, 5), ValueError, "keep must be bool"),
    ("keep", torch.ones(2, 4, dtype=torch.bool), ValueError, "keep must be bool"),
    ("t", 1000, ValueError, r"t must be in \[0, 1000\)"),
    ("t", -1, ValueError, r"t must be in \[0, 1000\)"),
    ("t_next", 999, ValueError, "t_next must be in"),
    ("t_next", -2, ValueError, "t_next must be in"),
    ("eta", -0.5, ValueError, "eta must be"),
    ("noise", torch.zeros(2, 4, 4), ValueError, "noise has 4 proposals"),
    ("images_whwh", torch.zeros(1, 4), ValueError, r"images_whwh must be \[B, 4\]"),
    ("schedule", SCHEDULE.alphas_cumprod, TypeError, "schedule must be a DiffusionSchedule"),
    ("schedule", dataclasses.replace(SCHEDULE, alphas_cumprod=SCHEDULE.alphas_cumprod[:0]), ValueError,
     r"schedule.alphas_cumprod must be a non-empty \[T\] buffer"),
])
def test_ddim_bad_arguments(name, value, error, match):
    with pytest.raises(error, match=match):
        fops.ddim_step_boxes(**_d_args(**{name: value}))


@pytest.mark.parametrize("name", ["x_t", "pred_boxes", "images_whwh", "noise", "renew_noise"])
def test_ddim_non_finite_inputs(name):
    args = _d_args()
    args[name].view(-1)[1] = float("nan")
    with pytest.raises(RuntimeError, match="must be finite"):
        fops.ddim_step_boxes(**args)


def test_ddim_bad_schedule_eta_and_sizes():
    with pytest.raises(RuntimeError, match="eta = 2(.0)? is too large for the step 999 -> 749"):
        fops.ddim_step_boxes(**_d_args(eta=2.0))  # sigma^2 > 1 - alpha_next
    for bad in (torch.zeros(1000, dtype=torch.float64), torch.full((1000,), 1.5, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match=r"alphas_cumprod\[t = 999\] must be in \(0, 1\)"):
            fops.ddim_step_boxes(**_d_args(schedule=dataclasses.replace(SCHEDULE, alphas_cumprod=bad)))
    args = _d_args()
    with pytest.raises(RuntimeError, match=r"images_whwh\[0\] must hold positive sizes"):
        fops.ddim_step_boxes(**(args | dict(images_whwh=torch.zeros_like(args["images_whwh"]))))


# ------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.cuda)])
def test_cuda_matches_cpu(device):
    g = torch.Generator().manual_seed(600)
    _, _, padded, image_whwh = make_gt(COUNTS, 23, g)
    padded = torch.nan_to_num(padded)
    draws = fops.draw_q_sample_inputs(COUNTS, 300, g)  # > one CUDA block of proposals
    schedule = _schedule_on(device)
    cpu = q_sample(padded, COUNTS, draws, image_whwh)
    cuda = fops.q_sample_boxes(padded.to(device), torch.tensor(COUNTS, device=device), image_whwh.to(device),
                               draws=fops.QSampleDraws(*(d.to(device) for d in draws)), schedule=schedule, scale=SCALE)
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=1e-9)
    args = make_step(3, 600, g)
    for t_next in (749, -1):
        cpu_out = ddim_step(*args[:4], 999, t_next, *args[4:])
        x_t, pred, whwh, keep, noise, renew = (a.to(device) for a in args)
        cuda_out = fops.ddim_step_boxes(x_t, whwh, pred_boxes=pred, keep=keep, t=999, t_next=t_next, schedule=schedule,
                                        noise=noise, renew_noise=renew, eta=1.0, scale=SCALE)
        for a, e in zip(cuda_out, cpu_out):
            # nvcc contracts multiply-adds into FMAs, which round once instead of twice: the fp64
            # results differ from the CPU's in the last bits (up to 1.3e-11 on an H200).
            torch.testing.assert_close(a.cpu(), e, rtol=1e-9, atol=1e-10)
    torch.library.opcheck(native.ddim_step_boxes, (x_t, pred, whwh, keep, 999, 749, schedule.alphas_cumprod, 1.0,
                                                   SCALE, noise, renew))
    # Inputs in every storage type, read without conversion launches, as the CPU kernel reads them.
    for dtype in STORAGE_TYPES:
        stored_draws = draws._replace(noise=draws.noise.to(dtype), placeholder_noise=draws.placeholder_noise.to(dtype))
        cpu = q_sample(padded.to(dtype), COUNTS, stored_draws, image_whwh.to(dtype))
        cuda = fops.q_sample_boxes(padded.to(device=device, dtype=dtype), torch.tensor(COUNTS, device=device),
                                   image_whwh.to(device=device, dtype=dtype),
                                   draws=fops.QSampleDraws(*(d.to(device) for d in stored_draws)), schedule=schedule,
                                   scale=SCALE)
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=1e-9)
        stored = [a.to(dtype) if a.is_floating_point() else a for a in args]
        cpu_out = ddim_step(*stored[:4], 999, 749, *stored[4:])
        cuda_out = ddim_step(*(a.to(device) for a in stored[:4]), 999, 749, *(a.to(device) for a in stored[4:]),
                             schedule=schedule)
        for a, e in zip(cuda_out, cpu_out):
            torch.testing.assert_close(a.cpu(), e, rtol=1e-9, atol=1e-10)


def _schedule_on(device):
    return DiffusionSchedule(*(getattr(SCHEDULE, f).to(device) for f in DiffusionSchedule.__dataclass_fields__))


def test_devices_helper_lists_cuda():
    assert [getattr(d, "values", (d,))[0] for d in devices()] == ["cpu", "cuda"]


def test_synchronising_value_checks_of_the_cuda_path():
    """The checks set_input_checks(True) adds on CUDA are device-agnostic: run them on CPU tensors."""
    from fastdiffinst.ops.box_diffusion import _check_ddim_step_values, _check_q_sample_values

    def q_sample_values(**changes):
        args = _q_args(**changes)
        _check_q_sample_values(args["gt_boxes"], args["gt_counts"], args["images_whwh"], args["draws"],
                               changes.get("sqrt_alphas_cumprod", SCHEDULE.sqrt_alphas_cumprod),
                               SCHEDULE.sqrt_one_minus_alphas_cumprod)

    q_sample_values()  # valid: no error
    # The index checks have the CPU kernel's messages (test_q_sample_bad_values).
    for bad, match in [
        (dict(gt_counts=torch.tensor([4, 1])), r"gt_counts\[0\] must be in \[0, G = 3\], got 4"),
        (dict(gt_counts=torch.tensor([1, -1])), r"gt_counts\[1\] must be in \[0, G = 3\], got -1"),
        (dict(t=torch.tensor([0, 1000])), r"q_sample_boxes: draws.t\[1\] must be in \[0, 1000\), got 1000"),
        (dict(select_index=torch.tensor([[0, 1, -1, -1], [0, 1, -1, -1]])),
         r"draws.select_index\[1, 1\] must be -1 or in \[0, 1\), got 1"),
        (dict(select_index=torch.tensor([[0, -2, -1, -1], [0, -1, -1, -1]])),
         r"draws.select_index\[0, 1\] must be -1 or in"),
        (dict(noise=torch.full((2, 4, 4), float("inf"))), "draws.noise must be finite"),
        (dict(placeholder_noise=torch.full((2, 4, 4), float("nan"))), "draws.placeholder_noise must be finite"),
        (dict(images_whwh=torch.zeros(2, 4)), "images_whwh must hold positive sizes"),
        (dict(sqrt_alphas_cumprod=SCHEDULE.sqrt_alphas_cumprod * 2), r"schedule must hold values in \[0, 1\]"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            q_sample_values(**bad)
    x_t, whwh, pred, _, t, t_next, schedule, noise, renew, eta, _ = _d_args().values()
    ac = schedule.alphas_cumprod
    _check_ddim_step_values(x_t, whwh, pred, t, t_next, ac, eta, noise, renew)  # valid: no error
    with pytest.raises(RuntimeError, match="renew_noise must be finite"):
        _check_ddim_step_values(x_t, whwh, pred, t, t_next, ac, eta, noise, renew * float("nan"))
    with pytest.raises(RuntimeError, match="eta = 2.0 is too large"):
        _check_ddim_step_values(x_t, whwh, pred, t, t_next, ac, 2.0, noise, renew)
    with pytest.raises(RuntimeError, match=r"alphas_cumprod\[t\] must be in \(0, 1\)"):
        _check_ddim_step_values(x_t, whwh, pred, t, t_next, torch.ones_like(ac), eta, noise, renew)


def test_inductor_compiles_both_ops_in_one_graph():
    """One inductor run (docs/design.md §6): a training-step-like function around both ops, fullgraph."""
    g = torch.Generator().manual_seed(700)
    _, _, padded, whwh = make_gt(COUNTS, 23, g)
    padded = torch.nan_to_num(padded)
    draws = fops.draw_q_sample_inputs(COUNTS, 19, g)
    counts = torch.tensor(COUNTS)
    noise, renew = fops.draw_ddim_noise(len(COUNTS), 19, g)

    def step(padded, whwh):
        boxes = fops.q_sample_boxes(padded, counts, whwh, draws=draws, schedule=SCHEDULE, scale=SCALE)
        x_t = boxes_to_signal(boxes, whwh.double())
        keep = boxes[..., 2] > boxes[..., 0] + 5.0
        return fops.ddim_step_boxes(x_t, whwh, pred_boxes=boxes * 0.99, keep=keep, t=999, t_next=749, schedule=SCHEDULE,
                                    noise=noise, renew_noise=renew, eta=1.0, scale=SCALE)

    eager = step(padded, whwh)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")(padded, whwh)
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-9)
