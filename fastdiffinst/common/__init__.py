"""Math shared by the fused path (ops, model) and the references, so that a change to an oracle in
:mod:`fastdiffinst.reference` can never silently change the fused path: box conversions and
clipping (``boxes``), the diffusion schedule and time pairs (``diffusion``), the FPN level rule
(``levels``), the aligned bilinear upsampling (``upsampling``), the mask-head parameter layout
and dice loss (``mask_head``) and the index range check of the value checks (``indices``). Imports
nothing else of fastdiffinst.
"""
