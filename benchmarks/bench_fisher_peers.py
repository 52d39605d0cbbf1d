"""Our diagonal Fisher against Opacus, BackPACK and nngeometry on one model and one set of samples.

The model is timm's ``tf_efficientnet_lite0`` (random weights, 10 classes, eval semantics: BatchNorm on
running statistics, no dropout), with every activation made out-of-place (BackPACK's module hooks refuse
in-place activations; the values are the same) and its classifier weights scaled by 0.01: with timm's
random initialisation the softmax is one-hot to float precision, where nngeometry's factorisation of
``diag(p) - p pᵀ`` takes the square root of a negative ``1 - cumsum(p)`` and returns NaN everywhere.
Each peer computes what it supports:

* **Opacus** (``GradSampleModule``, per-sample gradients, squared and averaged: the empirical Fisher). It
  refuses trainable BatchNorm layers ("a trainable layer with buffers"), so its arm and our matching arm
  compute the Fisher of every parameter *except* the BatchNorm ones, with BatchNorm frozen. Opacus only
  records activations of modules in training mode, so the layers with parameters are flagged ``training``
  while BatchNorm and the model's own dropout stay in eval mode.
* **BackPACK** (``SumGradSquared``: ``Σ_n g_n²`` of a summed loss, the empirical Fisher times ``n``). It
  skips timm's ``Conv2dSame`` and ``BatchNormAct2d`` with a warning; its ``DiagGGNExact`` (the exact Fisher
  for a softmax output) refuses the model outright (no extension for timm's container modules).
* **nngeometry** (``FIM`` with ``PMatDiag``: the exact Fisher, Σ over classes, ``C - 1`` backward passes).
  It knows layers by class name, so ``Conv2dSame`` and ``BatchNormAct2d`` are not covered, and its conv
  layer ignores ``groups``: a depthwise conv is sized as a dense one (148.8M "parameters" for this 3.4M-
  parameter model), so depthwise convs are left out of its layer collection. Compared with our exact mode
  restricted to the same parameters.

Per arm: CPU time (``harness.interleave``, median and min-max) and the ratio to our arm computing the
same thing, peak RSS above the set-up in a fresh child process, and the correctness column: the largest
relative error ``‖F_peer − F_ref‖ / ‖F_ref‖`` over the parameter tensors the arm covers, against a
brute-force batch-size-1 autograd loop on ``--check-samples`` samples. A missing peer is skipped with a
message (``pip install -e .[bench]`` installs them). The default is 32 samples because Opacus holds
~4.4 GB above the set-up there (64 samples were killed for memory on a shared 23 GB machine).

Usage: ``python benchmarks/bench_fisher_peers.py [--samples 32] [--repeats 3] [--check-samples 8]``
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import warnings
from collections.abc import Callable

import harness
import torch
from torch import nn
from torch.nn import functional as F

from tl_lightning.fisher import fisher_diagonal

CLASSES = 10
PEERS = {"Opacus": "opacus", "BackPACK": "backpack", "nngeometry": "nngeometry"}
Fisher = dict[str, torch.Tensor]


def lite0(samples: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=CLASSES).eval()
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    with torch.no_grad():  # timm's random init saturates the softmax (see the module docstring)
        model.classifier.weight.mul_(0.01)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 3, 64, 64, generator=generator)
    return model, x, torch.randint(0, CLASSES, (samples,), generator=generator)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def opacus_fisher(model: nn.Module) -> tuple[Callable[[torch.Tensor, torch.Tensor], Fisher], list[str]]:
    """Empirical Fisher of the non-BatchNorm parameters from Opacus' per-sample gradients."""
    from opacus import GradSampleModule

    model = copy.deepcopy(model)
    for module in model.modules():
        module.training = any(p.requires_grad for p in module.parameters(recurse=False))
        if _is_norm(module):
            module.requires_grad_(False)
            module.training = False
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    wrapped = GradSampleModule(model, loss_reduction="sum")

    def run(x: torch.Tensor, y: torch.Tensor) -> Fisher:
        F.cross_entropy(wrapped(x), y, reduction="sum").backward()
        out = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                out[name] = p.grad_sample.square().mean(0)
                p.grad_sample = None
        wrapped.zero_grad(set_to_none=True)
        return out

    return run, names


def backpack_fisher(model: nn.Module) -> tuple[Callable[[torch.Tensor, torch.Tensor], Fisher], list[str]]:
    """Empirical Fisher of the layers BackPACK's ``SumGradSquared`` covers."""
    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared

    model = extend(copy.deepcopy(model))
    loss = extend(nn.CrossEntropyLoss(reduction="sum"))

    def run(x: torch.Tensor, y: torch.Tensor) -> Fisher:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no extension for Conv2dSame/BatchNormAct2d", once per call
            with backpack(SumGradSquared()):
                loss(model(x), y).backward()
        out = {}
        for name, p in model.named_parameters():
            if hasattr(p, "sum_grad_squared"):
                out[name] = p.sum_grad_squared / len(x)
                del p.sum_grad_squared
        model.zero_grad(set_to_none=True)
        return out

    x, y = lite0(2)[1:]
    return run, list(run(x, y))


def nngeometry_fisher(model: nn.Module) -> tuple[Callable[[torch.Tensor, torch.Tensor], Fisher], list[str]]:
    """Exact Fisher (``FIM``, ``PMatDiag``) of the layers nngeometry supports, depthwise convs left out."""
    from nngeometry.layercollection import LayerCollection
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatDiag, PVector

    layers = LayerCollection()
    for module in model.modules():
        known = type(module).__name__ in LayerCollection._known_modules
        if known and getattr(module, "groups", 1) == 1:
            layers.add_layer_from_model(model, module)
    names = []
    for layer_id, layer in layers.layers.items():
        names += [f"{layer_id}.weight"] + ([f"{layer_id}.bias"] if layer.bias else [])

    def run(x: torch.Tensor, y: torch.Tensor) -> Fisher:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
        diag = FIM(model, loader, PMatDiag, variant="classif_logits", layer_collection=layers)
        out = {}
        for layer_id, parts in PVector(layers, vector_repr=diag.data).to_dict().items():
            for local, part in zip(("weight", "bias"), parts, strict=False):
                out[f"{layer_id}.{local}"] = part
        return out

    return run, names


PREPARE = {"Opacus": opacus_fisher, "BackPACK": backpack_fisher, "nngeometry": nngeometry_fisher}
OURS = {"Opacus": "empirical", "BackPACK": "empirical", "nngeometry": "exact"}


def ours(
    model: nn.Module, mode: str, names: list[str] | None
) -> Callable[[torch.Tensor, torch.Tensor], Fisher]:
    def run(x: torch.Tensor, y: torch.Tensor) -> Fisher:
        return fisher_diagonal(model, [(x, y)], mode=mode, params=names)

    return run


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> Fisher:
    """Brute force: plain autograd, one sample (and in exact mode one class) at a time."""
    named = dict(model.named_parameters())
    total = {name: torch.zeros_like(p) for name, p in named.items()}
    for j in range(len(x)):
        logp = model(x[j : j + 1]).log_softmax(-1)[0]
        terms = [(c, float(logp[c].exp())) for c in range(CLASSES)] if mode == "exact" else [(int(y[j]), 1.0)]
        for label, weight in terms:
            grads = torch.autograd.grad(logp[label], list(named.values()), retain_graph=True)
            for name, g in zip(named, grads, strict=True):
                total[name] += weight * g.square()
    return {name: t / len(x) for name, t in total.items()}


def worst_error(fisher: Fisher, ref: Fisher) -> str:
    errors = {name: float((f - ref[name]).norm() / ref[name].norm()) for name, f in fisher.items()}
    name = max(errors, key=errors.get)
    return f"{errors[name]:.1e} ({name})" if errors[name] > 1e-4 else f"{errors[name]:.1e}"


def arm_in_child(arm: str, samples: int) -> Callable[[], object]:
    """Child-process target of ``harness.peak_rss_in_child``: set up one arm, return the call to measure."""
    model, x, y = lite0(samples)
    if arm == "set-up":
        return lambda: None
    run = arm_functions(model, [arm])[arm]
    return lambda: run(x, y)


def arm_functions(
    model: nn.Module, wanted: list[str]
) -> dict[str, Callable[[torch.Tensor, torch.Tensor], Fisher]]:
    """Every arm named in ``wanted``: ``"<peer>"`` and ``"ours (<peer>'s parameters, <mode>)"``."""
    arms = {}
    for peer, prepare in PREPARE.items():
        ours_arm = f"ours ({peer}'s parameters, {OURS[peer]})"
        if peer not in wanted and ours_arm not in wanted:
            continue
        run, names = prepare(model)
        arms[peer], arms[ours_arm] = run, ours(model, OURS[peer], names)
    return {arm: arms[arm] for arm in wanted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-samples", type=int, default=8)
    args = parser.parse_args()
    title = (
        f"Fisher peers: EfficientNet-Lite0, {args.samples} samples 64 px, {args.repeats} rounds + 1 warm-up"
    )
    harness.begin(title, threads=1)
    present = [peer for peer, module in PEERS.items() if importlib.util.find_spec(module) is not None]
    for peer in PEERS.keys() - set(present):
        harness.skip(f"Fisher peers: {peer}", f"{PEERS[peer]} is not installed (pip install -e .[bench])")
    if not present:
        return
    wanted = [arm for peer in present for arm in (f"ours ({peer}'s parameters, {OURS[peer]})", peer)]
    model, x, y = lite0(args.samples)
    functions = arm_functions(model, wanted)
    times = harness.interleave(
        {arm: (lambda f=f: f(x, y)) for arm, f in functions.items()}, repeats=args.repeats
    )

    check_x, check_y = lite0(args.check_samples, seed=1)[1:]
    refs = {mode: reference(model, check_x, check_y, mode) for mode in ("empirical", "exact")}
    set_up = harness.peak_rss_in_child("__main__:arm_in_child", "set-up", args.samples)
    rows: list[tuple[str, str | harness.Ratio]] = []
    for peer in present:
        ours_arm = f"ours ({peer}'s parameters, {OURS[peer]})"
        for arm in (ours_arm, peer):
            fisher = functions[arm](check_x, check_y)
            peak = harness.peak_rss_in_child("__main__:arm_in_child", arm, args.samples) - set_up
            covered = f"{len(fisher)}/{len(refs['exact'])} tensors"
            error = worst_error(fisher, refs[OURS[peer]])
            rows.append(
                (
                    f"{arm}: CPU, peak above set-up, {covered}, worst relative error",
                    f"{times[arm].describe()}, {peak / 2**20:.0f} MiB, {error}",
                )
            )
        rows.append((f"{peer} / ours, CPU", harness.ratio(times[peer], times[ours_arm])))
    harness.report(title, rows)


if __name__ == "__main__":
    main()
