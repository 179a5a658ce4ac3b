"""Roofline bound of each benchmark case: the time a perfect kernel would need on a given device.

``bound_s = max(bytes / bandwidth, flops / peak)`` with the device's datasheet HBM bandwidth and its dense
peak for the benchmark's dtype; a row's roofline fraction is ``bound_s / measured_s`` (1.0 = at the roof).

Work model, for B rows, in → hidden → out (I, H, N), element size s bytes, P = I·H + H·N (+ H + N with
biases) parameters. FLOPs count the matrix products only (2 per multiply-add); the O(B·N) softmax and the
O(B·H) ReLU are left out. Bytes count *compulsory* traffic only: every input read once, every output written
once, no intermediate (h, logits, gradients inside a training step) ever leaving the chip, so the bound is a
floor no real kernel reaches exactly and the fraction is an upper estimate of the efficiency.

=============  ==========================  ===========================================================
case           FLOPs                       bytes
=============  ==========================  ===========================================================
forward        2B(IH + HN)                 s(B·I + P + B·N)             x, weights in; log-probs out
fwd_bwd        2B(IH + HN) + 2B(HN + HN +  s(B·I + P + B·N + B·N + P)   x, weights, dy in; y, grads out
               IH)  (dW2, dh, dW1; no dx)
loss           as fwd_bwd                  s(B·I + P + P) + 8B + s      x, weights, int64 targets in;
                                                                         grads, loss out
optimizer      2P (momentum 0), 4P         s·3P (momentum 0), s·5P      p, g in, p out (+ buffer in, out)
train_step     loss + optimizer            s(B·I + P + P) + 8B + s (+ s·2P momentum buffer in and out)
=============  ==========================  ===========================================================

Deeper MLPs (``extra_hidden``) count every layer's product in each term; with ``loss="mse"`` the targets are
s·B·N bytes instead of 8B, and with ``optimizer="adam"`` the train step reads and writes two state tensors (s·4P)
instead of the momentum buffer.

Peaks are vendor datasheet numbers ("up to", at boost clock), dense (the datasheets' tensor-core figures
marked * are with 2:4 sparsity and are halved here): fp32 = the FP32 CUDA-core peak (IEEE fp32 matmuls do not
run on tensor cores), tf32 = TF32 tensor core, bf16 = BF16 tensor core. Sources:

- H100 SXM / PCIe / NVL: NVIDIA H100 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h100/
  (SXM: FP32 67, TF32 989*, BF16 1,979* TFLOPS, 3.35 TB/s; PCIe: 51, 756*, 1,513*, 2.0 TB/s;
  NVL: 60, 835*, 1,671*, 3.9 TB/s).
- H200 SXM / NVL: NVIDIA H200 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h200/
  (SXM: 67, 989*, 1,979*, 4.8 TB/s; NVL: 60, 835*, 1,671*, 4.8 TB/s).
- A100: NVIDIA A100 Tensor Core GPU datasheet, https://www.nvidia.com/content/dam/en-zz/Solutions/
  Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
  (FP32 19.5, TF32 312*, BF16 624* TFLOPS; 80GB SXM 2,039 GB/s, 80GB PCIe 1,935 GB/s, 40GB 1,555 GB/s).

CPUs and GPUs not in the table get no roofline ("n/a"): no datasheet peak is assumed for them.
"""
from __future__ import annotations

import dataclasses

TERA = 1e12


@dataclasses.dataclass(frozen=True)
class Peak:
    """A device's dense peaks in FLOP/s per benchmark dtype and its memory bandwidth in bytes/s."""

    name: str
    bandwidth: float
    flops: dict

    def bound_s(self, flops: float, nbytes: float, dtype: str) -> float:
        """The roofline time: max(bytes / bandwidth, FLOPs / peak for ``dtype``)."""
        return max(nbytes / self.bandwidth, flops / self.flops[dtype])


def _peak(name, fp32, tf32_sparse, bf16_sparse, tb_per_s):
    return Peak(name, tb_per_s * TERA, {"fp32": fp32 * TERA, "tf32": tf32_sparse / 2 * TERA,
                                        "bf16": bf16_sparse / 2 * TERA})


# (substrings that must all occur in the lower-cased torch.cuda.get_device_name(), peak); first match wins.
PEAKS = (
    (("h100", "nvl"), _peak("H100 NVL", 60, 835, 1671, 3.9)),
    (("h100", "pcie"), _peak("H100 PCIe", 51, 756, 1513, 2.0)),
    (("h100",), _peak("H100 SXM", 67, 989, 1979, 3.35)),
    (("h200", "nvl"), _peak("H200 NVL", 60, 835, 1671, 4.8)),
    (("h200",), _peak("H200 SXM", 67, 989, 1979, 4.8)),
    (("a100", "80gb", "pcie"), _peak("A100 80GB PCIe", 19.5, 312, 624, 1.935)),
    (("a100", "80gb"), _peak("A100 80GB SXM", 19.5, 312, 624, 2.039)),
    (("a100",), _peak("A100 40GB", 19.5, 312, 624, 1.555)),
)


def peak_for(device_name: str) -> Peak | None:
    """The datasheet peak of a CUDA device, by its name; None for devices not in :data:`PEAKS` (CPUs too)."""
    name = device_name.lower()
    for keys, peak in PEAKS:
        if all(key in name for key in keys):
            return peak
    return None


def work(case: str, batch: int, n_in: int, hidden: int, n_out: int, bias: bool, elem: int,
         momentum: float | None, *, extra_hidden: tuple = (), loss: str = "nll",
         optimizer: str = "sgd") -> tuple[float, float]:
    """(FLOPs, compulsory bytes) of one call of ``case``, by the model in the module docstring.

    ``extra_hidden``: further hidden layers after the first (a deeper MLP: the matrix products of every layer,
    the hidden gradients of every layer but the first); ``loss``: "nll" (int64 class targets) or "mse" (targets
    of the model's dtype, one per output); ``optimizer``: "sgd" (a momentum buffer when ``momentum``) or "adam"
    (two state tensors, read and written)."""
    if loss not in ("nll", "mse"):
        raise ValueError(f"loss must be 'nll' or 'mse'; got {loss!r}")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam'; got {optimizer!r}")
    widths = (n_in, hidden, *extra_hidden, n_out)
    layers = list(zip(widths[:-1], widths[1:]))
    params = sum(a * b for a, b in layers) + (sum(widths[1:]) if bias else 0)
    fwd = 2 * batch * sum(a * b for a, b in layers)
    bwd = fwd + 2 * batch * sum(a * b for a, b in layers[1:])  # every dW, every hidden layer's gradient; no dx
    x_bytes = elem * batch * n_in
    target_bytes = 8 * batch if loss == "nll" else elem * batch * n_out
    loss_bytes = elem * (2 * params) + target_bytes + elem
    states = 2 if optimizer == "adam" else 1 if momentum else 0
    opt_flops = (4 if states else 2) * params
    opt_bytes = elem * (3 + 2 * states) * params
    if case == "forward":
        return fwd, x_bytes + elem * (params + batch * n_out)
    if case == "fwd_bwd":
        return fwd + bwd, x_bytes + elem * (2 * params + 2 * batch * n_out)
    if case == "loss":
        return fwd + bwd, x_bytes + loss_bytes
    if case == "optimizer":
        return opt_flops, opt_bytes
    if case == "train_step":
        return fwd + bwd + opt_flops, x_bytes + loss_bytes + elem * 2 * states * params
    raise ValueError(f"case must be one of forward, fwd_bwd, loss, optimizer, train_step; got {case!r}")
