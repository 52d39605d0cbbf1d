"""Parameter-efficient fine-tuning and model merging.

``peft``: ``strategy=lora|ia3|qlora|prefix_tuning|prompt_tuning`` wrap a backbone with Hugging Face
PEFT adapters, and checkpoints keep what trains; ``merging``: task vectors, weighted sums, negation,
TIES and DARE in weight space (the checkpoint-level merge of ``scripts/merge.py`` is
:mod:`tl_lightning.run.merge`).
"""

from tl_lightning.adapters.merging import (
    TaskVector,
    apply_task_vector,
    lora_task_vector,
    merge_task_vectors,
    task_vector,
)
from tl_lightning.adapters.peft import ia3, lora, prefix_tuning, prompt_tuning, qlora

__all__ = [
    "TaskVector",
    "apply_task_vector",
    "ia3",
    "lora",
    "lora_task_vector",
    "merge_task_vectors",
    "prefix_tuning",
    "prompt_tuning",
    "qlora",
    "task_vector",
]
