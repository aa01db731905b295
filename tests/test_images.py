"""The picture helpers of shared.records.images against independent references."""
import numpy as np
import pytest
import torch
from torchvision.utils import make_grid

from shared.records.images import grid_image, to_uint8


@pytest.mark.parametrize("n, channels, nrow", [(1, 1, 8), (5, 1, 2), (8, 3, 8), (10, 1, 3), (3, 3, 7)])
def test_grid_image_lays_out_like_torchvision(n, channels, nrow):
    x = torch.rand(n, channels, 6, 5) * 2 - 1
    expected = make_grid(to_uint8(x), nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(grid_image(x, nrow)), expected)


def test_grid_image_refuses_other_shapes():
    with pytest.raises(ValueError, match="N x 1|3 x H x W"):
        grid_image(torch.zeros(2, 2, 4, 4), nrow=2)
