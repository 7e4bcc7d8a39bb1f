"""Throughput studies of fastdiffinst (``python benchmarks/run.py``); nothing imports this package."""
