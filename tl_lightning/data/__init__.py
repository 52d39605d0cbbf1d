"""One ``LightningDataModule`` per file; all prepare inputs as the backbone's weights expect
(image statistics, or the text tokenizer and maximum length)."""

from tl_lightning.data.base import ClassificationDataModule
from tl_lightning.data.digits import DigitsDataModule
from tl_lightning.data.image_folder import ImageFolderDataModule
from tl_lightning.data.text import (
    HFDatasetDataModule,
    RottenTomatoesDataModule,
    TextDataModule,
    TextFilesDataModule,
)
from tl_lightning.data.torchvision_data import TorchvisionDataModule

__all__ = [
    "ClassificationDataModule",
    "DigitsDataModule",
    "HFDatasetDataModule",
    "ImageFolderDataModule",
    "RottenTomatoesDataModule",
    "TextDataModule",
    "TextFilesDataModule",
    "TorchvisionDataModule",
]
