"""Triton kernels and their launchers, each beside the plain PyTorch reference it must match.

Installed as ``clear_fast.kernels``. Nothing here is an autograd function or a module:
those live in ``clear_fast``.
"""
