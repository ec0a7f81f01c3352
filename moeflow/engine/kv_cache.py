"""KV cache: one row per running sequence, allocated once.

Shapes: L layers, R rows (= max_batch_size), G KV heads, M max_model_len, D head dim.
Keys and values are two [L, R, G, M, D] tensors. A sequence holds one row from admission
to finish, so a step never allocates, and a decode step's addresses stay fixed.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, rows, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._free = list(range(rows - 1, -1, -1))
        self.rows = rows
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def can_allocate(self) -> bool:
        return bool(self._free)

    def allocate(self) -> int:
        return self._free.pop()

    def free(self, row: int) -> None:
        self._free.append(row)

    @property
    def num_free(self) -> int:
        return len(self._free)
