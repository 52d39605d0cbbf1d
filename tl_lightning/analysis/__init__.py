"""What to learn about a backbone and a data set before fine-tuning: transferability scores."""

from tl_lightning.analysis.transferability import leep, logme, nce, rank_agreement

__all__ = ["leep", "logme", "nce", "rank_agreement"]
