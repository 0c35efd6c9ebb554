"""An export that changes weights is a candidate like any other: its float twin (every quantized linear
replaced by an nn.Linear holding the weight the engine will compute with) is scored against the twin of
optpass's own weights with the quality guard, on the same data and budget `optimize()` uses. Comparing two
fp32 twins isolates what the format changes from the kernels' arithmetic."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from optpass.backends.cpu import prefill_attention
from optpass.backends.cpu.head_embedding import HeadRowsEmbedding, set_module
from optpass.backends.cpu.quant_linear import QuantizedLinear
from optpass.export.common import LinearWeights, linear_weights

WeightFor = Callable[[LinearWeights], torch.Tensor]


def float_twin(model: nn.Module, weight_for: WeightFor) -> nn.Module:
    """A copy of `model` whose quantized linears are nn.Linear with `weight_for(layer)` (fp32). The quantized
    modules and optpass's records are not copied (a placeholder / shared), only the float rest."""
    quantized = {p: m for p, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    memo: dict[int, Any] = {id(m): nn.Identity() for m in quantized.values()}
    for attr in ("optpass_report", "optpass_plan", "optpass_runtime", "optpass_checkpoint"):
        if hasattr(model, attr):
            memo[id(getattr(model, attr))] = getattr(model, attr)
    twin = copy.deepcopy(model, memo)
    for path, module in quantized.items():
        lw = linear_weights(path, module)
        dense = nn.Linear(lw.in_features, lw.out_features, bias=lw.bias is not None, device="meta")
        dense.weight = nn.Parameter(weight_for(lw).float(), requires_grad=False)
        if lw.bias is not None:
            dense.bias = nn.Parameter(lw.bias.clone(), requires_grad=False)
        parent, _, attr = path.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, attr, dense)
    for path, module in model.named_modules():  # lookups of the head's rows: the exported float table
        if isinstance(module, HeadRowsEmbedding):
            set_module(twin, path, module.float_copy())
    prefill_attention.remove(twin)  # engines attend with their own kernels, not optpass's bf16 prefill kernel
    return twin.eval()


def budget_of(model: nn.Module, kind: str) -> Any:
    """The quality budget `optimize()` held the model to (its report), else the default for its kind."""
    from optpass.quality import QualityBudget

    report = getattr(model, "optpass_report", None)
    if report is not None and report.budget:
        return QualityBudget(**report.budget)
    return QualityBudget.default_for(kind)


class CandidateCheck:
    """Scores weight variants of `model` against its own weights, on corpus windows through `tokenizer` (else
    the adapter's own verify data: the model's local tokenizer, or random ids)."""

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        from optpass.adapters import adapter_for
        from optpass.quality import QualityGuard

        self.model = model
        adapter = adapter_for(model)
        self.budget = budget_of(model, adapter.kind)
        data = None
        if tokenizer is not None:  # the windows optimize() verifies on, through the tokenizer given to save()
            from optpass.corpus import token_windows

            data = token_windows(tokenizer, window=256, count=4)
        batches, self.data = adapter.data_batches(model, data, "verify", adapter.example_batch(model))
        reference = float_twin(model, lambda lw: lw.dequantized())
        self.guard = QualityGuard(adapter, reference, batches, self.budget)
        del reference

    def score(self, weight_for: WeightFor) -> dict[str, Any]:
        """Metrics of the variant, and the budget's violations (empty: within budget)."""
        with torch.no_grad():
            metrics = self.guard.evaluate(float_twin(self.model, weight_for))
        return {"metrics": metrics, "violations": self.guard.check(metrics)}
