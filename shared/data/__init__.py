"""Datasets as tensors in [-1, 1]: MNIST-format IDX files, CIFAR-10, image folders, and the held-out split the
judge uses."""
