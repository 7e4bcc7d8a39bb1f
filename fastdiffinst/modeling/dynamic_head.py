"""The DiffusionDet decoder with DiffusionInst's controller (docs/official-model.md §1.5, §1.6).

Each of the ``num_stages`` stages pools its boxes from P2–P5, lets the proposals attend to each
other (per image), mixes each proposal's RoI features with filters generated from its own feature
(``DynamicConv``), modulates by the timestep, and predicts class logits, box deltas and the
dynamic mask filters (``controller``). The next stage starts from the detached boxes and the
proposal features. Parameter names are the official ``head.head_series.{s}.*`` and
``head.time_mlp.{1,3}``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastdiffinst.config import HeadConfig
from fastdiffinst.modeling.precision import at_least_fp32

# Box deltas are clamped below exp() overflow territory, as detectron2's Box2BoxTransform.
SCALE_CLAMP = math.log(100000.0 / 16)
BBOX_WEIGHTS = (2.0, 2.0, 1.0, 1.0)


class SinusoidalTimeEmbedding(nn.Module):
    """``t [B] -> [B, dim]``: ``[sin(t·f_j), cos(t·f_j)]`` with ``f_j = exp(-j·ln(10000)/(dim/2 - 1))``.

    The frequencies are computed in fp32 as the official code does, and kept as a (non-persistent)
    buffer so that they follow the model's dtype (fp32 or fp64): a half-precision model keeps them
    and the angles in fp32 (``full_precision``; t·f near t = 999 needs more than bf16's 8 bits) and
    casts the embedding."""

    full_precision = True

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        half = dim // 2
        self.register_buffer("freqs", torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1))),
                             persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        angles = t[:, None] * self.freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


def apply_deltas(deltas: Tensor, boxes: Tensor) -> Tensor:
    """detectron2 ``Box2BoxTransform.apply_deltas`` with weights (2, 2, 1, 1): ``deltas [K, 4]``
    applied to ``boxes [K, 4]`` (xyxy) -> ``[K, 4]`` xyxy, in the deltas' dtype promoted to fp32
    (the official fp32 arithmetic; half-precision deltas are widened, not the boxes rounded)."""
    deltas = deltas.to(at_least_fp32(deltas.dtype))
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = BBOX_WEIGHTS
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw = torch.clamp(deltas[:, 2] / ww, max=SCALE_CLAMP)
    dh = torch.clamp(deltas[:, 3] / wh, max=SCALE_CLAMP)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights
    return torch.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                        pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h], dim=1)


class DynamicConv(nn.Module):
    """Instance interaction: ``(pro [K, D], roi [K, R², D]) -> [K, D]``.

    Per proposal, ``dynamic_layer`` generates two matrices, ``P1 [D, d]`` (the first D·d values,
    row-major) and ``P2 [d, D]``; the RoI features go through ``·P1 → LN → ReLU → ·P2 → LN →
    ReLU``, are flattened position-major (``R²·D``) and projected back to D.

    With ``recompute_chunk`` set (the fused path), training stores none of it: proposals are
    independent here, so the backward recomputes them ``recompute_chunk`` at a time and only one
    chunk's generated filters (``chunk × 2·D·d``) and activations exist at once.
    """

    recompute_chunk: int | None = None
    # The CPU inference copies pack ``dynamic_layer`` as two linears, one per filter matrix
    # (fastdiffinst.modeling.precision.pack_for_onednn).
    packed_row_blocks = {"dynamic_layer": 2}

    def __init__(self, hidden_dim: int, dim_dynamic: int, pooler_resolution: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.dim_dynamic = dim_dynamic
        self.num_params = hidden_dim * dim_dynamic
        self.dynamic_layer = nn.Linear(hidden_dim, 2 * self.num_params)
        self.norm1 = nn.LayerNorm(dim_dynamic)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.out_layer = nn.Linear(hidden_dim * pooler_resolution**2, hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)

    def forward(self, pro_features: Tensor, roi_features: Tensor, workspace: Tensor | None = None) -> Tensor:
        """``workspace`` (inference only): a ``[2, K, D·d]`` buffer for the generated filters."""
        chunk = self.recompute_chunk
        if chunk is None or not torch.is_grad_enabled():
            return self.interact(pro_features, roi_features, workspace)
        return torch.cat([checkpoint(self.interact, pro_features[i:i + chunk], roi_features[i:i + chunk],
                                     use_reentrant=False) for i in range(0, pro_features.shape[0], chunk)])

    def interact(self, pro_features: Tensor, roi_features: Tensor, workspace: Tensor | None = None) -> Tensor:
        param1, param2 = self.generate_filters(pro_features, workspace)
        # In-place ReLUs, as the official module (LayerNorm's backward does not need its output).
        x = F.relu(self.norm1(torch.bmm(roi_features, param1)), inplace=True)
        x = F.relu(self.norm2(torch.bmm(x, param2)), inplace=True)
        return F.relu(self.norm3(self.out_layer(x.flatten(1))), inplace=True)

    @property
    def packed(self) -> bool:
        """Whether this is a packed CPU inference copy: ``dynamic_layer`` its two filter matrices,
        each a oneDNN linear that writes its own output (``packed_row_blocks``)."""
        return isinstance(self.dynamic_layer, nn.ModuleList)

    def generate_filters(self, pro_features: Tensor, workspace: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``pro_features [K, D]`` -> ``P1 [K, D, d]``, ``P2 [K, d, D]`` (``dynamic_layer``'s output
        split in two). In inference each half is its own addmm (what F.linear computes, on half of
        the weight's rows: the same dot products), dense, into ``workspace [2, K, D·d]`` if given:
        the slices of one ``[K, 2·D·d]`` output have a batch stride of ``2·D·d``, which the bf16
        batched matrix product on CPU copies to dense first (36 ms of 790 at r50_coco, 500
        proposals). Under autograd one linear, whose weight gradient is one matrix product. A packed
        copy (``dynamic_layer`` a list of the two halves, each a oneDNN linear) computes each half
        into a fresh output."""
        if self.packed:
            halves = tuple(layer(pro_features) for layer in self.dynamic_layer)
        elif torch.is_grad_enabled():
            params = self.dynamic_layer(pro_features)
            halves = params[:, :self.num_params], params[:, self.num_params:]
        else:
            weight, bias = self.dynamic_layer.weight, self.dynamic_layer.bias
            rows = slice(None, self.num_params), slice(self.num_params, None)
            buffers = workspace if workspace is not None else (None, None)
            halves = tuple(torch.addmm(bias[r], pro_features, weight[r].t(), out=buffer)
                           for r, buffer in zip(rows, buffers))
        return (halves[0].view(-1, self.hidden_dim, self.dim_dynamic),
                halves[1].view(-1, self.dim_dynamic, self.hidden_dim))


def _tower(depth: int, dim: int) -> nn.ModuleList:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU(inplace=True)]
    return nn.ModuleList(layers)


