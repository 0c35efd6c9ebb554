"""Compressed KV cache runtime: packed int8 / int4 slot storage, per-layer eviction and merging, an HF `Cache`
that plugs into `generate()`, and the attention hook that uses it (installed as `optpass.backends.kv`)."""

from optpass.backends.kv.cache import CompressedKVCache, KVSettings
from optpass.backends.kv.attention import enable_compressed_attention

__all__ = ["CompressedKVCache", "KVSettings", "enable_compressed_attention"]
