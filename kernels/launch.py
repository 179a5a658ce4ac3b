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


def hidden_block(n_hidden: int, block_out: int) -> int:
    """The hidden slice of a kernel that holds a ``BLOCK_H × BLOCK_OUT`` tile of w2: at most 64 and at most
    4096 / BLOCK_OUT (at least 16). Larger w2 tiles overflow shared memory (out = 1024: 256 KB at BLOCK_H = 64)
    or spill registers on the IEEE fp32 path (bench/results/compile/)."""
    return dot_block(n_hidden, max(16, min(64, 4096 // block_out)))
