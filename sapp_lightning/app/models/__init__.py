"""Networks used by the recipes and benchmarks (plain ``nn.Module``s) and their LightningModules."""

from .ctr import DLRM, CriteoPaperNet
from .lightning import CTRModule, ImageClassifier
from .vision import MLP, SmallCNN, resnet50

__all__ = ["CTRModule", "CriteoPaperNet", "DLRM", "ImageClassifier", "MLP", "SmallCNN", "resnet50"]
