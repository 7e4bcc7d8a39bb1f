"""The dynamic mask head's parameter layout and its dice loss, shared by the fused op, the model and
the reference.

Parameter layout (AdelaiDet ``parse_dynamic_params``): all weights, then all biases,
``[W0 | W1 | ... | W_last | b0 | b1 | ... | b_last]``, each weight row-major ``[out, in]``; layer
0 reads the mask features (plus the relative coordinates, CondInst), the last one has one output.
"""

from __future__ import annotations

from torch import Tensor

COORD_CHANNELS = 2


def layer_shapes(inputs: int, channels: int, num_layers: int) -> list[tuple[int, int]]:
    """``(out, in)`` of every layer: ``inputs -> channels -> ... -> 1``."""
    return [(1 if layer == num_layers - 1 else channels, inputs if layer == 0 else channels)
            for layer in range(num_layers)]


def num_params(inputs: int, channels: int, num_layers: int) -> int:
    """Length of one instance's flat parameter vector (153 for DiffusionInst, 169 for CondInst)."""
    return sum(o * i + o for o, i in layer_shapes(inputs, channels, num_layers))


def dice_loss_from_sums(sums: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-instance dice loss ``1 - 2 Σpg / (Σp² + Σg² + eps)`` (DiffusionInst ``dice_coefficient``)."""
    return 1.0 - 2.0 * sums[:, 0] / (sums[:, 1] + sums[:, 2] + eps)
