"""Building blocks shared by every family: RMSNorm, rotary embedding, attention, dense MLP.

Shapes: T tokens in the step (sequences flattened), H hidden, N query heads, G KV heads,
D head dim, C context length (past + new tokens).

Numerics follow the reference implementations the checkpoints were trained with:
norms compute in float32 and cast back before the weight multiplies; rotary tables are
computed in float32 and cast to the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

# The attention backends a prefill may use (callers run attend_prefill under sdpa_kernel of these, entered
# once per layer rather than once per sequence: the context manager is Python and not free). cuDNN's is left out: it builds an execution plan for every
# new shape, which on Hopper costs far more than the attention itself, and prefill shapes change with every
# prompt length. Decode keeps torch's own choice: its shapes are fixed per CUDA-graph bucket.
PREFILL_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class Rotary:
    """cos/sin tables for every position up to max_len, [max_len, D] in the model dtype."""

    def __init__(self, head_dim: int, theta: float, max_len: int, dtype: torch.dtype, device: torch.device):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(dtype).to(device)
        self.sin = emb.sin().to(dtype).to(device)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] rotated by the angles of `positions` [T]."""
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


def dense_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [.., Tq, Tk]: True where a query may attend to a key."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return allowed


def attend_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float, window: int | None
) -> torch.Tensor:
    """One sequence's new tokens against its whole context.

    q [n, N, D] for positions start..start+n-1; k, v [G, C, D] with C = start + n.
    Returns [n, N*D].
    """
    n, num_heads, _ = q.shape
    qh = q.transpose(0, 1)[None]  # [1, N, n, D]
    kh, vh = k[None], v[None]  # [1, G, C, D]
    gqa = num_heads != k.shape[0]
    if start == 0 and window is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        q_pos = torch.arange(start, start + n, device=q.device)
        k_pos = torch.arange(k.shape[1], device=q.device)
        mask = _window_mask(q_pos, k_pos, window)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1).reshape(n, -1)


def attend_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_lens: torch.Tensor, scale: float, window: int | None
) -> torch.Tensor:
    """One new token per sequence against its cached context.

    q [B, N, D]; k, v [B, G, C, D] padded to the longest context C; context_lens [B].
    Returns [B, N*D].
    """
    B, num_heads, _ = q.shape
    k_pos = torch.arange(k.shape[2], device=q.device)
    q_pos = context_lens - 1
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > (q_pos[:, None] - window)
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=allowed[:, None, None, :], scale=scale,
                                         enable_gqa=num_heads != k.shape[1])
    return out[:, :, 0, :].reshape(B, -1)
