"""Triton kernels for Hiera, installed as ``hiera_fast.kernels``.

Pure tensor functions: no ``torch.nn``, no model knowledge. ``hiera_fast.ops`` is the only caller.
"""
