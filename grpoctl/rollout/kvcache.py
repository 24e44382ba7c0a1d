"""A KV cache that appends in place: the decode loop's cache without a copy per token.

transformers' DynamicCache appends each new token's keys and values with torch.cat,
which copies the layer's whole cache every step: for a batch of 128 rows on
SmolLM2-135M that copy was a fifth of the decode time on 2 CPU cores. `preallocate`
gives each plain full-attention layer a buffer with room for the whole completion,
writes each step's keys and values into it and hands attention a view of the filled
part: the same numbers, no copy (0.94x the rollout's time there:
bench/bench_hf_rollout.py).

Only layers of exactly transformers' DynamicLayer are converted; sliding-window,
quantized or a remote model's own layers keep their own behaviour.
"""

from __future__ import annotations

import torch

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # a transformers without cache layers: nothing to convert
    DynamicLayer = None


if DynamicLayer is not None:

    class AppendInPlaceLayer(DynamicLayer):
        """A DynamicLayer whose keys/values are views of the first `length` positions of
        buffers with room for `capacity`; `update` writes there (a copy of the new token
        only) and grows the buffers by doubling if a caller goes past the capacity."""

        def __init__(self, layer, capacity: int):
            super().__init__()
            self.device, self.is_initialized = layer.keys.device, True
            self._set(layer.keys, layer.values, max(capacity, layer.keys.shape[-2]))

        def _set(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
            batch, heads, length, dim = keys.shape
            self._keys = keys.new_empty(batch, heads, capacity, dim)
            self._values = values.new_empty(batch, values.shape[1], capacity, values.shape[-1])
            self._keys[:, :, :length] = keys
            self._values[:, :, :length] = values
            self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]

        def update(self, key_states, value_states, *args, **kwargs):
            start, end = self.keys.shape[-2], self.keys.shape[-2] + key_states.shape[-2]
            if end > self._keys.shape[-2]:
                self._set(self.keys, self.values, 2 * end)
            self._keys[:, :, start:end] = key_states
            self._values[:, :, start:end] = value_states
            self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Keep rows `indices`, in that order. Only rows whose place changes are copied,
            so filling a finished row's place with the last row costs one row, not the cache."""
            rows = len(indices)
            if rows > self._keys.shape[0]:  # more rows than the buffer holds: gather them all
                self._keys, self._values = self._keys[indices], self._values[indices]
            else:
                moved = (indices != torch.arange(rows, device=indices.device)).nonzero()[:, 0]
                source = indices[moved]  # gathered before written: safe for any order
                self._keys[moved], self._values[moved] = self._keys[source], self._values[source]
                self._keys, self._values = self._keys[:rows], self._values[:rows]
            length = self.keys.shape[-2]
            self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]


def preallocate(cache, capacity: int) -> bool:
    """Convert, in place, every filled plain DynamicLayer of `cache` into an
    AppendInPlaceLayer with room for `capacity` positions (prompt + completion).
    True when every layer is now one (rows then leave the cache at the cost of a row)."""
    if DynamicLayer is None:
        return False
    layers = getattr(cache, "layers", None) or []
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4:
            layers[i] = AppendInPlaceLayer(layer, capacity)
    return bool(layers) and all(type(layer) is AppendInPlaceLayer for layer in layers)
