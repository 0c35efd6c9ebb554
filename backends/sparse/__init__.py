"""Block-sparse attention for long prefills: layouts (`layout`), patterns (`patterns/`, one per file), the
per-head pattern search (`search`), the per-layer decision (`plan.LayerSparsity`) and the one lowering
(`execute`: FlexAttention on CPU, the Triton op on CUDA)."""

from optpass.backends.sparse.execute import block_sparse_attention
from optpass.backends.sparse.plan import LayerSparsity

__all__ = ["LayerSparsity", "block_sparse_attention"]
