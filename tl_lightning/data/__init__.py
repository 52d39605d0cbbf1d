"""One ``LightningDataModule`` per file; all normalise with the backbone's own statistics."""

from tl_lightning.data.base import ClassificationDataModule
from tl_lightning.data.digits import DigitsDataModule
from tl_lightning.data.image_folder import ImageFolderDataModule
from tl_lightning.data.torchvision_data import TorchvisionDataModule

__all__ = ["ClassificationDataModule", "DigitsDataModule", "ImageFolderDataModule", "TorchvisionDataModule"]
