"""tl-lightning: transfer learning with PyTorch Lightning, timm and Hydra."""

__version__ = "0.2.0"
