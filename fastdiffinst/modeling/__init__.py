"""DiffusionInst on the fused ops: backbones (ResNet, Swin), FPN, mask branch, the DiffusionDet
decoder with the controller, DDIM sampling and post-processing.

``DiffusionInst(get_config("r50_coco"))`` builds the official R-50 COCO model; see
:mod:`fastdiffinst.config` for the presets and :mod:`fastdiffinst.checkpoint` for official weights.
"""

from fastdiffinst.modeling.detector import DiffusionInst, Features, ImageBatch, TrainingOutputs
from fastdiffinst.modeling.implementation import OPS_IMPLS, OpsImplementation, ops_implementation
from fastdiffinst.modeling.sampler import DrawSource, GeneratorDraws, HeadOutput, OfficialDraws, SamplingStep

__all__ = ["DiffusionInst", "DrawSource", "Features", "GeneratorDraws", "HeadOutput", "ImageBatch", "OPS_IMPLS",
           "OfficialDraws", "OpsImplementation", "SamplingStep", "TrainingOutputs", "ops_implementation"]
