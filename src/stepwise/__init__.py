"""stepwise: Hydra-configured PyTorch training where the batch arithmetic is exact and visible."""

__version__ = "0.1.0"