class DecoderStage(nn.Module):
    """One stage (DiffusionDet ``RCNNHead`` + the controller).

    ``forward(features, boxes [B, N, 4], pro_features [B·N, D] | None, pooler, time [B, 4D])`` ->
    ``(class_logits [B, N, K], boxes [B, N, 4] fp32 xyxy, pro_features [B·N, D], kernels [B, N, P])``.
    """

    def __init__(self, cfg: HeadConfig, num_classes: int, num_kernel_params: int) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.d_model = d
        self.self_attn = nn.MultiheadAttention(d, cfg.num_attention_heads, dropout=cfg.dropout)
        self.inst_interact = DynamicConv(d, cfg.dim_dynamic, cfg.pooler_resolution)
        self.linear1 = nn.Linear(d, cfg.dim_feedforward)
        self.linear2 = nn.Linear(cfg.dim_feedforward, d)
        self.controller = nn.Linear(d, num_kernel_params)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.dropout2 = nn.Dropout(cfg.dropout)
        self.dropout3 = nn.Dropout(cfg.dropout)
        self.activation = F.relu if cfg.activation == "relu" else F.gelu
        self.block_time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(4 * d, 2 * d))
        self.cls_module = _tower(cfg.num_cls, d)
        self.reg_module = _tower(cfg.num_reg, d)
        self.class_logits = nn.Linear(d, num_classes)
        self.bboxes_delta = nn.Linear(d, 4)

    def forward(self, features: list[Tensor], boxes: Tensor, pro_features: Tensor | None, pooler: nn.Module,
                time: Tensor, workspace: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch, num = boxes.shape[:2]
        d = self.d_model
        roi = pooler(features, boxes)                              # [B·N, D, R, R]
        roi = roi.view(batch * num, d, -1)
        if pro_features is None:
            # Accumulated in (at least) fp32 as a half-precision mean is anyway, but without its
            # widened copy of the whole [B·N, D, R²] input (bf16, 500 proposals: 2.5 -> 1.0 ms).
            pro_features = roi.mean(-1, dtype=at_least_fp32(roi.dtype)).to(roi.dtype)
        roi = roi.permute(0, 2, 1)                                 # [B·N, R², D]

        # Self-attention among the proposals of each image (sequence N, batch B). Contiguous: the
        # in-projection of a permuted [N, B, D] with B > 1 is not folded into one matrix product but
        # runs as a batched one over N copies of the weight (76 ms a stage at B = 8, N = 500, bf16).
        pro = pro_features.view(batch, num, d).permute(1, 0, 2).contiguous()
        pro = self.norm1(pro + self.dropout1(self.self_attn(pro, pro, pro, need_weights=False)[0]))
        pro = pro.permute(1, 0, 2).reshape(batch * num, d)

        pro = self.norm2(pro + self.dropout2(self.inst_interact(pro, roi, workspace)))
        obj = self.norm3(pro + self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(pro))))))

        scale_shift = torch.repeat_interleave(self.block_time_mlp(time), num, dim=0)
        scale, shift = scale_shift.chunk(2, dim=1)
        fc = obj * (scale + 1) + shift
        cls_feature, reg_feature = fc, fc
        for layer in self.cls_module:
            cls_feature = layer(cls_feature)
        for layer in self.reg_module:
            reg_feature = layer(reg_feature)
        class_logits = self.class_logits(cls_feature)
        kernels = self.controller(reg_feature)
        pred_boxes = apply_deltas(self.bboxes_delta(reg_feature), boxes.reshape(-1, 4))
        return (class_logits.view(batch, num, -1), pred_boxes.view(batch, num, 4), obj,
                kernels.view(batch, num, -1))


