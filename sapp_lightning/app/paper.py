"""The paper's published numbers (SPEC section 4), to print beside our own results."""

from __future__ import annotations

# Table 1: ResNet50 / ImageNet top-1 (%) by (block, target sparsity) -> {method: accuracy}.
# None: the run diverged. Magnitude and PowerPropagation rows were not retrieved (SPEC 4.1).
IMAGENET_DENSE_TOP1 = 76.90
IMAGENET_TOP1: dict[tuple[int, float], dict[str, float | None]] = {
    (8, 0.70): {"acdc": 74.11, "sapp": 74.14},
    (8, 0.80): {"acdc": 72.47, "sapp": 72.90},
    (8, 0.90): {"acdc": 67.74, "sapp": 69.56},
    (8, 0.95): {"acdc": None, "sapp": None},
    (16, 0.70): {"acdc": 74.08, "sapp": 74.40},
    (16, 0.80): {"acdc": 72.56, "sapp": 73.50},
    (16, 0.90): {"acdc": 68.61, "sapp": 69.92},
    (16, 0.95): {"acdc": 61.42, "sapp": 64.27},
    (32, 0.70): {"acdc": 74.40, "sapp": 74.82},
    (32, 0.80): {"acdc": 72.39, "sapp": 73.78},
    (32, 0.90): {"acdc": 68.96, "sapp": 70.82},
    (32, 0.95): {"acdc": 63.03, "sapp": 65.41},
    (64, 0.70): {"acdc": 75.18, "sapp": 75.53},
    (64, 0.80): {"acdc": 74.49, "sapp": 74.52},
    (64, 0.90): {"acdc": 71.95, "sapp": 72.76},
    (64, 0.95): {"acdc": 67.36, "sapp": 70.30},
}

# Table 2: Criteo validation loss (mean of 3 runs) by (block, sparsity) -> {method: loss}.
CRITEO_DENSE_LOSS = 0.4489
_T2 = {  # sparsity: {method: (B=5, B=10, B=20)}
    0.90: {"magnitude": (0.4523, 0.4693, 0.4923), "powerprop": (0.4521, 0.4572, 0.4920),
           "acdc": (0.4517, 0.4580, 0.4829), "sapp": (0.4515, 0.4535, 0.4596)},
    0.95: {"magnitude": (0.4586, 0.4892, 0.4998), "powerprop": (0.4547, 0.4768, 0.4946),
           "acdc": (0.4547, 0.4754, 0.4961), "sapp": (0.4540, 0.4595, 0.4715)},
    0.97: {"magnitude": (0.4656, 0.5004, 0.5079), "powerprop": (0.4587, 0.5061, 0.5093),
           "acdc": (0.4606, 0.4936, 0.5056), "sapp": (0.4570, 0.4708, 0.4865)},
    0.98: {"magnitude": (0.4717, 0.5145, 0.5447), "powerprop": (0.4622, 0.5158, 0.5379),
           "acdc": (0.4692, 0.4929, 0.5184), "sapp": (0.4601, 0.4904, 0.5162)},
    0.99: {"magnitude": (0.4881, 0.5376, 0.5482), "powerprop": (0.5017, 0.5295, 0.5425),
           "acdc": (0.5050, 0.5153, 0.5427), "sapp": (0.4803, 0.5068, 0.5253)},
}  # fmt: skip
CRITEO_VAL_LOSS: dict[tuple[int, float], dict[str, float]] = {
    (block, sparsity): {method: row[i] for method, row in methods.items()}
    for sparsity, methods in _T2.items()
    for i, block in enumerate((5, 10, 20))
}


def paper_value(table: str, method: str, block: int, sparsity: float) -> float | None:
    """The paper's number for one cell of ``"imagenet"`` (top-1 %) or ``"criteo"`` (val loss), if any.

    Example:
        >>> paper_value("criteo", "sapp", 10, 0.95)
        0.4595
    """
    source = IMAGENET_TOP1 if table == "imagenet" else CRITEO_VAL_LOSS
    if method == "dense":
        return IMAGENET_DENSE_TOP1 if table == "imagenet" else CRITEO_DENSE_LOSS
    return source.get((block, round(sparsity, 4)), {}).get(method)
