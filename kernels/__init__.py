"""Triton kernels of fastdiffinst, installed as ``fastdiffinst.kernels``.

Only Triton and torch are imported here; torch.library registrations live in
``fastdiffinst.ops``. Import this package only after ``TRITON_INTERPRET`` has been decided.
"""
