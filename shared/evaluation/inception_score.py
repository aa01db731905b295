"""The Inception Score of Salimans et al. 2016 (Sec. 4), with the judge classifier or the FID Inception network as p(y|x).

    IS = exp( E_x KL( p(y|x) ‖ p(y) ) ),   p(y) = E_x p(y|x)

    symbol      here
    p(y|x)      probs[i] — softmax of a classifier's logits for image i, [N x K]
    p(y)        the marginal over the N images, probs.mean(0), [K]
    bounds      1 ≤ IS ≤ K: 1 when every p(y|x) equals p(y) (no image is confidently one class, or all
                are the same class); K when every image is one class with certainty and the classes
                are balanced

For MNIST-family data p(y|x) is the judge classifier's (classifier_inception_score). For CIFAR-10 (or any
images, given the weights) it is the FID Inception network's 1008 logits through torchmetrics' InceptionScore
(`frechet.InceptionLogits`, the network of the FID (Inception), loaded once for both). Both use one split:
the score of all N images together, so it is comparable with the real-data value at the same N (published
CIFAR-10 scores average 10 splits of 50,000 images).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from shared.errors import UserError
from shared.evaluation.classifier import SmallCNN, class_probabilities
from shared.evaluation.frechet import FD_BATCH


def inception_score(probs: torch.Tensor) -> float:
    """IS of class probabilities [N x K] (rows sum to 1), in float64; 0 · log 0 counts as 0."""
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise UserError(f"the Inception Score needs probabilities of shape N x K with N >= 1, got {tuple(probs.shape)}")
    p = probs.double()
    marginal = p.mean(0, keepdim=True)                                        # p(y), [1 x K]
    kl = (torch.xlogy(p, p) - torch.xlogy(p, marginal.expand_as(p))).sum(1)  # KL(p(y|x) ‖ p(y)), [N]
    return float(kl.mean().exp())


def classifier_inception_score(classifier: SmallCNN, images: torch.Tensor) -> float:
    """IS with the judge classifier's p(y|x) for images [N x C x H x W] in [−1, 1]."""
    return inception_score(class_probabilities(classifier, images))


def torchmetrics_inception_score(logits: nn.Module, images: torch.Tensor, batch_size: int = FD_BATCH) -> float:
    """torchmetrics' InceptionScore (one split) with `logits` as its p(y|x) network, images in [−1, 1]."""
    from torchmetrics.image.inception import InceptionScore

    device = next(logits.parameters()).device
    with warnings.catch_warnings():  # its note that it keeps every logit: N x K floats, which is the point
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        # normalize=False: torchmetrics would otherwise turn the images into uint8 before our module sees them
        metric = InceptionScore(feature=logits, splits=1, normalize=False).to(device)
    for i in range(0, images.shape[0], batch_size):
        metric.update(images[i:i + batch_size].to(device))
    with warnings.catch_warnings():  # one split: the spread across splits that torchmetrics adds is undefined
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")
        return float(metric.compute()[0])
