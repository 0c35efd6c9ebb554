"""Model adapters: what optpass needs to know about a model family, in one small registry.

An adapter says how to build example inputs, how to run the model on a calibration batch and get
the tensor quality is measured on (LM logits, a DiT's predicted noise, a module's first output),
and which quality metrics apply. New families register one class; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from optpass.errors import UnsupportedModelError


@dataclass
class Batch:
    """One calibration / verification input: positional args and keyword args for `model(...)`."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None

    def run(self, model: nn.Module) -> Any:
        return model(*self.args, **(self.kwargs or {}))


class ModelAdapter:
    """Base adapter for any nn.Module; subclasses override `matches` and the input/output hooks."""

    kind: ClassVar[str] = "generic"
    metrics: ClassVar[tuple[str, ...]] = ("rel_l2", "psnr")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return True

    def example_batch(self, model: nn.Module) -> Batch:
        raise UnsupportedModelError(
            f"{type(model).__name__}: optpass cannot guess inputs for a generic module; "
            "pass example_inputs=(...) or example_kwargs={...}"
        )

    def capture_kwargs(self, batch: Batch) -> dict[str, Any]:
        """Extra kwargs merged into the captured call (e.g. `use_cache=False`)."""
        return {}

    def data_batches(self, model: nn.Module, data: Any, purpose: str, example: Batch) -> tuple[list[Batch], str]:
        """Batches for verification (`purpose="verify"`) or calibration, with a note on where they came from.

        User data wins: a list of `Batch`, of kwargs dicts, or of tensors (one positional arg each).
        """
        if data is not None:
            return _user_batches(data), "user calibration data"
        return [example], "the example inputs"

    def dynamic_dims(self, batch: Batch) -> dict[str, dict[int, str]]:
        """kwarg name -> {dim index: "B" | "S"} for `torch.export.Dim`."""
        return {}

    def valid_mask(self, batch: Batch) -> torch.Tensor | None:
        """[B, S] True where the output is a real token's (padding masked out of every metric), or None."""
        mask = (batch.kwargs or {}).get("attention_mask")
        return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def output_tensors(self, output: Any) -> list[torch.Tensor]:
        """Every tensor quality is measured on (each is compared with the reference's; the worst counts)."""
        return [self.output_tensor(output)]

    def output_tensor(self, output: Any) -> torch.Tensor:
        """The tensor quality is measured on."""
        if isinstance(output, torch.Tensor):
            return output
        for attr in ("logits", "sample", "last_hidden_state"):
            if hasattr(output, attr):
                return getattr(output, attr)
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            return output[0]
        raise UnsupportedModelError(f"cannot find a tensor in the model output of type {type(output).__name__}")


class CausalLMAdapter(ModelAdapter):
    """Hugging Face causal LMs: token ids in, logits out; quality by KL, top-1 agreement, perplexity."""

    kind = "causal_lm"
    metrics = ("kl", "top1", "perplexity", "ppl_increase")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return hasattr(model, "generate") and hasattr(config, "vocab_size") and hasattr(model, "get_output_embeddings")

    def example_batch(self, model: nn.Module) -> Batch:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
        return Batch(kwargs={"input_ids": ids})

    def capture_kwargs(self, batch: Batch) -> dict[str, Any]:
        return {"use_cache": False}

    def data_batches(self, model: nn.Module, data: Any, purpose: str, example: Batch) -> tuple[list[Batch], str]:
        """Corpus windows through the model's own tokenizer: disjoint slices for verify and calibrate."""
        if isinstance(data, torch.Tensor) and not data.is_floating_point():
            return [Batch(kwargs={"input_ids": data.view(-1, data.shape[-1])})], "user token ids"
        if data is not None:
            return super().data_batches(model, data, purpose, example)
        tokenizer = tokenizer_for(model)
        if tokenizer is None:
            g = torch.Generator().manual_seed(1 if purpose == "verify" else 2)
            ids = torch.randint(0, model.config.vocab_size, (2, 128), generator=g)
            return [Batch(kwargs={"input_ids": ids})], "random token ids (no local tokenizer: perplexity is not meaningful)"
        from optpass.corpus import token_windows

        offset = 0 if purpose == "verify" else 8
        ids = token_windows(tokenizer, window=256, count=4, offset_windows=offset)
        return [Batch(kwargs={"input_ids": ids})], f"4 x 256 tokens of pydoc_data.topics ({purpose} slice)"

    def dynamic_dims(self, batch: Batch) -> dict[str, dict[int, str]]:
        return {"input_ids": {0: "B", 1: "S"}}

    def output_tensor(self, output: Any) -> torch.Tensor:
        return output.logits if hasattr(output, "logits") else super().output_tensor(output)


class DiffusersTransformerAdapter(ModelAdapter):
    """diffusers transformers (DiT, Flux, SD3): latents + timestep (+ labels or text conditioning) in,
    `.sample` out; PSNR / rel-L2. Example inputs come from one builder per class (`DIFFUSERS_INPUTS`)."""

    kind = "diffusion_transformer"
    metrics = ("rel_l2", "psnr")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return type(model).__module__.startswith("diffusers") and hasattr(config, "in_channels")

    def example_batch(self, model: nn.Module) -> Batch:
        builder = DIFFUSERS_INPUTS.get(type(model).__name__)
        if builder is None:
            raise UnsupportedModelError(f"{type(model).__name__}: optpass has no example-input builder for this diffusers "
                                        f"model (known: {', '.join(sorted(DIFFUSERS_INPUTS))}); pass example_kwargs={{...}}")
        return Batch(kwargs=builder(model.config, torch.Generator().manual_seed(0)))

    def capture_kwargs(self, batch: Batch) -> dict[str, Any]:
        return {"return_dict": False}


