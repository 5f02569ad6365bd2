"""The Transformers engine's KV cache: MLA latents of many sequences, in rows of one tensor.

Each layer keeps one (rows, capacity, kv_lora_rank + qk_rope_head_dim) tensor; a running
sequence owns a row and its tokens sit at their positions. Running sequences occupy rows
0..n-1, so a batched decode step reads ``[:n, :longest]`` as a view (no gather); when one
finishes, the last row moves into its place. The tensors grow (capacity doubling, rows
up to ``max_rows``) when a longer or additional sequence needs it.

It is handed to the model as its cache: ``update(key, value, layer_idx, cache_kwargs)`` is
the method Kimi-VL's attention calls (the same one transformers' ``DynamicCache`` has), with
``cache_kwargs["cache_index"]`` (B, T) the position of each new token; :meth:`select` says
which rows and how many positions the next forward pass covers.
"""
from __future__ import annotations

import torch

_ROUND = 256  # capacity grows in multiples of this many positions


class LatentCache:
    def __init__(self, num_layers: int, latent_dim: int, rope_dim: int, *, max_rows: int, dtype, device):
        self.num_layers, self.latent_dim, self.rope_dim = num_layers, latent_dim, rope_dim
        self.max_rows, self.dtype, self.device = max_rows, dtype, device
        self.rows = 0  # allocated rows
        self.capacity = 0  # allocated positions per row
        self.layers: list[torch.Tensor] = []
        self._rows = slice(0, 0)
        self._length = 0

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * (self.latent_dim + self.rope_dim) * torch.empty((), dtype=self.dtype).element_size()

    def reserve(self, rows: int, length: int) -> None:
        """Room for ``rows`` sequences of ``length`` positions (grows, never shrinks)."""
        if rows > self.max_rows:
            raise ValueError(f"{rows} rows asked; the cache has at most {self.max_rows}")
        if rows <= self.rows and length <= self.capacity:
            return
        new_rows = min(self.max_rows, max(rows, 2 * self.rows)) if rows > self.rows else self.rows
        new_cap = self.capacity
        if length > self.capacity:
            new_cap = max(length, 2 * self.capacity)
            new_cap = -(-new_cap // _ROUND) * _ROUND
        width = self.latent_dim + self.rope_dim
        grown = []
        for old in self.layers or [None] * self.num_layers:
            t = torch.zeros(new_rows, new_cap, width, dtype=self.dtype, device=self.device)
            if old is not None:
                t[: self.rows, : self.capacity] = old
            grown.append(t)
        self.layers, self.rows, self.capacity = grown, new_rows, new_cap

    def select(self, rows: slice, length: int) -> None:
        """The next forward pass covers these rows and attends over positions [0, length)."""
        self._rows, self._length = rows, length

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` positions to row ``dst`` (compaction)."""
        for t in self.layers:
            t[dst, :length] = t[src, :length]

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
        """key (B, 1, T, latent), value (B, 1, T, rope) of the new tokens at cache_index (B, T):
        stored, then the rows' first ``length`` positions returned as (B, 1, length, ·) views."""
        buf = self.layers[layer_idx][self._rows]
        index = cache_kwargs["cache_index"]
        b = index.shape[0]
        new = torch.cat([key_states[:, 0], value_states[:, 0]], dim=-1).to(self.dtype)
        buf[torch.arange(b, device=index.device).unsqueeze(1), index] = new
        view = buf[:, : self._length]
        return view[..., : self.latent_dim].unsqueeze(1), view[..., self.latent_dim:].unsqueeze(1)