class DynamicHead(nn.Module):
    """The time MLP, the RoI pooler (``box_pooler``, stateless) and the decoder stages.

    ``forward(features, boxes [B, N, 4], t [B] int64)`` -> per-stage stacks
    ``class_logits [S, B, N, K]`` (at least fp32), ``boxes [S, B, N, 4]`` (fp32 absolute xyxy),
    ``kernels [S, B, N, P]`` (in the features' dtype, which the mask head reads).

    With ``recompute_stages`` (the fused path) training keeps only each stage's inputs and
    recomputes the stage in the backward: the stages hold no BatchNorm and no randomness
    (dropout 0; the checkpoint restores the RNG state anyway), so the recomputation is exact.
    """

    recompute_stages: bool = False

    def __init__(self, cfg: HeadConfig, num_classes: int, num_kernel_params: int, box_pooler: nn.Module) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.box_pooler = box_pooler
        self.time_mlp = nn.Sequential(SinusoidalTimeEmbedding(d), nn.Linear(d, 4 * d), nn.GELU(),
                                      nn.Linear(4 * d, 4 * d))
        self.head_series = nn.ModuleList(DecoderStage(cfg, num_classes, num_kernel_params)
                                         for _ in range(cfg.num_stages))
        self.num_classes = num_classes
        self.prior_prob = cfg.prior_prob
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform for every matrix; the focal prior on the class-logit biases
        (docs/official-model.md §1.6).

        The official rule sets every head parameter whose last dimension equals K (or K + 1) to
        the prior; in the official configurations that is only ``class_logits.bias``, which is what
        this does for any K (so a K that happens to equal another width, e.g. 4 or 8 — the box
        deltas, the mask features — does not also reset that bias)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        bias = -math.log((1 - self.prior_prob) / self.prior_prob)
        for stage in self.head_series:
            nn.init.constant_(stage.class_logits.bias, bias)

    def forward(self, features: list[Tensor], boxes: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if boxes.shape[0] > 1 and boxes.device.type == "cpu" and not torch.is_grad_enabled() \
                and not torch.compiler.is_compiling():
            # Inference on CPU, one image at a time (the images do not interact; the results are
            # the batch's): at B·N proposals the RoI features, DynamicConv's filters and
            # activations (~100 MB each at 8 × 500 in bf16) stream through memory, which made
            # batch 8 cost 1.2× batch 1 per image.
            outputs = [self.forward([level[i:i + 1] for level in features], boxes[i:i + 1], t[i:i + 1])
                       for i in range(boxes.shape[0])]
            return tuple(torch.cat(parts, dim=1) for parts in zip(*outputs))
        # The boxes in the features' dtype promoted to fp32: the official pooler (``Boxes``) and box
        # decoding cast them to fp32; half-precision features must not round them.
        boxes = boxes.to(at_least_fp32(features[0].dtype))
        embedding, *mlp = self.time_mlp
        # The embedding (fp32 angles, full_precision) in the features' dtype, which is the layers'
        # own outside autocast (and autocast casts it for them inside).
        time = embedding(t).to(features[0].dtype)
        for layer in mlp:
            time = layer(time)
        logits, stage_boxes, kernels = [], [], []
        pro_features = None
        workspace = self._filter_workspace(boxes, time)
        for stage in self.head_series:
            if self.recompute_stages and torch.is_grad_enabled():
                outputs = checkpoint(stage, features, boxes, pro_features, self.box_pooler, time, use_reentrant=False)
            else:
                outputs = stage(features, boxes, pro_features, self.box_pooler, time, workspace)
            class_logits, boxes_out, pro_features, kernel = outputs
            logits.append(class_logits)
            stage_boxes.append(boxes_out)
            kernels.append(kernel)
            boxes = boxes_out.detach()
        logits = torch.stack(logits)
        return logits.to(at_least_fp32(logits.dtype)), torch.stack(stage_boxes), torch.stack(kernels)

    def _filter_workspace(self, boxes: Tensor, time: Tensor) -> Tensor | None:
        """In eager inference, one buffer for every stage's generated DynamicConv filters
        (``[2, B·N, D·d]``, 65 MB at N = 500): a fresh tensor per stage costs its page faults on CPU
        (13 ms of the 55 ms filter generation at N = 500). The arithmetic is unchanged. None under
        autograd, autocast (F.linear's cast), torch.compile (which plans its own buffers) or packed
        linears (oneDNN's linear writes its own output)."""
        interact = self.head_series[0].inst_interact
        if (torch.is_grad_enabled() or torch.is_autocast_enabled(time.device.type)
                or torch.compiler.is_compiling() or interact.packed):
            return None
        return time.new_empty((2, boxes.shape[0] * boxes.shape[1], interact.num_params))
