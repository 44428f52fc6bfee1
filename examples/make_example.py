#!/usr/bin/env python3
"""Writes examples/tiny-bert.safetensors: a BERT-shaped checkpoint (the key names and
layouts of Hugging Face's BertModel, 2 layers, hidden size 32) with random weights, saved
by the real safetensors library. It is the input of scripts/demo.sh."""
import os

import numpy as np
from safetensors.numpy import save_file

rng = np.random.default_rng(2026)
H, I, V, P, L = 32, 64, 100, 64, 2


def w(*shape):
    return (rng.standard_normal(shape) * 0.02).astype(np.float32)


t = {
    "embeddings.word_embeddings.weight": w(V, H),
    "embeddings.position_embeddings.weight": w(P, H),
    "embeddings.token_type_embeddings.weight": w(2, H),
    "embeddings.LayerNorm.weight": np.ones(H, np.float32),
    "embeddings.LayerNorm.bias": np.zeros(H, np.float32),
    "embeddings.position_ids": np.arange(P, dtype=np.int64)[None, :],
    "pooler.dense.weight": w(H, H),
    "pooler.dense.bias": w(H),
}
for i in range(L):
    p = f"encoder.layer.{i}."
    for name in ("query", "key", "value"):
        t[p + f"attention.self.{name}.weight"] = w(H, H)
        t[p + f"attention.self.{name}.bias"] = w(H)
    t[p + "attention.output.dense.weight"] = w(H, H)
    t[p + "attention.output.dense.bias"] = w(H)
    t[p + "attention.output.LayerNorm.weight"] = np.ones(H, np.float32)
    t[p + "attention.output.LayerNorm.bias"] = np.zeros(H, np.float32)
    t[p + "intermediate.dense.weight"] = w(I, H)
    t[p + "intermediate.dense.bias"] = w(I)
    t[p + "output.dense.weight"] = w(H, I)
    t[p + "output.dense.bias"] = w(H)
    t[p + "output.LayerNorm.weight"] = np.ones(H, np.float32)
    t[p + "output.LayerNorm.bias"] = np.zeros(H, np.float32)

save_file(t, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny-bert.safetensors"), metadata={"format": "pt"})
