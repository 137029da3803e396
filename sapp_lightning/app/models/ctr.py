"""Click-through-rate models over ``(dense [B, D], categorical [B, K])`` inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class DenseFeatureEmbedding(nn.Module):
    """One learned vector per numerical feature, scaled by the feature's value (plus a bias vector).

    The paper embeds all 39 Criteo features into 10 dimensions without saying how the 13 numerical
    ones are embedded; this linear per-feature embedding is our assumption (SPEC section 6 #17).
    """

    def __init__(self, num_features: int, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(num_features, dim) * 0.01)
        self.shift = nn.Parameter(torch.zeros(num_features, dim))

    def forward(self, dense: Tensor) -> Tensor:  # [B, D] -> [B, D, dim]
        return dense.unsqueeze(-1) * self.scale + self.shift


def _mlp(widths: Sequence[int], final_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if final_activation or i < len(widths) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class CriteoPaperNet(nn.Module):
    """The paper's Criteo model: a 10-dim embedding per feature, three 400-wide ReLU layers, one logit.

    Only ``mlp.0`` (the first dense layer, ``39 * 10 = 390 -> 400`` on Criteo) is pruned in the paper.

    Example:
        >>> net = CriteoPaperNet(num_dense=13, cardinalities=[100] * 26)
        >>> net.mlp[0]
        Linear(in_features=390, out_features=400, bias=True)
        >>> net(torch.zeros(4, 13), torch.zeros(4, 26, dtype=torch.long)).shape
        torch.Size([4])
    """

    def __init__(
        self,
        num_dense: int,
        cardinalities: Sequence[int],
        embedding_dim: int = 10,
        hidden: Sequence[int] = (400, 400, 400),
    ) -> None:
        super().__init__()
        self.dense_embedding = DenseFeatureEmbedding(num_dense, embedding_dim)
        self.embeddings = nn.ModuleList(nn.Embedding(n, embedding_dim) for n in cardinalities)
        width = (num_dense + len(cardinalities)) * embedding_dim
        self.mlp = _mlp([width, *hidden, 1], final_activation=False)

    def forward(self, dense: Tensor, categorical: Tensor) -> Tensor:
        parts = [self.dense_embedding(dense)] + [
            emb(categorical[:, i]).unsqueeze(1) for i, emb in enumerate(self.embeddings)
        ]
        return self.mlp(torch.cat(parts, dim=1).flatten(1)).squeeze(-1)


class DLRM(nn.Module):
    """DLRM (Naumov et al. 2019): bottom MLP, embeddings, pairwise dot interaction, top MLP.

    Example:
        >>> net = DLRM(num_dense=13, cardinalities=[100] * 26, embedding_dim=16)
        >>> net(torch.zeros(4, 13), torch.zeros(4, 26, dtype=torch.long)).shape
        torch.Size([4])
    """

    def __init__(
        self,
        num_dense: int,
        cardinalities: Sequence[int],
        embedding_dim: int = 16,
        bottom: Sequence[int] = (512, 256),
        top: Sequence[int] = (512, 256),
    ) -> None:
        super().__init__()
        self.bottom = _mlp([num_dense, *bottom, embedding_dim], final_activation=True)
        self.embeddings = nn.ModuleList(nn.Embedding(n, embedding_dim) for n in cardinalities)
        vectors = len(cardinalities) + 1
        rows, cols = torch.triu_indices(vectors, vectors, offset=1)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)
        self.top = _mlp([embedding_dim + rows.numel(), *top, 1], final_activation=False)

    def forward(self, dense: Tensor, categorical: Tensor) -> Tensor:
        x = self.bottom(dense)
        vectors = torch.stack([x] + [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)], dim=1)
        dots = torch.bmm(vectors, vectors.transpose(1, 2))[:, self.pair_rows, self.pair_cols]
        return self.top(torch.cat([x, dots], dim=1)).squeeze(-1)
