"""One ``LightningDataModule`` per file; all prepare inputs as the backbone's weights expect
(image statistics, or the text tokenizer and maximum length)."""

from tl_lightning.data.base import ClassificationDataModule
from tl_lightning.data.digits import DigitsDataModule
from tl_lightning.data.domain_pair import DomainPairDataModule
from tl_lightning.data.fashion_mnist import FashionMNISTDataModule
from tl_lightning.data.grayscale import GrayscaleDataModule
from tl_lightning.data.image_folder import ImageFolderDataModule
from tl_lightning.data.mnist5k import MNIST5kDataModule
from tl_lightning.data.multitask import MultiTaskDataModule
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
    "DomainPairDataModule",
    "FashionMNISTDataModule",
    "GrayscaleDataModule",
    "HFDatasetDataModule",
    "ImageFolderDataModule",
    "MNIST5kDataModule",
    "MultiTaskDataModule",
    "RottenTomatoesDataModule",
    "TextDataModule",
    "TextFilesDataModule",
    "TorchvisionDataModule",
]
