"""Caller buffers as NIXL sees them: address, length, memory type, and a host view."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kvpool.codec import DType
from kvpool.errors import BadRequest

try:  # torch is a dependency, but the client also works on plain numpy buffers
    import torch
except ImportError:  # pragma: no cover
    torch = None  # type: ignore[assignment]


@dataclass(slots=True)
class BufferView:
    address: int
    nbytes: int
    mem_type: str  # "DRAM" or "VRAM"
    device: int
    owner: Any  # the object whose memory this is; registration keeps it alive

    def host_bytes(self) -> np.ndarray:
        """The bytes, for checksums and staging: zero-copy for host memory, a copy for GPU."""
        owner = self.owner
        if isinstance(owner, np.ndarray):
            return owner if owner.dtype == np.uint8 and owner.ndim == 1 else owner.reshape(-1).view(np.uint8)
        if self.mem_type == "VRAM":
            return owner.reshape(-1).view(torch.uint8).cpu().numpy()
        return owner.reshape(-1).view(torch.uint8).numpy()


def view(obj: Any, writable: bool) -> BufferView:
    """Describe a numpy array, torch tensor or bytes-like object; it must be contiguous."""
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise BadRequest("buffers must be C-contiguous; use np.ascontiguousarray")
        if writable and not obj.flags.writeable:
            raise BadRequest("a get needs a writable buffer")
        return BufferView(obj.ctypes.data, obj.nbytes, "DRAM", 0, obj)
    if torch is not None and isinstance(obj, torch.Tensor):
        if not obj.is_contiguous():
            raise BadRequest("tensors must be contiguous; call .contiguous() first")
        gpu = obj.is_cuda
        return BufferView(obj.data_ptr(), obj.numel() * obj.element_size(),
                          "VRAM" if gpu else "DRAM", obj.get_device() if gpu else 0, obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(obj, dtype=np.uint8)
        if writable and not arr.flags.writeable:
            raise BadRequest("a get needs a writable buffer (bytearray, numpy array or tensor)")
        return BufferView(arr.ctypes.data if arr.size else 0, arr.nbytes, "DRAM", 0, arr)
    raise BadRequest(f"unsupported buffer type {type(obj).__name__}: "
                     "pass a numpy array, a torch tensor or bytes")


def describe(obj: Any) -> tuple[DType, tuple[int, ...]]:
    """Element type and shape for a block's header; unknown types are stored as bytes."""
    if isinstance(obj, np.ndarray):
        name, shape = obj.dtype.name, obj.shape
    elif torch is not None and isinstance(obj, torch.Tensor):
        name, shape = str(obj.dtype), tuple(obj.shape)
    else:
        return DType.UINT8, (memoryview(obj).nbytes,)
    try:
        return DType.parse(name), tuple(shape)
    except BadRequest:
        return DType.UINT8, (int(np.prod(shape)) * (obj.itemsize if hasattr(obj, "itemsize")
                                                     else obj.element_size()),)
