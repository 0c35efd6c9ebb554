"""A fixed-budget decode step as a plain `nn.Module`, for `torch.export` / AOT use: the compressed cache's
tensors become buffers (fixed shapes: the budget, not the context, sets them), so the step's in-place cache
updates are buffer mutations that export records."""

from __future__ import annotations

import torch
from torch import nn

from optpass.backends.kv.cache import CompressedKVCache
from optpass.hf_compat import with_cache


class FixedBudgetDecodeStep(nn.Module):
    """`forward(token [B, 1], position [1]) -> logits [B, 1, V]` over a prefilled `CompressedKVCache`."""

    def __init__(self, model: nn.Module, cache: CompressedKVCache) -> None:
        super().__init__()
        if not cache.layers or any(layer.store is None for layer in cache.layers):
            raise ValueError("prefill the compressed cache (run the prompt through the model) before building a decode step")
        self.model = model
        self.cache = cache
        self._names = [list(layer.tensors()) for layer in cache.layers]
        for i, layer in enumerate(cache.layers):
            for name, tensor in layer.tensors().items():
                self.register_buffer(f"kv{i}_{name}", tensor)

    def forward(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.cache.layers):
            layer.bind({name: getattr(self, f"kv{i}_{name}") for name in self._names[i]})
        return self.model(input_ids=token, **with_cache(self.model, self.cache), cache_position=position,
                          position_ids=position.view(1, -1), use_cache=True).logits
