"""Rewrite families, one module each; importing this package registers them (installed as `optpass.passes`)."""

from optpass.passes import dead_code, dit_cache, dynamic_skip, kv_cache, layer_skip, linear_attention, quantize, sparse_attention, speculative  # noqa: F401

__all__ = ["dead_code", "dit_cache", "dynamic_skip", "kv_cache", "layer_skip", "linear_attention", "quantize", "sparse_attention", "speculative"]
