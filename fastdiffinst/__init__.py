"""fastdiffinst: a fast, trainable DiffusionInst on fused kernels.

``fastdiffinst.ops`` holds the fused ops (importable on their own, without the model).
"""

__version__ = "0.1.0"
