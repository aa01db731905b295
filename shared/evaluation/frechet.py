"""Fréchet distances between feature statistics of two image sets, and the features they compare.

    FD = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2(Σ_r Σ_g)^½)                       (Heusel et al. 2017, Eq. 6)

computed by torchmetrics' FrechetInceptionDistance with `feature=` a module of ours (its matrix square
root, not a hand-written one):
    PenultimateFeatures   the judge classifier's 128-d penultimate layer (MNIST-family data)
    InceptionPool         torchvision Inception-v3's 2048-d pool features (CIFAR-10, offline weights only)

The FD is biased upwards for small sample counts, so the real-vs-real floor is the FD two real sets of the
same sizes reach (`Judge.floor`); only the gap between the two numbers means anything.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.errors import UserError
from shared.evaluation.classifier import FEATURE_DIM, SmallCNN

FD_BATCH = 512
INCEPTION_SIZE = 299  # Inception-v3's input resolution
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's normalisation


class PenultimateFeatures(nn.Module):
    """The feature module handed to torchmetrics: images [N x C x H x W] in [−1, 1] → [N x 128] float32."""

    def __init__(self, classifier: SmallCNN):
        super().__init__()
        self.classifier = classifier
        self.num_features = FEATURE_DIM  # torchmetrics reads this instead of probing with a dummy image

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.clamp(-1, 1).float())


def frechet_distance(feature: nn.Module, real: torch.Tensor, fake: torch.Tensor, batch_size: int = FD_BATCH) -> float:
    """FD between the feature statistics of two image sets [N x C x H x W] (torchmetrics' FID with a
    custom feature module). Needs at least 2 images per set."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise UserError(f"a Fréchet distance needs >= 2 images per set, got {real.shape[0]} and {fake.shape[0]}")
    device = next(feature.parameters()).device
    metric = FrechetInceptionDistance(feature=feature, normalize=True).to(device)
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, images.shape[0], batch_size):
            metric.update(images[i:i + batch_size].to(device), real=is_real)
    return float(metric.compute())


def _imagenet_input(images: torch.Tensor) -> torch.Tensor:
    """Images [N x 3 x H x W] in [−1, 1] → Inception-v3's input [N x 3 x 299 x 299], ImageNet-normalised."""
    x = F.interpolate((images.clamp(-1, 1).float() + 1) / 2, size=(INCEPTION_SIZE, INCEPTION_SIZE),
                      mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class InceptionPool(nn.Module):
    """torchvision Inception-v3's 2048-d pool features for images in [−1, 1] (resized to 299×299)."""

    num_features = 2048

    def __init__(self, net: nn.Module):
        super().__init__()
        net.fc = nn.Identity()
        self.net = net.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(_imagenet_input(images))


class InceptionLogits(nn.Module):
    """torchvision Inception-v3's 1000 ImageNet logits for images in [−1, 1]: the Inception Score's p(y|x)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(_imagenet_input(images))


def load_inception_v3(what: str = "Inception FID") -> nn.Module:
    """torchvision's Inception-v3 with its ImageNet weights, or a UserError saying why it is unavailable
    (offline and no weights file in torch.hub's cache)."""
    try:
        from torchvision.models import Inception_V3_Weights, inception_v3

        return inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1, aux_logits=True).eval()
    except Exception as err:  # offline: URLError / RuntimeError from the download
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{what} unavailable: torchvision's Inception-v3 weights could not be loaded "
                        f"({reason}); put inception_v3_google-0cc3c7bd.pth in "
                        f"{torch.hub.get_dir()}/checkpoints to enable it") from None


def load_inception() -> InceptionPool:
    """The FID feature module (2048-d pool features), or a UserError saying why it is unavailable."""
    return InceptionPool(load_inception_v3("Inception FID"))
