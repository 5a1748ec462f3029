"""Which category a kernel or operator's time belongs to.

First the enclosing NVTX/record_function ranges: everything inside an ``optimizer`` range is optimizer time,
inside ``data`` data time, inside ``communication`` communication time (the training loop marks these).
Otherwise the kernel or operator name decides, by the first matching rule below; anything unmatched is
elementwise work (activations, residual adds, casts, reductions, the loss's softmax, embedding lookups).
"""
from __future__ import annotations

import re
from typing import Iterable

CATEGORIES = ("gemm", "attention", "elementwise", "norm", "quantization", "optimizer", "communication", "data")
IDLE = "idle"

_RANGE_RULES = (
    ("communication", re.compile(r"^(comm|communication|all_?reduce|all_?gather|reduce_?scatter)", re.I)),
    ("optimizer", re.compile(r"^(optim|optimizer)", re.I)),
    ("data", re.compile(r"^data", re.I)),
)

_NAME_RULES = (
    ("communication", re.compile(r"nccl|all_?reduce|all_?gather|reduce_?scatter|c10d::|broadcast_", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|scaled_dot_product|simple_gla|chunk_\w*gla", re.I)),
    ("gemm", re.compile(r"gemm|matmul|aten::(mm|addmm|bmm|baddbmm|linear|_scaled_mm)\b|nvjet|xmma|cutlass|cublas"
                        r"|[hi]mma|triton_tem_|_mm_kernel|packed_mm|int8_linear|_linear_kernel", re.I)),
    # Inductor names fused kernels after their ops: rounding means a quantizer, rsqrt a norm.
    ("quantization", re.compile(r"quant|ternary|absmean|pack2|unpack|round|fp8_cast|to_fp8", re.I)),
    ("norm", re.compile(r"rms_?norm|layer_?norm|group_?norm|batch_?norm|aten::norm\b|linalg_vector_norm|rsqrt",
                        re.I)),
    ("optimizer", re.compile(r"adam|muon|newton_?schulz|zeropower|orthogonali[sz]e|multi_tensor_apply|_foreach_", re.I)),
)


def from_ranges(ranges: Iterable[str]) -> str | None:
    """The category an enclosing range imposes (innermost ranges are listed last and win)."""
    found = None
    for name in ranges:
        for category, pattern in _RANGE_RULES:
            if pattern.match(name):
                found = category
    return found


def from_name(name: str, trace_category: str = "") -> str:
    if trace_category == "gpu_memcpy":
        return "data" if "htod" in name.lower() else "elementwise"
    for category, pattern in _NAME_RULES:
        if pattern.search(name):
            return category
    return "elementwise"


def categorize(name: str, trace_category: str = "", ranges: Iterable[str] = ()) -> str:
    by_name = from_name(name, trace_category)
    if by_name == "communication":  # an all-reduce inside the optimizer range is still communication
        return by_name
    return from_ranges(ranges) or by_name
