"""Image classifiers: an MLP, a small CNN and torchvision's ResNet50."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn


class MLP(nn.Sequential):
    """``Flatten -> [Linear -> ReLU] * len(hidden) -> Linear``.

    Example:
        >>> import torch
        >>> MLP((1, 28, 28), 10, hidden=(64,))(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (512, 512)) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
            width = size
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (conv, BN, ReLU, 2x2 max-pool), a hidden Linear layer and the classifier.

    The conv kernels are pruned through the paper's ``(kh * kw * cin) x cout`` layout. ``batch_norm=False``
    drops the BatchNorm layers (the convolutions get a bias instead).

    Example:
        >>> import torch
        >>> SmallCNN((1, 28, 28), 10)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> [type(m).__name__ for m in SmallCNN((1, 28, 28), 10, batch_norm=False).features]
        ['Conv2d', 'ReLU', 'MaxPool2d', 'Conv2d', 'ReLU', 'MaxPool2d']
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 256,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        cin, height, width = input_shape
        blocks: list[nn.Module] = []
        for cout in channels:
            blocks.append(nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm))
            blocks += [nn.BatchNorm2d(cout)] if batch_norm else []
            blocks += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin, height, width = cout, height // 2, width // 2
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(cin * height * width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def resnet50(input_shape: Sequence[int] | None = None, num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet50, randomly initialized (the paper trains from scratch)."""
    from torchvision.models import resnet50 as tv_resnet50

    return tv_resnet50(weights=None, num_classes=num_classes)
