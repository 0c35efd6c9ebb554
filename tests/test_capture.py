from __future__ import annotations

import pytest
import torch
from torch import nn

from optpass import CaptureError, UnsupportedModelError, capture


def test_smollm2_sites(smollm2_graph):
    g = smollm2_graph
    assert g.method == "export"
    assert len(g.blocks) == 30
    assert [b.name for b in g.blocks[:2]] == ["model.layers.0", "model.layers.1"]
    assert all(b.residual_adds == 2 and len(b.linears) == 7 for b in g.blocks)
    assert len(g.attentions) == 30
    assert {(a.num_heads, a.num_kv_heads, a.head_dim) for a in g.attentions} == {(9, 3, 64)}
    assert all(a.gqa and a.causal for a in g.attentions)
    assert g.attentions[3].kv_projections == ("model.layers.3.self_attn.k_proj", "model.layers.3.self_attn.v_proj")
    assert len(g.linears) == 211
    head = [s for s in g.linears if s.is_output_head]
    assert [s.name for s in head] == ["lm_head"]
    assert head[0].tied_to == "model.embed_tokens.weight"
    assert (head[0].in_features, head[0].out_features) == (576, 49152)
    # symbolic batch and sequence dims survive into the attention shapes
    assert set(g.symbols.values()) == {"B", "S"}
    q_shape = g.attentions[0].q_shape
    assert g.symbols[q_shape[0]] == "B" and g.symbols[q_shape[2]] == "S"
    # the block graph is a chain in layer order
    assert g.residual_chain() == [f"model.layers.{i}" for i in range(30)]


def test_tiny_dit_sites(tiny_dit):
    g = capture(tiny_dit)
    assert g.model_kind == "diffusion_transformer"
    assert [b.cls for b in g.blocks] == ["BasicTransformerBlock"] * 2
    assert len(g.attentions) == 2 and not any(a.causal or a.gqa for a in g.attentions)
    assert all(b.residual_adds >= 2 for b in g.blocks)
    assert any(s.name.endswith("attn1.to_q") for s in g.linears)


def test_captured_graph_runs_like_the_model(tiny_llama):
    g = capture(tiny_llama)
    ids = torch.randint(0, 256, (3, 11))  # a new batch and length: the dims are symbolic
    got = g.graph_module(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, tiny_llama(input_ids=ids).logits)


class DataDependent(nn.Module):
    """Python control flow on a tensor value: export cannot trace it, dynamo splits the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        y = self.a(x)
        if float(y.sum()) > 0:
            return self.b(y)
        return self.b(-y)


def test_dynamo_fallback_records_why():
    g = capture(DataDependent(), example_inputs=(torch.randn(2, 8),))
    assert g.method == "dynamo"
    assert any("export" in n and "failed" in n for n in g.notes)
    assert {s.name for s in g.linears} >= {"a"}


def test_capture_rejects_non_module():
    with pytest.raises(UnsupportedModelError, match="nn.Module"):
        capture("not a model")


def test_generic_module_needs_inputs():
    with pytest.raises(UnsupportedModelError, match="example_inputs"):
        capture(nn.Sequential(nn.Linear(4, 4)))


def test_uncapturable_model_raises_capture_error():
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(CaptureError, match="Broken"):
        capture(Broken(), example_inputs=(torch.randn(2),))
