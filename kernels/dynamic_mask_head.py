"""Triton kernels of the dynamic mask head (docs/design.md §2.1): forward (logits, probabilities or dice
sums) and backward, which recomputes the activations from the inputs.

Every program handles one instance and a chunk of ``TILES`` pixel tiles of ``BLOCK`` pixels.
Activations are channel-major ``[channels, BLOCK]`` blocks with the pixels spread over the threads,
so every channel of a pixel lives in one thread: a layer is a broadcast-multiply and a sum over the
input-channel axis that stays inside the thread (the channel counts are below ``tl.dot``'s K >= 16,
docs/design.md §8), written as a chain of FMAs. The parameter gradients, sums over pixels
(K = BLOCK), are ``tl.dot`` products (``DOT_PRECISION``). Sizes are compile-time constants: ``IN``
inputs of layer 0 (``C`` features, plus 2 relative coordinates first when ``COORDS``), ``CH`` hidden
channels, ``L`` layers; the features are padded to a power of two ``CP_F`` and the hidden channels to
``CP``. The coordinates are a block of their own (``[2, BLOCK]``, with their own weight columns),
not padding the features' block: a CondInst head's 10 inputs would otherwise be 16, a third of
layer 0's multiply-adds and weight registers spent on zeros. They get no gradient (constants of the
instance). ``ACC`` is the accumulation type (fp32, or fp64 for fp64 inputs).

Parameter layout (AdelaiDet): all weights, then all biases, each weight row-major ``[out, in]``;
the same as ``csrc/ops/common/dynamic_mask_head_math.h``.

Reductions are deterministic except the feature gradient of :func:`mask_head_backward_kernel`
with ``ATOMIC_GX`` (the default outside deterministic mode): parameter gradients and dice sums are
written as per-(instance, chunk) partials and summed by the caller in a fixed order; the
deterministic feature gradient comes from :func:`mask_head_feature_grad_kernel`, whose programs
own (image, tile) and loop over that image's instances.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Epilogues of the forward kernel and upstream gradients of the backward kernels (launcher
# arguments; the kernels compare against the constexpr copies below).
LOGITS = 0
PROBS = 1
DICE = 2
_LOGITS = tl.constexpr(LOGITS)
_PROBS = tl.constexpr(PROBS)
_DICE = tl.constexpr(DICE)


@triton.jit
def _weight_offset(layer: tl.constexpr, IN: tl.constexpr, CH: tl.constexpr, L: tl.constexpr):
    """Offset of ``layer``'s weight matrix in an instance's parameter vector."""
    if layer == 0:
        return 0
    return IN * CH + (layer - 1) * CH * CH


@triton.jit
def _bias_offset(layer: tl.constexpr, IN: tl.constexpr, CH: tl.constexpr, L: tl.constexpr):
    if L == 1:
        return IN
    return IN * CH + (L - 2) * CH * CH + CH + layer * CH


@triton.jit
def _layer_block(layer: tl.constexpr, IN: tl.constexpr, CH: tl.constexpr, L: tl.constexpr, NC: tl.constexpr,
                 CP_F: tl.constexpr, CP: tl.constexpr):
    """Where ``layer`` lives in an instance's parameter vector, as zero-padded blocks: offsets and masks
    of its weights ``[CPO, CPI]`` and bias ``[CPO]``. Layer 0's block holds its feature columns
    (after the NC coordinate columns; CPI = CP_F), the others all columns (CPI = CP); CPO is CP, or
    2 for the last layer (its single output is row 0)."""
    FAN_IN: tl.constexpr = IN if layer == 0 else CH
    FAN_OUT: tl.constexpr = 1 if layer == L - 1 else CH
    FIRST: tl.constexpr = NC if layer == 0 else 0
    CPI: tl.constexpr = CP_F if layer == 0 else CP
    CPO: tl.constexpr = 2 if layer == L - 1 else CP
    o = tl.arange(0, CPO)
    i = tl.arange(0, CPI)
    w_offsets = _weight_offset(layer, IN, CH, L) + o[:, None] * FAN_IN + FIRST + i[None, :]
    w_mask = (o[:, None] < FAN_OUT) & (FIRST + i[None, :] < FAN_IN)
    return w_offsets, w_mask, _bias_offset(layer, IN, CH, L) + o, o < FAN_OUT


@triton.jit
def _coordinate_block(IN: tl.constexpr, CH: tl.constexpr, L: tl.constexpr, CP: tl.constexpr):
    """Offsets and mask of layer 0's two coordinate columns, ``[CPO, 2]``."""
    FAN_OUT: tl.constexpr = 1 if L == 1 else CH
    CPO: tl.constexpr = 2 if L == 1 else CP
    o = tl.arange(0, CPO)
    j = tl.arange(0, 2)
    return o[:, None] * IN + j[None, :], (o[:, None] < FAN_OUT) & (j[None, :] < 2)


