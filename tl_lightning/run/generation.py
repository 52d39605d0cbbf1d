"""Generate with a fine-tuned language model (``task=causal_lm``): ``predict.py`` on a causal-LM checkpoint.

Prompts are rendered as the run rendered its training prompts: the run's own data module, rebuilt from
the checkpoint's config, turns each into tokens (an instruction run: the tokenizer's chat template with
the run's system turn and the generation prompt; a raw-text run: the text itself, to be continued).
Generation is greedy unless ``do_sample``; sampling is seeded.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from tl_lightning.data.lm_text import lm_collate
from tl_lightning.modules.causal_lm import CausalLMModule

GENERATION_SUFFIXES = (".csv", ".json")


def is_language_model(module: torch.nn.Module) -> bool:
    """Whether a rebuilt module generates text (a ``task=causal_lm`` run) rather than classifying."""
    return isinstance(module, CausalLMModule)


@torch.no_grad()
def generate(
    module: CausalLMModule,
    datamodule,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> list[dict]:
    """The continuation of every prompt, in order: ``[{"prompt": ..., "generation": ...}, ...]``.

    Args:
        module: The trained ``CausalLMModule`` (adapters merged), in eval mode.
        datamodule: The run's data module, its tokenizer loaded (``prompt_samples`` renders prompts).
        prompts: The user's turns (instruction runs) or texts to continue (raw-text runs).
        max_new_tokens: Longest continuation.
        do_sample: Sample (``temperature``, ``top_p``) instead of greedy decoding.
        temperature: Softmax temperature when sampling (``> 0``).
        top_p: Nucleus mass when sampling, in ``(0, 1]``.
        seed: Seed of the sampling.
        batch_size: Prompts per ``generate`` call (left-padded).
        device: Where to run.

    Raises:
        ValueError: On an out-of-range ``max_new_tokens``, ``temperature``, ``top_p`` or ``batch_size``.

    Example::

        rows = generate(model.module, text_datamodule(model), ["What is the capital of France?"])
    """
    if max_new_tokens < 1 or batch_size < 1 or not temperature > 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"need max_new_tokens >= 1, batch_size >= 1, temperature > 0 and top_p in (0, 1]; got "
            f"{max_new_tokens}, {batch_size}, {temperature}, {top_p}"
        )
    samples = datamodule.prompt_samples(list(prompts))
    module = module.to(device).eval()
    options = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    torch.manual_seed(seed)
    rows = []
    for start in range(0, len(samples), batch_size):
        batch = lm_collate(
            [samples[i] for i in range(start, min(start + batch_size, len(samples)))],
            datamodule.tokenizer.pad_token_id,
        )
        new = module.generate(
            batch["prompt_ids"].to(device),
            batch["prompt_mask"].to(device),
            max_new_tokens,
            do_sample,
            **options,
        )
        for text in datamodule.tokenizer.batch_decode(new, skip_special_tokens=True):
            rows.append({"prompt": prompts[len(rows)], "generation": text})
    return rows


def write_generations(rows: list[dict], output: str | Path) -> Path:
    """Write :func:`generate` rows as CSV (``prompt, generation``) or JSON, by suffix.

    Raises:
        ValueError: If ``output`` ends in neither ``.csv`` nor ``.json``.
    """
    output = Path(output)
    if output.suffix.lower() not in GENERATION_SUFFIXES:
        raise ValueError(f"output={str(output)!r} must end in one of {list(GENERATION_SUFFIXES)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".json":
        output.write_text(json.dumps(rows, indent=2))
        return output
    with output.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "generation"])
        writer.writeheader()
        writer.writerows(rows)
    return output
