"""ExpertStore: the host tier. Every routed expert as one contiguous buffer.

Per expert the buffer holds gate [I, H], up [I, H] and down [H, I], back to back, so
that the first 2*I*H elements read as Hugging Face's fused gate_up_proj[e] and the last
I*H as down_proj[e]; moving an expert to the device is one copy of one buffer.

On a CUDA host the buffers are page-locked with cudaHostRegister rather than allocated
through torch's pinned allocator: that allocator rounds every block up to a power of two,
which would waste up to half of the host memory a large model needs.

Filling an expert's buffer reads every byte of it, so that is where experts are checked for
NaN and Inf (in the dtype kept, which also catches a value the cast overflowed). The engine
fills every buffer at start-up (`read_all`), so a bad expert refuses the model at load rather
than failing the first request that routes to it; a store filled on demand refuses the expert
when it is first asked for, naming the tensor.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from moeflow.architectures.spec import ModelSpec
from moeflow.weights.finite import first_nonfinite, nonfinite_error

PARTS = ("gate", "up", "down")
_PROGRESS_BYTES = 4 * 2**30  # a start-up read long enough to want a progress bar


class ExpertSource(Protocol):
    """Anything that can produce one routed expert's (gate [I, H], up [I, H], down [H, I])."""

    def read_expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class ExpertStore:
    def __init__(self, source: ExpertSource, spec: ModelSpec, dtype: torch.dtype, *, pin: bool,
                 read_all: bool = False, allow_nonfinite: bool = False):
        """`read_all`: fill (and check) every expert now; `allow_nonfinite`: keep experts holding NaN or Inf."""
        self.source = source
        self.allow_nonfinite = allow_nonfinite
        self.layers = spec.moe_layers
        self.num_experts = spec.num_experts
        self.top_k = spec.router.top_k
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
        if read_all:
            self.fill_all(progress=self.num_experts * len(self.layers) * self.expert_bytes >= _PROGRESS_BYTES)

    def _pin(self) -> None:
        cudart = torch.cuda.cudart()
        for buf in self._buffers.values():
            ptr, size = buf.data_ptr(), buf.numel() * buf.element_size()
            err = cudart.cudaHostRegister(ptr, size, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {size} bytes failed with CUDA error {int(err)}")
            self._registered.append(ptr)

    def get(self, layer: int, expert: int) -> torch.Tensor:
        """The expert's host buffer [3*I*H], read (and checked) from the source on first use."""
        li = self._ordinal[layer]
        row = self._buffers[layer][expert]
        if not self._filled[li, expert]:
            self._fill(row, layer, expert)
            self._check(layer, [expert])
            self._filled[li, expert] = True
        return row

    def fill_all(self, progress: bool = False) -> None:
        """Read every expert now (start-up work that should not count as a step's stall).

        Each layer is checked in one pass once its experts are in: a reduction per small expert would
        cost more in thread start-up than in reading.
        """
        total = int((~self._filled).sum())
        with tqdm(total=total, desc="reading experts", unit="expert", disable=not progress or not total) as bar:
            for layer in self.layers:
                li = self._ordinal[layer]
                todo = np.flatnonzero(~self._filled[li]).tolist()
                for expert in todo:
                    self._fill(self._buffers[layer][expert], layer, expert)
                    bar.update(1)
                self._check(layer, todo)
                self._filled[li, todo] = True

    def _fill(self, row: torch.Tensor, layer: int, expert: int) -> None:
        gate, up, down = self.source.read_expert(layer, expert)
        IH = self.width * self.hidden
        row[:IH].view(self.width, self.hidden).copy_(gate)
        row[IH : 2 * IH].view(self.width, self.hidden).copy_(up)
        row[2 * IH :].view(self.hidden, self.width).copy_(down)

    def _check(self, layer: int, experts: list[int]) -> None:
        """Refuse the first of these just-filled experts that holds NaN or Inf, naming its tensor."""
        if self.allow_nonfinite or not experts:
            return
        buf = self._buffers[layer]
        if len(experts) == self.num_experts:
            found = first_nonfinite(buf)
            bad = [found[0][0]] if found is not None else []
        else:
            bad = [e for e in experts if first_nonfinite(buf[e]) is not None][:1]
        if bad:
            self._refuse(layer, bad[0])

    def _refuse(self, layer: int, expert: int) -> None:
        IH = self.width * self.hidden
        row = self._buffers[layer][expert]
        parts = (row[:IH].view(self.width, self.hidden), row[IH : 2 * IH].view(self.width, self.hidden),
                 row[2 * IH :].view(self.hidden, self.width))
        read = self.source.read_expert(layer, expert)  # again, to tell a bad file from a cast that overflowed
        describe = getattr(self.source, "describe_expert", None)  # sources made for tests need not say
        for part, kept, original in zip(PARTS, parts, read):
            if (found := first_nonfinite(kept)) is None:
                continue
            what = describe(layer, expert, part) if describe else f"routed expert {expert} of layer {layer} ({part})"
            note = "" if first_nonfinite(original) is not None else (
                f" once cast from {str(original.dtype).removeprefix('torch.')} to "
                f"{str(self.dtype).removeprefix('torch.')}, a value too large for it (choose another --dtype)")
            raise nonfinite_error(what, kept, found, note)

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
