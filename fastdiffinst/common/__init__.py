"""Math shared by the fused path (ops, model) and the references, so that a change to an oracle in
:mod:`fastdiffinst.reference` can never silently change the fused path: box conversions and
clipping (``boxes``), the diffusion schedule and time pairs (``diffusion``), the FPN level rule
(``levels``) and the aligned bilinear upsampling (``upsampling``). Imports nothing else of
fastdiffinst.
"""
