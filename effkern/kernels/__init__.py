"""Triton kernels and their launchers (no torch.library registration here)."""