def _dit_inputs(config: Any, g: torch.Generator) -> dict[str, Any]:
    size = config.sample_size
    kwargs: dict[str, Any] = {"hidden_states": torch.randn(2, config.in_channels, size, size, generator=g),
                              "timestep": torch.randint(0, 1000, (2,), generator=g)}
    if getattr(config, "num_embeds_ada_norm", None):
        kwargs["class_labels"] = torch.randint(0, config.num_embeds_ada_norm, (2,), generator=g)
    return kwargs


def _text_conditioning(config: Any, g: torch.Generator, tokens: int = 8) -> dict[str, Any]:
    return {"encoder_hidden_states": torch.randn(2, tokens, config.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(2, config.pooled_projection_dim, generator=g)}


def _sd3_inputs(config: Any, g: torch.Generator) -> dict[str, Any]:
    size = config.sample_size
    return {"hidden_states": torch.randn(2, config.in_channels, size, size, generator=g), **_text_conditioning(config, g),
            "timestep": torch.randint(0, 1000, (2,), generator=g)}


def _flux_inputs(config: Any, g: torch.Generator, image_tokens: int = 16, text_tokens: int = 8) -> dict[str, Any]:
    kwargs = {"hidden_states": torch.randn(2, image_tokens, config.in_channels, generator=g),
              **_text_conditioning(config, g, text_tokens), "timestep": torch.rand(2, generator=g),
              "img_ids": torch.zeros(image_tokens, 3), "txt_ids": torch.zeros(text_tokens, 3)}
    if getattr(config, "guidance_embeds", False):
        kwargs["guidance"] = torch.full((2,), 3.5)
    return kwargs


DIFFUSERS_INPUTS = {"DiTTransformer2DModel": _dit_inputs, "SD3Transformer2DModel": _sd3_inputs,
                    "FluxTransformer2DModel": _flux_inputs}


class EncoderAdapter(ModelAdapter):
    """transformers encoders (BERT, sentence-embedding models): token ids + attention mask in, token states out;
    quality on the mean-pooled sentence embedding (cosine) and the real tokens' states (relative L2)."""

    kind = "encoder"
    metrics = ("cosine", "rel_l2")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return (type(model).__module__.startswith("transformers") and hasattr(config, "vocab_size")
                and not hasattr(model, "generate") and not _has_task_head(model))

    def example_batch(self, model: nn.Module) -> Batch:
        return _padded_ids(model.config.vocab_size)

    def output_tensors(self, output: Any) -> list[torch.Tensor]:
        """Token states and, where the model has a pooler, its pooled output: both are what users read."""
        pooled = getattr(output, "pooler_output", None)
        return [output.last_hidden_state] + ([pooled] if isinstance(pooled, torch.Tensor) else [])

    def data_batches(self, model: nn.Module, data: Any, purpose: str, example: Batch) -> tuple[list[Batch], str]:
        if data is not None:
            return super().data_batches(model, data, purpose, example)
        tokenizer = tokenizer_for(model)
        if tokenizer is None:
            return [_padded_ids(model.config.vocab_size, 1 if purpose == "verify" else 2)], \
                "random padded token ids (no local tokenizer)"
        from optpass.corpus import sentences

        batch = tokenizer(sentences(8, offset=0 if purpose == "verify" else 8), padding=True, truncation=True,
                          max_length=128, return_tensors="pt")
        return [Batch(kwargs=dict(batch))], f"8 padded sentences of pydoc_data.topics ({purpose} slice)"

    def dynamic_dims(self, batch: Batch) -> dict[str, dict[int, str]]:
        return {name: {0: "B", 1: "S"} for name in (batch.kwargs or {}) if name in _TOKEN_INPUTS}


class ClassifierAdapter(EncoderAdapter):
    """transformers models with a task head (sequence / token classification): quality on the task logits."""

    kind = "classifier"
    metrics = ("kl", "top1")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return (type(model).__module__.startswith("transformers") and hasattr(config, "vocab_size")
                and not hasattr(model, "generate") and _has_task_head(model))

    def output_tensors(self, output: Any) -> list[torch.Tensor]:
        return [output.logits if hasattr(output, "logits") else super().output_tensor(output)]


_TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _has_task_head(model: nn.Module) -> bool:
    return any(hasattr(model, name) for name in ("classifier", "score", "qa_outputs"))


def _padded_ids(vocab: int, seed: int = 0) -> Batch:
    """Two rows of random ids, the second right-padded by a quarter (so padding handling is exercised)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    return Batch(kwargs={"input_ids": ids * mask, "attention_mask": mask})


def _user_batches(data: Any) -> list[Batch]:
    items = data if isinstance(data, (list, tuple)) else [data]
    out = []
    for item in items:
        if isinstance(item, Batch):
            out.append(item)
        elif isinstance(item, dict):
            out.append(Batch(kwargs=item))
        elif isinstance(item, torch.Tensor):
            out.append(Batch(args=(item,)))
        elif isinstance(item, tuple):
            out.append(Batch(args=item))
        else:
            raise UnsupportedModelError(f"calibration_data items must be Batch, dict, tuple or tensor; got {type(item).__name__}")
    return out


def tokenizer_for(model: nn.Module) -> Any | None:
    """The model's tokenizer when its config points at a local directory that has one (never a hub)."""
    import os

    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not path or not os.path.isdir(path):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - no usable tokenizer there: fall back to random ids
        return None


ADAPTERS: list[type[ModelAdapter]] = [CausalLMAdapter, DiffusersTransformerAdapter, ClassifierAdapter, EncoderAdapter,
                                      ModelAdapter]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The first registered adapter whose `matches` accepts the model (generic last)."""
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls()
    raise AssertionError("unreachable: the generic adapter matches every module")
