"""Hedgehog feature maps (Zhang et al. 2024), as LoLCATs uses them: per head a learnable d x d' map W, and
phi(x) = [softmax(x W), softmax(-x W)] over the feature dimension. The softmax makes phi non-negative and
"spiky" (a few large features), which is what lets a dot product phi(q).phi(k) imitate exp(q.k); the negated half
keeps directions a plain softmax would squash. Queries and keys get separate maps (LoLCATs), keys per key head so a
decode state stays per key head under GQA. `log_gain` is the per-query-head weight of the linear part against the
exact window (the hybrid's mixing scalar).

The maps live as a submodule of the attention module they serve (`attach`), so their weights are in the model's
state dict: checkpoints store and load them with every other tensor."""

from __future__ import annotations

import torch
from torch import Tensor, nn

ATTR = "optpass_hedgehog"  # attribute of an attention module holding its fitted maps


class HedgehogMaps(nn.Module):
    """Query and key feature maps of one attention layer plus the linear part's per-head gain."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, feature_dim: int | None = None) -> None:
        super().__init__()
        feat = feature_dim or head_dim
        eye = torch.eye(head_dim, feat)  # identity-like start: phi(x) = softmax(+-x)
        self.query_weight = nn.Parameter(eye.repeat(heads, 1, 1))  # [Hq, d, d']
        self.key_weight = nn.Parameter(eye.repeat(kv_heads, 1, 1))  # [Hk, d, d']
        self.log_gain = nn.Parameter(torch.zeros(heads))  # [Hq]; gain 1 at the start

    @property
    def features(self) -> int:
        """F, the size of phi(x): twice the projected dimension."""
        return 2 * self.query_weight.shape[-1]

    @staticmethod
    def _phi(x: Tensor, weight: Tensor) -> Tensor:
        proj = torch.einsum("bhsd,hdf->bhsf", x.float(), weight.float())
        return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], dim=-1)

    def query(self, x: Tensor) -> Tensor:
        """phi_q(x): [B, Hq, S, d] -> [B, Hq, S, F] in fp32."""
        return self._phi(x, self.query_weight)

    def key(self, x: Tensor) -> Tensor:
        """phi_k(x): [B, Hk, S, d] -> [B, Hk, S, F] in fp32."""
        return self._phi(x, self.key_weight)

    def gain(self) -> Tensor:
        """[Hq] weight of the linear part (positive)."""
        return self.log_gain.float().exp()


def maps_of(module: nn.Module) -> HedgehogMaps | None:
    """The fitted maps of an attention module converted to the hybrid, else None."""
    maps = getattr(module, ATTR, None)
    return maps if isinstance(maps, HedgehogMaps) else None


def attach(module: nn.Module, maps: HedgehogMaps | None) -> None:
    """Give `module` its maps as a submodule (None removes them)."""
    if maps is None:
        if ATTR in module._modules:
            del module._modules[ATTR]
        return
    module.add_module(ATTR, maps)
