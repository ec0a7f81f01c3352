"""ExpertStore: the host tier. Every routed expert as one contiguous buffer.

Per expert the buffer holds gate [I, H], up [I, H] and down [H, I], back to back, so
that the first 2*I*H elements read as Hugging Face's fused gate_up_proj[e] and the last
I*H as down_proj[e]; moving an expert to the device is one copy of one buffer.

On a CUDA host the buffers are page-locked with cudaHostRegister rather than allocated
through torch's pinned allocator: that allocator rounds every block up to a power of two,
which would waste up to half of the host memory a large model needs.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from moeflow.architectures.spec import ModelSpec


class ExpertSource(Protocol):
    """Anything that can produce one routed expert's (gate [I, H], up [I, H], down [H, I])."""

    def read_expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class ExpertStore:
    def __init__(self, source: ExpertSource, spec: ModelSpec, dtype: torch.dtype, *, pin: bool):
        self.source = source
        self.layers = spec.moe_layers
        self.num_experts = spec.num_experts
        self.hidden, self.width = spec.hidden_size, spec.expert_width
        self.numel = spec.expert_numel()
        self.dtype = dtype
        self.expert_bytes = self.numel * torch.empty((), dtype=dtype).element_size()
        # One allocation per MoE layer: few enough registrations, small enough to fail early and clearly.
        self._buffers = {layer: torch.empty(self.num_experts, self.numel, dtype=dtype) for layer in self.layers}
        self._filled = np.zeros((len(self.layers), self.num_experts), dtype=bool)
        self._ordinal = {layer: i for i, layer in enumerate(self.layers)}
        self._registered: list[int] = []
        if pin:
            self._pin()

    def _pin(self) -> None:
        cudart = torch.cuda.cudart()
        for buf in self._buffers.values():
            ptr, size = buf.data_ptr(), buf.numel() * buf.element_size()
            err = cudart.cudaHostRegister(ptr, size, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {size} bytes failed with CUDA error {int(err)}")
            self._registered.append(ptr)

    def get(self, layer: int, expert: int) -> torch.Tensor:
        """The expert's host buffer [3*I*H], read from the source on first use."""
        li = self._ordinal[layer]
        row = self._buffers[layer][expert]
        if not self._filled[li, expert]:
            self._fill(row, layer, expert)
            self._filled[li, expert] = True
        return row

    def _fill(self, row: torch.Tensor, layer: int, expert: int) -> None:
        gate, up, down = self.source.read_expert(layer, expert)
        IH = self.width * self.hidden
        row[:IH].view(self.width, self.hidden).copy_(gate)
        row[IH : 2 * IH].view(self.width, self.hidden).copy_(up)
        row[2 * IH :].view(self.hidden, self.width).copy_(down)

    def fill_all(self, progress: bool = False) -> None:
        """Read every expert now (start-up work that should not count as a step's stall)."""
        todo = [(l, e) for l in self.layers for e in range(self.num_experts) if not self._filled[self._ordinal[l], e]]
        for layer, expert in tqdm(todo, desc="reading experts", unit="expert", disable=not progress or not todo):
            self.get(layer, expert)

    @property
    def is_pinned(self) -> bool:
        return bool(self._registered)

    def close(self) -> None:
        if self._registered:
            cudart = torch.cuda.cudart()
            for ptr in self._registered:
                cudart.cudaHostUnregister(ptr)
            self._registered.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass
