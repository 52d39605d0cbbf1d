"""Causal-LM fine-tuning steps: our Lightning pipeline vs a plain PEFT + PyTorch loop, tokens per second.

SmolLM2-135M-Instruct (offline, ``load_causal_lm``), the same fixed batch of random token ids
(``--batch-size`` x ``--seq-len``, every token a target), AdamW at the same learning rate, interleaved
by ``harness.interleave``; one call is ``--steps`` optimizer steps of a fresh optimizer on a model
built once per arm:

* ``lightning_lora``: ``CausalLMModule`` (``task=causal_lm``) on ``causal_language_model()`` wrapped by
  ``strategy=lora``'s adapter (rank 8 on q_proj/v_proj), trained by ``Trainer.fit`` (``max_steps``,
  no logger, checkpoint or progress bar): what a run pays, Lightning's per-fit set-up included;
* ``plain_lora``: ``peft.get_peft_model`` on the same model with the same ``LoraConfig``; loop:
  ``model(input_ids, attention_mask, labels).loss``, ``backward``, ``step``, ``zero_grad``;
* ``lightning_full`` / ``plain_full``: the same for full fine-tuning (every weight trains).

Tokens per second = ``batch-size x seq-len x steps`` over the call's wall time (the CPU time ratio is
printed too: it barely moves when the machine is busy). Peak memory is each arm's resident high-water
mark in a fresh child process (``harness.peak_rss_in_child``). TRL's ``SFTTrainer`` is measured when
``trl`` imports (``--trl``), else reported as skipped.

Usage::

    python benchmarks/bench_llm.py --kind lora|full [--trl] [--steps 2] [--repeats 3] [--threads 1]
        [--batch-size 4] [--seq-len 64]

One ``--kind`` per process: two SmolLM2 copies with AdamW state (full fine-tuning: ~2.2 GB each) fit
a small machine, four did not.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import harness
import lightning.pytorch as pl
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader

from tl_lightning.adapters.peft import keep_changed_only, lora
from tl_lightning.backbones.hf_decoder import load_causal_lm
from tl_lightning.modules.causal_lm import CausalLMModule, causal_language_model

LR = 1e-4
RANK, ALPHA = 8, 16


def _batch(batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (batch_size, seq_len), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _lightning(adapted: bool, steps: int, batch: dict) -> Callable[[], None]:
    backbone = causal_language_model()
    if adapted:
        backbone = lora(backbone, r=RANK, alpha=ALPHA)
    module = CausalLMModule(backbone, partial(torch.optim.AdamW, lr=LR))
    if adapted:
        keep_changed_only(module)
    loader = DataLoader([batch] * steps, batch_size=None)

    def run() -> None:
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        trainer.fit(module, train_dataloaders=loader)

    return run


def _plain(adapted: bool, steps: int, batch: dict) -> Callable[[], None]:
    model, _ = load_causal_lm()
    if adapted:
        model = get_peft_model(
            model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"])
        )
    model.train()

    def run() -> None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        for _ in range(steps):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def arm(name: str, steps: int, batch_size: int, seq_len: int) -> Callable[[], None]:
    """One call of arm ``name``: ``steps`` optimizer steps (model built outside the call)."""
    build = _lightning if name.startswith("lightning") else _plain
    return build(name.endswith("lora"), steps, _batch(batch_size, seq_len))


def _trl_arm(steps: int, batch_size: int, seq_len: int) -> Callable[[], None]:
    """TRL's SFTTrainer with LoRA on the same model and batch (raises ImportError without trl)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_causal_lm()
    batch = _batch(batch_size, seq_len)
    rows = Dataset.from_dict({"input_ids": batch["input_ids"].tolist() * steps})
    config = SFTConfig(
        output_dir="/tmp/bench_llm_trl", max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=LR, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
        gradient_checkpointing=False,  # SFTConfig turns it on by default: recomputation the other arms skip
    )  # fmt: skip
    peft = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"])
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=rows, processing_class=tokenizer, peft_config=peft
    )
    return trainer.train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--trl", action="store_true", help="add TRL's SFTTrainer (LoRA) as an arm")
    parser.add_argument(
        "--kind", choices=("lora", "full"), default="lora", help="one pair per process: memory for 2 copies"
    )
    args = parser.parse_args()
    title = (
        f"causal-LM steps: SmolLM2-135M, batch {args.batch_size} x {args.seq_len} tokens, "
        f"{args.steps} steps per call, {args.repeats} rounds + 1 warm-up, {args.kind}"
    )
    harness.begin(title, args.threads)
    torch.manual_seed(0)
    sizes = (args.steps, args.batch_size, args.seq_len)
    names = [f"lightning_{args.kind}", f"plain_{args.kind}"]
    arms = {name: arm(name, *sizes) for name in names}
    trl_note = "not asked (--trl, LoRA only)"
    if args.trl and args.kind == "lora":
        try:
            arms["trl_lora"] = _trl_arm(*sizes)
        except ImportError as error:
            trl_note = f"skipped: {error}"
    timings = harness.interleave(arms, repeats=args.repeats)
    tokens = args.batch_size * args.seq_len * args.steps
    rows = []
    for name, timing in timings.items():
        wall = sorted(timing.wall)[len(timing.wall) // 2]
        rows.append((f"{name}: tokens/s (wall, median)", f"{tokens / wall:.1f}"))
    for kind in [args.kind]:
        plain, ours = timings[f"plain_{kind}"], timings[f"lightning_{kind}"]
        rows.append(
            (
                f"{kind}: plain / Lightning time = Lightning tokens/s ratio, wall",
                harness.ratio(plain, ours, "wall"),
            )
        )
        rows.append((f"{kind}: plain / Lightning time, CPU", harness.ratio(plain, ours)))
    if "trl_lora" in timings:
        rows.append(
            (
                "lora: TRL / Lightning time, wall",
                harness.ratio(timings["trl_lora"], timings["lightning_lora"], "wall"),
            )
        )
    else:
        rows.append(("trl_lora", trl_note))
    for name in names:
        peak = harness.peak_rss_in_child("__main__:arm", name, *sizes)
        rows.append((f"{name}: peak RSS (child)", f"{peak / 2**20:.0f} MiB"))
    harness.report(title, rows)


if __name__ == "__main__":
    main()