@triton.jit
def _load_layer(p_ptr, layer: tl.constexpr, IN: tl.constexpr, CH: tl.constexpr, L: tl.constexpr, NC: tl.constexpr,
                CP_F: tl.constexpr, CP: tl.constexpr, ACC: tl.constexpr):
    """``layer``'s weights and bias (the blocks of :func:`_layer_block`), zero-padded."""
    w_offsets, w_mask, b_offsets, b_mask = _layer_block(layer, IN, CH, L, NC, CP_F, CP)
    w = tl.load(p_ptr + w_offsets, mask=w_mask, other=0.0)
    b = tl.load(p_ptr + b_offsets, mask=b_mask, other=0.0)
    return w.to(ACC), b.to(ACC)


@triton.jit
def _load_layers(p_ptr, IN: tl.constexpr, CH: tl.constexpr, L: tl.constexpr, NC: tl.constexpr, CP_F: tl.constexpr,
                 CP: tl.constexpr, ACC: tl.constexpr):
    """Every layer's ``(w, b)`` (:func:`_load_layer`), loaded once per program so that they stay in
    registers across its tiles: an L-tuple, then layer 0's coordinate columns ``[CPO, 2]`` when
    NC = 2 (a dummy zero otherwise)."""
    layers = ()
    for layer in tl.static_range(L):
        layers = layers + (_load_layer(p_ptr, layer, IN, CH, L, NC, CP_F, CP, ACC),)
    if NC == 2:
        offsets, mask = _coordinate_block(IN, CH, L, CP)
        w_coords = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(ACC)
    else:
        w_coords = 0.0
    return layers, w_coords


@triton.jit
def _store_layer_grad(g_ptr, gw, gb, layer: tl.constexpr, IN: tl.constexpr, CH: tl.constexpr, L: tl.constexpr,
                      NC: tl.constexpr, CP_F: tl.constexpr, CP: tl.constexpr):
    """Stores ``layer``'s weight and bias gradients (the blocks of :func:`_layer_block`)."""
    w_offsets, w_mask, b_offsets, b_mask = _layer_block(layer, IN, CH, L, NC, CP_F, CP)
    tl.store(g_ptr + w_offsets, gw, mask=w_mask)
    tl.store(g_ptr + b_offsets, gb, mask=b_mask)


@triton.jit
def _chain_sum(prod, AXIS: tl.constexpr, acc):
    """``acc + prod.sum(AXIS)`` for a 3-D block whose AXIS lives in one thread, one term after the
    other. A plain ``tl.sum`` compiles to a tree (4 mul + 4 fma + 3 add per 8 multiply-adds); here
    each term is picked with a select against -0.0 (constant per register, and x + -0.0 == x
    exactly, so both fold away), which leaves a chain the compiler fuses into one FMA per term."""
    # -0.0 from its bits: a -0.0 literal becomes +0.0 in the IR, and x + 0.0 does not fold.
    if prod.dtype == tl.float64:
        neg_zero = tl.full(prod.shape, -9223372036854775808, tl.int64).to(tl.float64, bitcast=True)
    else:
        neg_zero = tl.full(prod.shape, -2147483648, tl.int32).to(tl.float32, bitcast=True)
    if AXIS == 0:
        k = tl.arange(0, prod.shape[0])[:, None, None]
    else:
        k = tl.arange(0, prod.shape[1])[None, :, None]
    for i in tl.static_range(prod.shape[AXIS]):
        acc += tl.sum(tl.where(k == i, prod, neg_zero), axis=AXIS)
    return acc


@triton.jit
def _dense(a, w, acc):
    """``acc + w [CPO, CPI] · a [CPI, BLOCK]`` -> ``[CPO, BLOCK]`` (the sum stays in-thread)."""
    return _chain_sum(w[:, :, None] * a[None, :, :], 1, acc)


@triton.jit
def _bias(b, a):
    """The bias ``b [CPO]`` broadcast over the pixels of ``a [CPI, BLOCK]``: ``[CPO, BLOCK]``."""
    return tl.broadcast_to(b[:, None], [b.shape[0], a.shape[1]])


