"""Triton kernels, one file per op family, imported as ``tgolf.kernels.<family>``.

Only ``@triton.jit`` kernels and their launch helpers live here: no autograd and no dispatch
(that is in ``tgolf.ops.<family>``).
"""
from tgolf.backend import fix_triton_interpreter

fix_triton_interpreter()  # before any kernel here runs on the CPU interpreter (TRITON_INTERPRET=1)
