"""The device's image of the expert cache's slot map: [L, E] int32, -1 where an expert has no live slot.

Kernels map (layer, expert) -> slot through it without asking the host. The host's map stays the authority;
`upload` copies it over, on the current stream, through a ring of pinned staging buffers: a buffer is written
again only once the copy that last read it has run, so the host never waits for the copy it just issued.
"""

from __future__ import annotations

import numpy as np
import torch

STAGING_BUFFERS = 8  # uploads in flight before the host waits for the oldest (a few per decode step)


class DeviceSlotTable:
    def __init__(self, num_layers: int, num_experts: int, device: torch.device):
        self.table = torch.full((num_layers, num_experts), -1, dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        self._staging = [torch.empty(num_layers, num_experts, dtype=torch.int32, pin_memory=pin)
                         for _ in range(STAGING_BUFFERS if pin else 1)]
        self._staging_host = [t.numpy() for t in self._staging]  # numpy views of the same memory
        self._staging_done = [torch.cuda.Event() if pin else None for _ in self._staging]
        self._next = 0

    def upload(self, live: np.ndarray, stream: torch.cuda.Stream | None) -> None:
        """Make the device table `live` ([L, E], the host's map), ordered on `stream`, the current one (the
        compute stream, which the caller keeps so that it is not looked up at every upload; None on the CPU)."""
        i = self._next
        self._next = (i + 1) % len(self._staging)
        done = self._staging_done[i]
        if done is not None:
            done.synchronize()  # the copy that last read this staging buffer has run
        np.copyto(self._staging_host[i], live)
        self.table.copy_(self._staging[i], non_blocking=done is not None)
        if done is not None:
            done.record(stream)
