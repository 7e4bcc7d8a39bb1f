"""Data for DiffusionInst: COCO/LVIS-format datasets (pycocotools), the augmentations of the
official training, samplers and loaders, and the embedded synthetic shapes set.

``dataset_from_spec("synthetic" | "coco:ROOT" | "coco:FILE.json:IMAGES" | "lvis:ROOT", split)``
resolves the data argument of the command line.
"""

from fastdiffinst.data.coco import DatasetError, InstanceDataset, read_image
from fastdiffinst.data.loader import (
                                      InferenceSampler,
                                      RepeatFactorTrainingSampler,
                                      TrainingSampler,
                                      collate,
                                      repeat_factors,
                                      train_loader,
)
from fastdiffinst.data.sources import dataset_from_spec
from fastdiffinst.data.transforms import eval_transform, official_train_transform

__all__ = ["DatasetError", "InferenceSampler", "InstanceDataset", "RepeatFactorTrainingSampler", "TrainingSampler",
           "collate", "dataset_from_spec", "eval_transform", "official_train_transform",
           "read_image", "repeat_factors", "train_loader"]
