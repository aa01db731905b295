"""Fréchet distances between feature statistics of two image sets, and the features they compare.

    FD = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2(Σ_r Σ_g)^½)                       (Heusel et al. 2017, Eq. 6)

computed by torchmetrics' FrechetInceptionDistance with `feature=` a module of ours (its matrix square
root, not a hand-written one). Two feature spaces, named apart in every table and JSON:
    FD (classifier features)   PenultimateFeatures: the judge classifier's 128-d penultimate layer
                               (MNIST-family data); comparable only within this project
    FID (Inception)            InceptionPool: the 2048-d pool features of the FID Inception network
                               (pt_inception-2015-12-05, the network of pytorch-fid and torch-fidelity and
                               torchmetrics' default extractor), the FID that papers report

The FD is biased upwards for small sample counts, so the real-vs-real floor is the FD two real sets of the
same sizes reach (`Judge.floor`); only the gap between the two numbers means anything. Published CIFAR-10
FIDs use 50,000 samples against the 50,000 training images.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn

from shared.errors import UserError
from shared.evaluation.classifier import FEATURE_DIM, SmallCNN
from shared.records.images import to_uint8

FD_BATCH = 512
INCEPTION_BATCH = 100   # images per FID Inception forward (each is resized to 299 × 299)
INCEPTION_FEATURES = 2048


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


# --------------------------------------------------------------------------------------------------
# FID (Inception): torchmetrics' default extractor, its weights read from a file, never downloaded


def fid_inception_url() -> str:
    """Where the FID Inception weights are published (torch-fidelity's release of the converted
    TensorFlow graph), or a UserError when torch-fidelity, which holds the network, is missing."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    except ImportError:
        raise UserError("the FID (Inception) needs torch-fidelity, the extractor torchmetrics uses: "
                        "pip install torch-fidelity") from None
    return URL_INCEPTION_V3


def fid_inception_cache() -> Path:
    """The file torch-fidelity's own download would fill: torch.hub's checkpoints folder ($TORCH_HOME/hub)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(fid_inception_url()).path).name


def resolve_fid_inception_weights(path: str | None) -> Path:
    """The weights file: `path` (--inception-weights) if given, else the one in torch.hub's cache; a
    UserError naming both places and the download when neither holds it (nothing is fetched here)."""
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise UserError(f"--inception-weights {path!r}: " + ("is a directory" if file.is_dir() else "no such file"))
        return file
    cached = fid_inception_cache()
    if cached.is_file():
        return cached
    raise UserError(f"the FID (Inception) needs the FID Inception weights: no --inception-weights FILE was given "
                    f"and torch's cache has no {cached}; download {fid_inception_url()} elsewhere, then pass it "
                    f"with --inception-weights or put it at that path")


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_fid_inception(path: str | None = None) -> nn.Module:
    """torchmetrics' default FID extractor (NoTrainInceptionV3, torch-fidelity's FeatureExtractorInceptionV3)
    with the weights of `path` or torch.hub's cache, on the CPU in eval mode: uint8 images [N x 3 x H x W]
    → pool features [N x 2048]. A UserError when the file is absent or holds other weights."""
    weights = resolve_fid_inception_weights(path)
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:  # weights_only first: the extractor's own torch.load would run any code a pickle carries
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{weights}: not a PyTorch weights file ({_first_line(err)})") from None
    if not isinstance(state, dict):
        raise UserError(f"{weights}: not the FID Inception weights (a {type(state).__name__}, not a state dict)")
    try:
        # antialias=False: torch-fidelity's TensorFlow-1 bilinear resize to 299 × 299, as the published FIDs
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(INCEPTION_FEATURES)],
                                  feature_extractor_weights_path=str(weights), antialias=False)
    except RuntimeError as err:  # load_state_dict: missing, unexpected or mis-shaped tensors
        raise UserError(f"{weights}: not the FID Inception weights ({_first_line(err)})") from None


def _inception_input(images: torch.Tensor) -> torch.Tensor:
    """Images [N x C x H x W] in [−1, 1], C = 1 or 3 → uint8 [N x 3 x H x W], quantised as the PNGs we
    write (the FID tools read 8-bit images); a gray image is repeated over the three channels."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"the FID Inception network takes images N x 1|3 x H x W, got {tuple(images.shape)}")
    x = to_uint8(images)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class InceptionPool(nn.Module):
    """The FID (Inception) feature module: images [N x C x H x W] in [−1, 1] → pool features [N x 2048]."""

    num_features = INCEPTION_FEATURES  # torchmetrics reads this instead of probing with a dummy image

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(_inception_input(images))


class InceptionLogits(nn.Module):
    """The Inception Score's p(y|x) logits: pool features · W_fcᵀ, [N x 1008], without the fc bias
    ('logits_unbiased', the default of torch-fidelity's and torchmetrics' Inception Score)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(_inception_input(images)) @ self.net.fc.weight.T