@triton.jit
def _back(w, delta):
    """``wᵀ [CPI, CPO] · delta [CPO, BLOCK]`` -> ``[CPI, BLOCK]``."""
    return _chain_sum(w[:, :, None] * delta[:, None, :], 0, tl.zeros([w.shape[1], delta.shape[1]], delta.dtype))


@triton.jit
def _outer(delta, a, acc, PREC: tl.constexpr):
    """``acc + delta [CPO, BLOCK] · aᵀ [BLOCK, CPI]``: a weight gradient, summed over the tile, in
    the dot precision PREC ("ieee", or "tf32x3" for tensor cores with fp32-level accuracy)."""
    return tl.dot(delta, tl.trans(a), acc, input_precision=PREC)


@triton.jit
def _mlp(x, coords, layers, w_coords, NC: tl.constexpr):
    """The head on one tile: the features ``x [CP_F, BLOCK]`` and, when NC = 2, the coordinates
    ``coords [2, BLOCK]`` through ``layers`` (the L-tuple of ``(w, b)``, layer 0's coordinate columns
    ``w_coords``; ReLU between layers; the coordinates are summed first, as they come first in the
    parameters). Returns the last layer's output ``[2, BLOCK]`` (row 0 is the logit) and the L-tuple
    of every layer's input (``x``, then the ReLU outputs), which the backward needs."""
    w, b = layers[0]
    h = _bias(b, x)
    if NC == 2:
        h = _dense(coords, w_coords, h)
    h = _dense(x, w, h)
    inputs = (x,)
    for layer in tl.static_range(1, len(layers)):
        a = tl.maximum(h, 0.0)
        w, b = layers[layer]
        h = _dense(a, w, _bias(b, a))
        inputs = inputs + (a,)
    return h, inputs


@triton.jit
def _replace(values, index: tl.constexpr, value):
    """``values`` with element ``index`` replaced by ``value`` (Triton tuples are immutable)."""
    return values[:index] + (value,) + values[index + 1:]


