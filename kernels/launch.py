"""Small helpers shared by the launchers: matmul precision, the launch device, block sizes, SM counts and the
split reductions' arrival counters."""
import contextlib
import functools

import torch
import triton
import triton.language as tl


def cuda_tf32_enabled() -> bool:
    """Whether PyTorch lets CUDA float32 matmuls use TF32.

    Reads ``torch.backends.cuda.matmul.fp32_precision`` (``"tf32"``, ``"ieee"``, or ``"none"`` = inherited from
    ``torch.backends.fp32_precision``, which the property already resolves), the API PyTorch recommends. The
    legacy ``allow_tf32`` flag sets that property too, so both APIs are honoured; reading ``allow_tf32`` itself
    raises ("mix of the legacy and new APIs") once the new API was used, so it is read only on a torch without
    the new property.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    return precision == "tf32"


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``tl.dot`` input precision: TF32 for float32 on CUDA only when PyTorch allows it for matmuls
    (:func:`cuda_tf32_enabled`), IEEE otherwise. Half types and float64 ignore it."""
    if dtype == torch.float32 and device.type == "cuda" and cuda_tf32_enabled():
        return "tf32"
    return "ieee"


def acc_dtype(dtype: torch.dtype):
    """The kernels' accumulator type for tensors of ``dtype``: fp64 for float64, fp32 otherwise (16-bit types
    accumulate in fp32, as PyTorch's matmuls do)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def on_device(device: torch.device):
    """A context that makes ``device`` the current CUDA device for a launch: Triton launches on the current
    device and its current stream, so tensors on ``cuda:1`` while ``cuda:0`` is current would get foreign
    pointers. A no-op off CUDA and when ``device`` is already current (the common case: one comparison)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def dot_block(n: int, cap: int) -> int:
    """A power-of-two block covering ``n`` (at least 16, the smallest ``tl.dot`` side), capped at ``cap``."""
    return min(max(16, triton.next_power_of_2(n)), cap)


def sm_count(device: torch.device, given: int | None = None):
    """The SMs a launch on ``device`` can fill: ``given`` when not None (a GPU the compile report stands for),
    the CUDA device's count, None off CUDA (Triton's interpreter runs programs one after another: nothing to
    fill, so the launchers do not split there)."""
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


COUNTERS = {}  # (kernel, device, size) -> int32 zeros: split tiles' arrival counters (each launch leaves them 0)


def arrival_counters(kernel: str, device: torch.device, size: int) -> torch.Tensor:
    """``size`` int32 zeros for the split reductions of ``kernel``'s launches (:func:`pyfused.kernels.gemm.
    split_reduce`): every launch leaves them zero, so they are made once per (kernel, device, size) and reused,
    CUDA-graph replays included. Launches of one kernel on two streams at once would share them: pyfused's
    launches of a step are on one stream."""
    key = (kernel, device, size)
    counters = COUNTERS.get(key)
    if counters is None:
        counters = torch.zeros(size, dtype=torch.int32, device=device)
        if device.type != "meta" and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            COUNTERS[key] = counters  # one made during a capture is the graph's own (its memset is recorded)
    return counters


_observers = []  # callables told of every launch (see observe)


def launch(kernel, grid, device: torch.device, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` with ``device`` current (:func:`on_device`): every pyfused launch goes
    through here, so a kernel always runs on its tensors' GPU and that GPU's current stream. Returns what Triton
    returns (the compiled kernel on a GPU)."""
    with on_device(device):
        compiled = kernel[grid](*args, **kwargs)
    if _observers:
        for observer in _observers:
            observer(Launched(kernel, grid, device, args, kwargs, compiled))
    return compiled


class Launched:
    """One launch as :func:`observe` reports it: the jit function, grid, device, arguments and Triton's result
    (a ``CompiledKernel`` on a GPU, with ``n_regs`` / ``n_spills``). :meth:`again` repeats it exactly."""

    __slots__ = ("kernel", "grid", "device", "args", "kwargs", "compiled")

    def __init__(self, kernel, grid, device, args, kwargs, compiled):
        self.kernel, self.grid, self.device, self.args, self.kwargs, self.compiled = \
            kernel, grid, device, args, kwargs, compiled

    @property
    def name(self) -> str:
        return getattr(getattr(self.kernel, "fn", None), "__name__", None) or getattr(self.kernel, "__name__", "?")

    def again(self):
        with on_device(self.device):
            return self.kernel[self.grid](*self.args, **self.kwargs)


@contextlib.contextmanager
def observe(callback):
    """Tell ``callback`` of every launch made inside the block (a :class:`Launched` each): launch counts, the
    compiled kernels' resources, single launches to time (``python -m bench.gpu_check``)."""
    _observers.append(callback)
    try:
        yield
    finally:
        _observers.remove(callback)
