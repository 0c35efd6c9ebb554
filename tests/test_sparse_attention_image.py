"""sparse_attention on diffusion transformers: the 2D-local layout routed through diffusers' processors gives
exactly dense attention restricted to the kept blocks (reference from the definition, not from the pattern's
code), only for self-attention over the image grid; the pass decides the radius under the quality budget and
keeps attention dense, with the measured figures, where the layout does not beat SDPA; refusals are named; the
plan survives saved_state / restore."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import optpass
from optpass.backends.sparse.image_attention import ImageSparsity, install_image_sparse
from optpass.passes.sparse_attention import SparseAttentionConfig, SparseAttentionPass
from tests import model_zoo

pytest.importorskip("diffusers")


def grid_dit(sample_size: int = 32, patch: int = 2):
    """A DiT whose image tokens form a (sample_size / patch)^2 grid: 16 x 16 = 256 tokens by default."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                 num_layers=2, sample_size=sample_size, patch_size=patch, num_embeds_ada_norm=10,
                                 norm_num_groups=1).eval()


def inputs(size: int = 32) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(2, 4, size, size, generator=g), "timestep": torch.tensor([10, 500]),
            "class_labels": torch.tensor([1, 2])}


class RowWindowSdpa(TorchFunctionMode):
    """Reference: every SDPA call attends key token k from query token q iff their grid rows differ by at most
    `radius` (with 16-token blocks on a 16-wide grid a block is one row, so this is the block layout's definition)."""

    def __init__(self, width: int, radius: int) -> None:
        super().__init__()
        self.width, self.radius = width, radius

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            rows = torch.arange(q.shape[-2]) // self.width
            return func(q, k, v, attn_mask=(rows[:, None] - rows[None, :]).abs() <= self.radius)
        return func(*args, **kwargs)


def test_routed_attention_is_dense_attention_restricted_to_the_kept_blocks(cpu_lowering):
    model = grid_dit()
    with torch.no_grad():
        dense = model(**inputs()).sample
        with RowWindowSdpa(16, 2):
            reference = model(**inputs()).sample
        undo, state = install_image_sparse(model, ImageSparsity(radius=2, block=16, min_tokens=2))
        sparse = model(**inputs()).sample
    assert state.sparse_calls == 2 and state.dense_calls == 0  # both blocks' self-attention ran sparse
    torch.testing.assert_close(sparse, reference, **cpu_lowering)
    assert (sparse - dense).abs().max() > 1e-3  # the window really dropped keys
    undo()
    assert type(model.transformer_blocks[0].attn1.processor).__name__ == "AttnProcessor2_0"
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs()).sample, dense)


def test_below_min_tokens_and_at_another_resolution_the_call_follows_the_plan():
    model = grid_dit()
    _, state = install_image_sparse(model, ImageSparsity(radius=2, block=16, min_tokens=257))
    with torch.no_grad():
        model(**inputs())  # 256 tokens < 257: dense
        assert (state.sparse_calls, state.dense_calls) == (0, 2)
        model(**inputs(48))  # a 24 x 24 latent grid: 576 tokens, the layout is built for that grid
    assert state.sparse_calls == 2


def test_the_pass_decides_the_radius_under_the_budget_and_keeps_attention_dense_where_it_does_not_pay():
    out = optpass.optimize(grid_dit(), passes=[SparseAttentionConfig(block=16)], quality_budget="psnr:20")
    record = out.optpass_report.passes[0]
    layout = record.details["layout"]
    assert layout["routed_calls"] == 2 and 0 < layout["density"] < 1 and layout["grid"] == [16, 16]
    assert [t["label"].split(" (")[0] for t in record.details["tried"]][0] == "radius 8"  # bisects from the top
    pays = layout["measured_speedup"] * (1 - 0.07) > 1.0 or layout["min_tokens"] == 256
    if pays:
        assert record.status == "applied" and "dense SDPA" in record.reason
    else:  # the expected outcome at 256 tokens on a CPU: FlexAttention's fixed cost exceeds dense SDPA's
        assert record.status == "skipped" and "attention stays dense" in record.reason and "psnr" in record.reason
        assert not hasattr(out, "optpass_image_sparse")
        assert type(out.transformer_blocks[0].attn1.processor).__name__ == "AttnProcessor2_0"


def test_a_budget_no_radius_meets_is_refused_with_the_reason():
    out = optpass.optimize(grid_dit(), passes=[SparseAttentionConfig(block=16)], quality_budget="psnr:200")
    record = out.optpass_report.passes[0]
    assert record.status == "skipped" and "no 2D window radius meets the quality budget" in record.reason


def test_a_grid_inside_one_block_and_a_packed_sequence_are_refused_by_name():
    small = optpass.optimize(grid_dit(sample_size=8), passes=["sparse_attention"]).optpass_report.passes[0]
    assert small.status == "skipped" and "keeps every block, nothing to skip" in small.reason
    flux = optpass.optimize(model_zoo.flux(), passes=["sparse_attention"]).optpass_report.passes[0]
    assert flux.status == "skipped" and "2D token grid is unknown" in flux.reason


def test_the_plan_survives_saved_state_and_restore(cpu_lowering):
    model = grid_dit()
    install_image_sparse(model, ImageSparsity(radius=3, block=16, min_tokens=100))
    state = SparseAttentionPass(SparseAttentionConfig()).saved_state(model)
    assert state == {"image": {"radius": 3, "block": 16, "min_tokens": 100}}
    fresh = SparseAttentionPass(SparseAttentionConfig()).restore(grid_dit(), state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs()).sample, model(**inputs()).sample)
        with RowWindowSdpa(16, 3):
            reference = grid_dit()(**inputs()).sample
        torch.testing.assert_close(fresh(**inputs()).sample, reference, **cpu_lowering)


def test_with_autograd_the_model_computes_dense_attention():
    model = grid_dit()
    with torch.no_grad():
        dense = model(**inputs()).sample
    _, state = install_image_sparse(model, ImageSparsity(radius=2, block=16, min_tokens=2))
    trained = model(**inputs()).sample  # parameters require grad: FlexAttention has no CPU backward
    assert state.sparse_calls == 0 and state.dense_calls == 2
    torch.testing.assert_close(trained.detach(), dense)
