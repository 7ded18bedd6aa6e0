"""Tiny models for the reproduction study: a BatchNorm CNN for 16x16 images and a 2-layer transformer encoder
(d = 64) for token sequences (its token embedding is the ``embed`` submodule, ConAdv's ``embedding_module``)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN", "TinyTransformer", "build_model"]


class SmallCNN(nn.Module):
    """conv(w)-BN-ReLU, conv(2w, stride 2)-BN-ReLU, conv(4w, stride 2)-BN-ReLU, global average pool, linear."""

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1):
        super().__init__()
        w = width

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(in_channels, w, 1), *block(w, 2 * w, 2), *block(2 * w, 4 * w, 2))
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """Token + learned position embedding, ``layers`` pre-LN encoder layers, mean pooling, linear head."""

    def __init__(self, vocab: int, num_classes: int, seq_len: int, d_model: int = 64, layers: int = 2,
                 heads: int = 4, ff: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(1, seq_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        return self.head(self.norm(self.encoder(h)).mean(dim=1))


def build_model(task, width: int = 16) -> nn.Module:
    if task.kind == "image":
        return SmallCNN(task.num_classes, width, task.x_train.shape[1])
    return TinyTransformer(task.vocab, task.num_classes, task.x_train.shape[1])
