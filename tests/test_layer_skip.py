"""Static layer removal: block influence ranks a block that does nothing last, the budget decides how many
blocks go (rolled back with the reason when none may), removed blocks survive save / load, and a model with
removed blocks still decodes on the compiled path with its static cache."""

from __future__ import annotations

import torch

import optpass
from optpass.models import tiny_llama
from optpass.passes.layer_skip import LayerSkipConfig, RemovedBlock, block_influence, decoder_layers


def _model_with_a_dead_block(dead: int = 2):
    """A 5-block Llama whose block `dead` adds nothing to the residual stream (its output projections zeroed)."""
    model = tiny_llama(layers=5).eval()
    block = decoder_layers(model)[dead]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    return model


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))


def test_block_influence_is_zero_for_a_block_that_adds_nothing():
    model = _model_with_a_dead_block(2)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[0, :5] = 0
    influence = block_influence(model, [{"input_ids": _ids(), "attention_mask": mask}])
    assert influence[2] < 1e-6 and min(v for i, v in enumerate(influence) if i != 2) > 1e-3


def test_removal_within_budget_keeps_the_dead_block_out_and_logits_unchanged():
    model = _model_with_a_dead_block(2)
    with torch.no_grad():
        want = model(_ids(1)).logits
    out = optpass.optimize(model, passes=[LayerSkipConfig(max_removed=2)], quality_budget="kl:1e-6")
    record = next(r for r in out.optpass_report.passes if r.name == "layer_skip")
    assert record.status == "applied", record.reason
    assert record.details["removed"] == [2]
    tried = [t["label"] for t in record.details["tried"]]
    assert tried[0].startswith("remove 2") and tried[-1] == "remove 1: [2]"  # most aggressive first, then fewer
    assert isinstance(decoder_layers(out)[2], RemovedBlock)
    with torch.no_grad():
        torch.testing.assert_close(out(_ids(1)).logits, want, rtol=1e-5, atol=1e-5)


def test_no_block_within_a_tight_budget_is_rolled_back_with_the_reason():
    model = tiny_llama(layers=5).eval()
    out = optpass.optimize(model, passes=[LayerSkipConfig(max_removed=2)], quality_budget="kl:1e-6")
    record = next(r for r in out.optpass_report.passes if r.name == "layer_skip")
    assert record.status != "applied" and "budget" in record.reason
    assert not any(isinstance(layer, RemovedBlock) for layer in decoder_layers(out))


def test_removed_blocks_survive_save_and_load(tmp_path):
    model = _model_with_a_dead_block(3)
    out = optpass.optimize(model, passes=[LayerSkipConfig(blocks=(3,))], quality_budget=None)
    optpass.save(out, tmp_path / "ckpt")
    back = optpass.load(tmp_path / "ckpt")
    assert isinstance(decoder_layers(back)[3], RemovedBlock)
    with torch.no_grad():
        torch.testing.assert_close(back(_ids(2)).logits, out(_ids(2)).logits)


def test_removed_blocks_decode_on_the_compiled_path_with_the_static_cache():
    from optpass.passes.quantize import QuantizeConfig

    model = _model_with_a_dead_block(2)
    out = optpass.optimize(model, passes=[LayerSkipConfig(blocks=(2,)), QuantizeConfig(weights="int8")],
                           quality_budget=None)
    ids = _ids(3)[:1]
    got = out.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert out.optpass_runtime.fast_calls == 1
    want = type(out).generate(out, ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert torch.equal(got, want)
