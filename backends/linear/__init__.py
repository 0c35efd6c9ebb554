"""Learned linear attention (the `linear_attention` pass, method="hedgehog"): Hedgehog feature maps
(`feature_map.py`), the sliding-window + linear-attention hybrid in its parallel and recurrent forms (`hybrid.py`),
and attention transfer, which fits the maps to a layer's softmax outputs with the model frozen (`fit.py`)."""