@triton.jit
def _load_inputs(feats_ptr, image, valid, pix, pmask, W, HW, inst_x, inst_y, soi, STRIDE: tl.constexpr,
                 C: tl.constexpr, COORDS: tl.constexpr, CP_F: tl.constexpr, ACC: tl.constexpr):
    """Layer 0's inputs for pixels ``pix`` of ``image``: the C feature channels ``[CP_F, BLOCK]`` and,
    when COORDS, the relative coordinates ``[2, BLOCK]`` (a dummy zero otherwise); zero outside the
    image or for an invalid image."""
    fc = tl.arange(0, CP_F)
    fmask = (fc[:, None] < C) & pmask[None, :] & valid
    base = feats_ptr + image.to(tl.int64) * C * HW
    x = tl.load(base + fc[:, None].to(tl.int64) * HW + pix[None, :], mask=fmask, other=0.0).to(ACC)
    if COORDS:
        # CondInst: (instance - pixel centre) / soi, pixel centres at stride * i + stride // 2.
        cx = ((pix % W) * STRIDE + STRIDE // 2).to(ACC)
        cy = ((pix // W) * STRIDE + STRIDE // 2).to(ACC)
        keep = pmask & valid
        rx = tl.where(keep, (inst_x - cx) / soi, 0.0)
        ry = tl.where(keep, (inst_y - cy) / soi, 0.0)
        coords = tl.where(tl.arange(0, 2)[:, None] == 0, rx[None, :], ry[None, :])
    else:
        coords = 0.0
    return x, coords


@triton.jit
def _instance(n, image_ptr, xy_ptr, soi_ptr, B, COORDS: tl.constexpr, ACC: tl.constexpr):
    """Image of instance n (and whether it is in range), and its coordinates when COORDS."""
    image = tl.load(image_ptr + n)
    valid = (image >= 0) & (image < B)
    image = tl.where(valid, image, 0)
    if COORDS:
        inst_x = tl.load(xy_ptr + 2 * n).to(ACC)
        inst_y = tl.load(xy_ptr + 2 * n + 1).to(ACC)
        soi = tl.load(soi_ptr + n).to(ACC)
    else:
        inst_x = 0.0
        inst_y = 0.0
        soi = 1.0
    return image, valid, inst_x, inst_y, soi


@triton.jit
def _sigmoid(x):
    """1 / (1 + exp(-x)), as exp(x) / (1 + exp(x)) for x < 0 so that tiny probabilities survive."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _first_row(h):
    """Row 0 of a ``[2, BLOCK]`` block (the last layer's single output)."""
    return tl.sum(tl.where(tl.arange(0, 2)[:, None] == 0, h, 0.0), axis=0)


@triton.jit
def _target(gt_base, has_gt, pix, pmask, ACC: tl.constexpr):
    g = tl.load(gt_base + pix, mask=pmask & has_gt, other=0)
    return tl.where(g != 0, 1.0, 0.0).to(ACC)


@triton.jit
def mask_head_forward_kernel(
    feats_ptr, params_ptr, image_ptr, xy_ptr, soi_ptr, gt_ptr, gt_index_ptr, out_ptr,
    B, G, W, HW, P, CHUNKS,
    STRIDE: tl.constexpr, C: tl.constexpr, COORDS: tl.constexpr, IN: tl.constexpr, CH: tl.constexpr,
    L: tl.constexpr, CP_F: tl.constexpr, CP: tl.constexpr, EPILOGUE: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr, TILES: tl.constexpr,
):
    """Grid (N, CHUNKS). EPILOGUE LOGITS/PROBS: out ``[N, H, W]``; DICE: out ``[N, CHUNKS, 3]``
    partial sums (Σ p·g, Σ p², Σ g²) of the chunk."""
    n = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    NC: tl.constexpr = 2 if COORDS else 0
    image, valid, inst_x, inst_y, soi = _instance(n, image_ptr, xy_ptr, soi_ptr, B, COORDS, ACC)
    p_ptr = params_ptr + n * P
    layers, w_coords = _load_layers(p_ptr, IN, CH, L, NC, CP_F, CP, ACC)
    if EPILOGUE == _DICE:
        k = tl.load(gt_index_ptr + n)
        has_gt = (k >= 0) & (k < G)  # out of range (unchecked on CUDA): no target, never read
        gt_base = gt_ptr + tl.where(has_gt, k, 0) * HW
        s_pg = tl.zeros([BLOCK], ACC)
        s_pp = tl.zeros([BLOCK], ACC)
        s_gg = tl.zeros([BLOCK], ACC)
    for t in range(TILES):
        pix = (chunk * TILES + t) * BLOCK + tl.arange(0, BLOCK)
        pmask = pix < HW
        x, coords = _load_inputs(feats_ptr, image, valid, pix, pmask, W, HW, inst_x, inst_y, soi, STRIDE, C, COORDS,
                                 CP_F, ACC)
        h, _ = _mlp(x, coords, layers, w_coords, NC)
        logit = tl.where(valid, _first_row(h), 0.0)
        if EPILOGUE == _LOGITS:
            tl.store(out_ptr + n * HW + pix, logit.to(out_ptr.dtype.element_ty), mask=pmask)
        elif EPILOGUE == _PROBS:
            tl.store(out_ptr + n * HW + pix, _sigmoid(logit).to(out_ptr.dtype.element_ty), mask=pmask)
        else:
            prob = tl.where(pmask & valid, _sigmoid(logit), 0.0)
            g = _target(gt_base, has_gt & valid, pix, pmask, ACC)
            s_pg += prob * g
            s_pp += prob * prob
            s_gg += g
    if EPILOGUE == _DICE:
        base = out_ptr + (n * CHUNKS + chunk) * 3
        tl.store(base, tl.sum(s_pg, axis=0))
        tl.store(base + 1, tl.sum(s_pp, axis=0))
        tl.store(base + 2, tl.sum(s_gg, axis=0))


@triton.jit
def _tile_backward(x, coords, layers, w_coords, NC: tl.constexpr, upstream, UP: tl.constexpr, pix, pmask, valid,
                   ACC: tl.constexpr, WANT_PARAMS: tl.constexpr, PREC: tl.constexpr, grads, grad_coords):
    """Recomputes one tile's MLP, back-propagates the upstream gradient (the terms of
    :func:`_upstream`) and returns the gradient of the features ``[CP_F, BLOCK]`` (the coordinates
    get none) and, with WANT_PARAMS, ``grads`` and ``grad_coords`` updated: the parameter-gradient
    accumulators, an L-tuple of ``(gw [CPO, CPI], gb [CPO, BLOCK] per-pixel partials)`` and layer 0's
    coordinate columns ``[CPO, 2]`` (when NC = 2); without, both pass through."""
    dl_src, ga, gb, has_gt, gt_base = upstream
    h, inputs = _mlp(x, coords, layers, w_coords, NC)
    logit = _first_row(h)
    # Upstream gradient of the logits.
    if UP == _LOGITS:
        dl = tl.load(dl_src + pix, mask=pmask, other=0.0).to(ACC)
    elif UP == _PROBS:
        prob = _sigmoid(logit)
        dl = tl.load(dl_src + pix, mask=pmask, other=0.0).to(ACC) * prob * (1.0 - prob)
    else:
        prob = _sigmoid(logit)
        dl = (ga * _target(gt_base, has_gt, pix, pmask, ACC) + 2.0 * gb * prob) * prob * (1.0 - prob)
    dl = tl.where(pmask & valid, dl, 0.0)
    # delta = d(loss)/d(layer output), from the last layer (a [2, BLOCK] block, row 0) down; a
    # layer's input is positive exactly where the ReLU below it let the gradient through.
    delta = tl.where(tl.arange(0, 2)[:, None] == 0, dl[None, :], 0.0)
    for layer in tl.static_range(len(layers) - 1, -1, -1):
        if WANT_PARAMS:
            grad_w, grad_b = grads[layer]
            grads = _replace(grads, layer, (_outer(delta, inputs[layer], grad_w, PREC), grad_b + delta))
            if layer == 0 and NC == 2:
                grad_coords = _outer(delta, coords, grad_coords, PREC)
        if layer > 0:
            delta = tl.where(inputs[layer] > 0, _back(layers[layer][0], delta), 0.0)
    return _back(layers[0][0], delta), grads, grad_coords


@triton.jit
def _zero_grads(layers, w_coords, NC: tl.constexpr, BLOCK: tl.constexpr):
    """Zeroed parameter-gradient accumulators of :func:`_tile_backward` for ``layers``: an L-tuple
    of ``(gw [CPO, CPI], gb [CPO, BLOCK])``, and layer 0's coordinate columns (a dummy zero when
    NC = 0)."""
    grads = ()
    for layer in tl.static_range(len(layers)):
        w, _ = layers[layer]
        grads = grads + ((tl.zeros_like(w), tl.zeros([w.shape[0], BLOCK], w.dtype)),)
    if NC == 2:
        grad_coords = tl.zeros_like(w_coords)
    else:
        grad_coords = 0.0
    return grads, grad_coords


@triton.jit
def _upstream(n, up_ptr, gt_ptr, gt_index_ptr, G, HW, UP: tl.constexpr, ACC: tl.constexpr):
    """Per-instance upstream terms ``(dl_src, ga, gb, has_gt, gt_base)``: the gradient row ``dl_src``
    (LOGITS/PROBS) or, for DICE, the gradients ``ga``/``gb`` of Σ p·g and Σ p² and the target mask."""
    if UP == _DICE:
        ga = tl.load(up_ptr + 3 * n).to(ACC)
        gb = tl.load(up_ptr + 3 * n + 1).to(ACC)
        k = tl.load(gt_index_ptr + n)
        has_gt = (k >= 0) & (k < G)  # out of range (unchecked on CUDA): no target, never read
        gt_base = gt_ptr + tl.where(has_gt, k, 0) * HW
    else:
        ga = 0.0
        gb = 0.0
        has_gt = False
        gt_base = gt_ptr
    return up_ptr + n * HW, ga, gb, has_gt, gt_base


@triton.jit
def mask_head_backward_kernel(
    feats_ptr, params_ptr, image_ptr, xy_ptr, soi_ptr, gt_ptr, gt_index_ptr, up_ptr,
    gparams_ptr, gfeats_ptr,
    B, G, W, HW, P, CHUNKS,
    STRIDE: tl.constexpr, C: tl.constexpr, COORDS: tl.constexpr, IN: tl.constexpr, CH: tl.constexpr,
    L: tl.constexpr, CP_F: tl.constexpr, CP: tl.constexpr, UP: tl.constexpr, ACC: tl.constexpr,
    ATOMIC_GX: tl.constexpr, PREC: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr,
):
    """Grid (N, CHUNKS): parameter-gradient partials ``gparams [N, CHUNKS, P]`` of the chunk and,
    with ATOMIC_GX, the feature gradient added atomically to ``gfeats [B, C, H, W]`` (fp32/fp64).

    The upstream gradient: UP LOGITS/PROBS: ``up [N, H, W]`` w.r.t. the logits / probabilities;
    DICE: ``up [N, 3]`` w.r.t. the dice sums, with targets ``gt``/``gt_index``."""
    n = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    image, valid, inst_x, inst_y, soi = _instance(n, image_ptr, xy_ptr, soi_ptr, B, COORDS, ACC)
    p_ptr = params_ptr + n * P
    upstream = _upstream(n, up_ptr, gt_ptr, gt_index_ptr, G, HW, UP, ACC)
    NC: tl.constexpr = 2 if COORDS else 0
    layers, w_coords = _load_layers(p_ptr, IN, CH, L, NC, CP_F, CP, ACC)
    grads, grad_coords = _zero_grads(layers, w_coords, NC, BLOCK)
    fc = tl.arange(0, CP_F)
    for t in range(TILES):
        pix = (chunk * TILES + t) * BLOCK + tl.arange(0, BLOCK)
        pmask = pix < HW
        x, coords = _load_inputs(feats_ptr, image, valid, pix, pmask, W, HW, inst_x, inst_y, soi, STRIDE, C, COORDS,
                                 CP_F, ACC)
        gx, grads, grad_coords = _tile_backward(x, coords, layers, w_coords, NC, upstream, UP, pix, pmask, valid, ACC,
                                                True, PREC, grads, grad_coords)
        if ATOMIC_GX:
            fmask = (fc[:, None] < C) & pmask[None, :] & valid
            dst = gfeats_ptr + image.to(tl.int64) * C * HW + fc[:, None].to(tl.int64) * HW + pix[None, :]
            tl.atomic_add(dst, gx, mask=fmask)
    g_ptr = gparams_ptr + (n * CHUNKS + chunk) * P
    for layer in tl.static_range(L):
        grad_w, grad_b = grads[layer]
        _store_layer_grad(g_ptr, grad_w, tl.sum(grad_b, axis=1), layer, IN, CH, L, NC, CP_F, CP)
    if NC == 2:
        offsets, mask = _coordinate_block(IN, CH, L, CP)
        tl.store(g_ptr + offsets, grad_coords, mask=mask)


@triton.jit
def mask_head_feature_grad_kernel(
    feats_ptr, params_ptr, image_ptr, xy_ptr, soi_ptr, gt_ptr, gt_index_ptr, up_ptr,
    order_ptr, offsets_ptr, gfeats_ptr,
    B, G, W, HW, P,
    STRIDE: tl.constexpr, C: tl.constexpr, COORDS: tl.constexpr, IN: tl.constexpr, CH: tl.constexpr,
    L: tl.constexpr, CP_F: tl.constexpr, CP: tl.constexpr, UP: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid (tiles, B): the deterministic feature gradient. Each program owns one pixel tile of one
    image and sums over that image's instances (``order[offsets[b]:offsets[b+1]]``, in index
    order), writing ``gfeats [B, C, H, W]`` without atomics."""
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pix = tile * BLOCK + tl.arange(0, BLOCK)
    pmask = pix < HW
    NC: tl.constexpr = 2 if COORDS else 0
    fc = tl.arange(0, CP_F)
    acc = tl.zeros([CP_F, BLOCK], ACC)
    start = tl.load(offsets_ptr + b)
    stop = tl.load(offsets_ptr + b + 1)
    for j in range(start, stop):
        n = tl.load(order_ptr + j)
        image, valid, inst_x, inst_y, soi = _instance(n, image_ptr, xy_ptr, soi_ptr, B, COORDS, ACC)
        upstream = _upstream(n, up_ptr, gt_ptr, gt_index_ptr, G, HW, UP, ACC)
        x, coords = _load_inputs(feats_ptr, image, valid, pix, pmask, W, HW, inst_x, inst_y, soi, STRIDE, C, COORDS,
                                 CP_F, ACC)
        layers, w_coords = _load_layers(params_ptr + n * P, IN, CH, L, NC, CP_F, CP, ACC)
        gx, _, _ = _tile_backward(x, coords, layers, w_coords, NC, upstream, UP, pix, pmask, valid, ACC, False, "ieee",
                                  (), 0.0)
        acc += gx
    fmask = (fc[:, None] < C) & pmask[None, :]
    dst = gfeats_ptr + b * C * HW + fc[:, None].to(tl.int64) * HW + pix[None, :]
    tl.store(dst, acc.to(gfeats_ptr.dtype.element_ty), mask=fmask)


# ---------------------------------------------------------------------------------------------
# Launchers: take checked tensors (fastdiffinst.ops.dynamic_mask_head checks them), allocate the
# outputs and launch. ``coords`` is ``(inst_xy [N, 2], inst_soi [N], mask_stride)`` or None.

_BLOCK = 128
_NUM_WARPS = 4
# Pixels per program of the reductions (dice sums, parameter gradients): the partials are
# [N, ceil(HW / chunk), P], small, and summed in a fixed order.
_CHUNK_TILES = 16
# Precision of the parameter-gradient dot products on GPU: "tf32x3" (tensor cores, fp32-level
# accuracy: on an H200 the backward took 6.1 ms instead of 14.0 ms with "ieee" FMA dots, N = 500,
# 200×304, with max errors 1.2e-5 vs 2.5e-5 for gradients up to ~30). The interpreter computes
# them exactly either way.
DOT_PRECISION = "tf32x3"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Forward (logits) launch configurations, autotuned per map size on GPU: pixels per tile,
# tiles per program (the filters are loaded once per program and stay in registers) and warps.
# The interpreter cannot autotune (docs/design.md §8); it runs one tile per program (its programs run one
# after another, so larger programs only add masked-out work on small test maps).
_FORWARD_CONFIGS = [
    triton.Config({"BLOCK": 128, "TILES": 16}, num_warps=4),
    triton.Config({"BLOCK": 128, "TILES": 8}, num_warps=4),
    triton.Config({"BLOCK": 256, "TILES": 8}, num_warps=4),
    triton.Config({"BLOCK": 64, "TILES": 16}, num_warps=2),
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK": 128, "TILES": 1}, num_warps=4)
_forward_tuned = triton.autotune([_INTERPRETER_CONFIG] if _interpreting() else _FORWARD_CONFIGS,
                                 key=["HW", "C", "COORDS", "CH", "L", "EPILOGUE", "ACC"])(mask_head_forward_kernel)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _chunk_tiles(hw: int) -> int:
    """Tiles per program of the reductions: _CHUNK_TILES, fewer for small maps (a power of two,
    to bound the number of compiled variants)."""
    return min(_CHUNK_TILES, _next_pow2(triton.cdiv(hw, _BLOCK)))


def geometry(c: int, stride: int | None, channels: int, num_layers: int, dtype: torch.dtype) -> dict:
    """The kernels' compile-time sizes: ``c`` feature channels, the mask stride of the relative
    coordinates (None: no coordinates), the head's hidden channels and layers, the features' dtype."""
    return dict(
        STRIDE=stride if stride is not None else 1, C=c, COORDS=stride is not None,
        IN=c + (2 if stride is not None else 0), CH=channels, L=num_layers, CP_F=max(2, _next_pow2(c)),
        CP=max(2, _next_pow2(channels)), ACC=tl.float64 if dtype == torch.float64 else tl.float32,
    )


def _geometry(feats: torch.Tensor, params: torch.Tensor, coords, channels: int, num_layers: int) -> dict:
    """:func:`geometry` of these inputs; checks the filter length, which the kernels trust."""
    c = feats.shape[1]
    inputs = c + (2 if coords is not None else 0)
    fan = [(inputs if layer == 0 else channels, 1 if layer == num_layers - 1 else channels)
           for layer in range(num_layers)]
    expected = sum(i * o + o for i, o in fan)
    if params.dim() != 2 or params.shape[1] != expected:
        raise ValueError(f"dynamic_mask_head: params must be [N, {expected}] for {inputs} inputs, {channels} channels "
                         f"and {num_layers} layers, got shape {tuple(params.shape)}")
    return geometry(c, int(coords[2]) if coords is not None else None, channels, num_layers, feats.dtype)


def _coords_args(feats: torch.Tensor, params: torch.Tensor, coords):
    """The coordinate tensors in the accumulation dtype (a dummy pointer when absent)."""
    if coords is None:
        return params, params
    acc = _acc_dtype(feats.dtype)
    return coords[0].to(acc).contiguous(), coords[1].to(acc).contiguous()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(feats, params, image_index, coords, channels: int, num_layers: int, sigmoid: bool) -> torch.Tensor:
    """Logits (or probabilities) ``[N, H, W]`` in ``feats``' dtype."""
    feats, params, image_index = feats.contiguous(), params.contiguous(), image_index.contiguous()
    batch, _, h, w = feats.shape
    n = params.shape[0]
    out = torch.empty((n, h, w), dtype=feats.dtype, device=feats.device)
    if out.numel() == 0:
        return out
    xy, soi = _coords_args(feats, params, coords)
    hw = h * w

    # Instances on the first grid axis, which has no 65535 limit.
    def grid(meta):
        return (n, triton.cdiv(hw, meta["BLOCK"] * meta["TILES"]))

    _forward_tuned[grid](
        feats, params, image_index, xy, soi, params, image_index, out, batch, 0, w, hw, params.shape[1], 0,
        EPILOGUE=PROBS if sigmoid else LOGITS,
        **_geometry(feats, params, coords, channels, num_layers))
    return out


def dice_sums(feats, params, image_index, gt_masks, gt_index, coords, channels: int, num_layers: int) -> torch.Tensor:
    """``[N, 3]`` (Σ p·g, Σ p², Σ g²), fp32 (fp64 for fp64 features)."""
    feats, params, image_index = feats.contiguous(), params.contiguous(), image_index.contiguous()
    gt_masks, gt_index = gt_masks.contiguous(), gt_index.contiguous()
    batch, _, h, w = feats.shape
    n, hw = params.shape[0], h * w
    tiles = _chunk_tiles(hw)
    chunks = triton.cdiv(hw, _BLOCK * tiles)
    partial = torch.empty((n, chunks, 3), dtype=_acc_dtype(feats.dtype), device=feats.device)
    if n > 0 and hw > 0:
        xy, soi = _coords_args(feats, params, coords)
        mask_head_forward_kernel[(n, chunks)](
            feats, params, image_index, xy, soi, gt_masks, gt_index, partial, batch, gt_masks.shape[0], w, hw,
            params.shape[1], chunks, EPILOGUE=DICE, BLOCK=_BLOCK, TILES=tiles, num_warps=_NUM_WARPS,
            **_geometry(feats, params, coords, channels, num_layers))
    return partial.sum(1)


def backward(upstream, up_kind: int, feats, params, image_index, gt_masks, gt_index, coords, channels: int,
             num_layers: int, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(grad_feats [B, C, H, W], grad_params [N, P])`` in the input dtypes for the
    upstream gradient ``upstream`` (``[N, H, W]`` for LOGITS/PROBS, ``[N, 3]`` for DICE)."""
    feats, params, upstream = feats.contiguous(), params.contiguous(), upstream.contiguous()
    image_index = image_index.contiguous()
    batch, c, h, w = feats.shape
    n, p, hw = params.shape[0], params.shape[1], h * w
    geometry = _geometry(feats, params, coords, channels, num_layers)
    acc = _acc_dtype(feats.dtype)
    if n == 0 or hw == 0:
        return torch.zeros_like(feats), torch.zeros_like(params)
    xy, soi = _coords_args(feats, params, coords)
    if gt_masks is None:
        gt_masks, gt_index = image_index, image_index  # unused by LOGITS/PROBS
    else:
        gt_masks, gt_index = gt_masks.contiguous(), gt_index.contiguous()
    targets = gt_masks.shape[0]
    tiles = _chunk_tiles(hw)
    chunks = triton.cdiv(hw, _BLOCK * tiles)
    partial = torch.empty((n, chunks, p), dtype=acc, device=feats.device)
    # The atomic feature gradient accumulates in a zeroed fp32/fp64 buffer; the deterministic one is
    # written by its own kernel below.
    grad_feats = feats if deterministic else torch.zeros(feats.shape, dtype=acc, device=feats.device)
    mask_head_backward_kernel[(n, chunks)](
        feats, params, image_index, xy, soi, gt_masks, gt_index, upstream, partial, grad_feats, batch, targets, w, hw,
        p, chunks, UP=up_kind, ATOMIC_GX=not deterministic,
        PREC=DOT_PRECISION if acc == torch.float32 else "ieee", BLOCK=_BLOCK, TILES=tiles, num_warps=_NUM_WARPS,
        **geometry)
    if deterministic:
        # Instances grouped by image, in index order within an image.
        # searchsorted keeps out-of-range indices (unchecked on CUDA) outside every image's range.
        sorted_index, order = torch.sort(image_index, stable=True)
        offsets = torch.searchsorted(sorted_index, torch.arange(batch + 1, device=feats.device))
        grad_feats = torch.empty_like(feats)
        mask_head_feature_grad_kernel[(triton.cdiv(hw, _BLOCK), batch)](
            feats, params, image_index, xy, soi, gt_masks, gt_index, upstream, order, offsets, grad_feats,
            batch, targets, w, hw, p, UP=up_kind, BLOCK=_BLOCK, num_warps=_NUM_WARPS, **geometry)
    return grad_feats.to(feats.dtype), partial.sum(1).to(params.dtype)
