"""Small helpers shared by the launchers: matmul precision and block sizes."""
import torch
import triton


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``tl.dot`` input precision: TF32 for float32 only when PyTorch allows it for matmuls
    (``torch.backends.cuda.matmul.allow_tf32``), IEEE fp32 otherwise. Half types ignore it."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def dot_block(n: int, cap: int) -> int:
    """A power-of-two block covering ``n`` (at least 16, the smallest ``tl.dot`` side), capped at ``cap``."""
    return min(max(16, triton.next_power_of_2(n)), cap)
