"""Running DiffusionInst: COCO/LVIS evaluation (``evaluation``) and the demo's pictures (``demo``)."""
