"""Throughput studies of fastdiffinst (``python -m benchmarks.run`` from the repository root); nothing in
fastdiffinst imports this package."""
