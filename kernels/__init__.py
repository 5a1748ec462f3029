"""Triton kernels, one file per op family, imported as ``tgolf.kernels.<family>``.

Only ``@triton.jit`` kernels and their launch helpers live here: no autograd and no dispatch
(that is in ``tgolf.ops.<family>``).
"""
