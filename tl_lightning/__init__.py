"""tl-lightning: transfer learning with PyTorch Lightning, timm and Hydra."""

__version__ = "0.1.0"
