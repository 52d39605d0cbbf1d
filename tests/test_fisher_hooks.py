"""Layer-hook Fisher (and its fallbacks) against a brute-force batch-size-1 autograd loop."""

import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tl_lightning.fisher import fisher_diagonal, sample_labels

CLASSES = 4


def _take(x, j):
    return x[j : j + 1] if isinstance(x, torch.Tensor) else {k: v[j : j + 1] for k, v in x.items()}


def _reference(model, batches, mode, seed=0):
    """Plain autograd, one sample (and in exact mode one class) at a time, eval mode."""
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p) for n, p in named}
    count = 0
    for index, (x, y) in enumerate(batches):
        if mode == "sampled":
            with torch.no_grad():
                y = sample_labels(model(x), seed + index)
        for j in range(len(y)):
            logp = model(_take(x, j)).log_softmax(-1)[0]
            terms = (
                [(c, logp[c].exp().item()) for c in range(len(logp))] if mode == "exact" else [(y[j], 1.0)]
            )
            for label, weight in terms:
                grads = torch.autograd.grad(
                    logp[label], [p for _, p in named], retain_graph=True, allow_unused=True
                )
                for (n, _), g in zip(named, grads, strict=True):
                    if g is not None:
                        total[n] += weight * g.square()
            count += 1
    return {n: t / count for n, t in total.items()}


def _assert_close(actual, expected, rtol=1e-4):
    assert actual.keys() == expected.keys()
    scale = max(float(t.norm()) for t in expected.values())
    for name, ref in expected.items():  # atol: parameters whose true Fisher is 0 (e.g. attention key biases)
        err = float((actual[name] - ref).norm())
        assert err <= rtol * float(ref.norm()) + 1e-6 * scale, (
            f"{name}: error {err:.2e} vs {float(ref.norm()):.2e}"
        )


class Conv2dPadInForward(nn.Conv2d):
    """Like timm's Conv2dSame: the padding happens in forward, not in the conv call."""

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)))


class Vision(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=8)
        self.grouped = nn.Conv2d(16, 8, 1, groups=4)
        self.same = Conv2dPadInForward(8, 8, 2)
        self.gn = nn.GroupNorm(2, 8)
        self.drop = nn.Dropout(0.5)
        self.seq = nn.Conv1d(8, 6, 3, padding=1)
        self.ln = nn.LayerNorm(6)
        self.tokens = nn.Linear(6, 6)  # on a [N, L, 6] sequence
        self.head = nn.Linear(6, CLASSES)

    def forward(self, x):
        x = self.drop(F.relu(self.bn(self.stem(x))))
        x = self.gn(self.same(self.grouped(F.relu(self.depthwise(x)))))
        s = self.seq(x.mean(2))  # [N, 6, W]
        s = self.tokens(self.ln(s.transpose(1, 2))).relu()
        return self.head(self.drop(s.mean(1)))


def _vision():
    torch.manual_seed(0)
    model = Vision()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        for m in (model.bn, model.gn, model.ln):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    model.train()
    return model


def _vision_batches():
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 3, 10, 10, generator=g), torch.randint(0, CLASSES, (n,), generator=g)) for n in (5, 3)
    ]


@pytest.mark.parametrize("mode", ["empirical", "sampled", "exact"])
def test_hooks_match_loop_on_bn_dropout_depthwise_grouped_pad_in_forward(mode, caplog):
    batches = _vision_batches()
    with caplog.at_level(logging.INFO, logger="tl_lightning.fisher"):
        fisher = fisher_diagonal(_vision(), batches, mode=mode, chunk_size=3, seed=2)
    _assert_close(fisher, _reference(_vision(), batches, mode, seed=2))
    assert "0 by per-sample vmap/loop" in caplog.text  # every layer went through a hook


def test_budget_sets_chunk_and_result_does_not_depend_on_it(caplog):
    batches = _vision_batches()
    with caplog.at_level(logging.INFO, logger="tl_lightning.fisher"):
        tiny = fisher_diagonal(_vision(), batches, memory_budget=1)
    assert "chunk 1 samples" in caplog.text
    _assert_close(tiny, fisher_diagonal(_vision(), batches), rtol=1e-5)


def _timm_model(timm_layers):
    torch.manual_seed(0)
    model = nn.Sequential(
        timm_layers.Conv2dSame(3, 6, 3, stride=2),  # TF "same" padding, asymmetric on an odd input
        timm_layers.BatchNormAct2d(6),  # BatchNorm + ReLU in one module
        timm_layers.Conv2dSame(6, 12, 3, stride=2, groups=6),  # depthwise, channel multiplier 2
        timm_layers.BatchNormAct2d(12, act_layer=nn.ReLU6),
        nn.Conv2d(12, 8, 3, padding=1, groups=2),
        nn.Conv2d(8, 8, 1),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, CLASSES),
    ).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("mode", ["empirical", "exact"])
def test_timm_conv2d_same_batchnorm_act_grouped_closed_forms(mode, caplog):
    timm_layers = pytest.importorskip("timm.layers")
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(5, 3, 9, 9, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1]))]
    with caplog.at_level(logging.INFO, logger="tl_lightning.fisher"):
        fisher = fisher_diagonal(_timm_model(timm_layers), batches, mode=mode, chunk_size=3)
    _assert_close(fisher, _reference(_timm_model(timm_layers), batches, mode), rtol=1e-10)
    assert "BatchNormAct2d (BatchNorm + activation) 4" in caplog.text
    assert "Conv2dSame (TF 'same' padding) 4" in caplog.text and "Conv2d 4" in caplog.text
    assert "vjp" not in caplog.text


class PadLeftInForward(nn.Conv2d):
    """Pads top/left only: not TF "same" padding, so the closed form must not be used."""

    def forward(self, x):
        return super().forward(F.pad(x, (1, 0, 1, 0)))


class ActBeforeNorm(nn.BatchNorm2d):
    """Has ``act``/``drop`` like timm's BatchNormAct2d but applies the activation first."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act, self.drop = nn.Tanh(), nn.Identity()

    def forward(self, x):
        return super().forward(self.act(x))


@pytest.mark.parametrize("mode", ["empirical", "exact"])
def test_lookalike_subclasses_fall_back_to_per_layer_vjp(mode, caplog):
    torch.manual_seed(0)
    model = nn.Sequential(
        PadLeftInForward(3, 4, 2), ActBeforeNorm(4), nn.Flatten(), nn.Linear(4 * 5 * 5, CLASSES)
    ).double()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    batches = [(torch.randn(4, 3, 5, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3]))]
    with caplog.at_level(logging.INFO, logger="tl_lightning.fisher"):
        fisher = fisher_diagonal(model, batches, mode=mode)
    _assert_close(fisher, _reference(model, batches, mode), rtol=1e-10)
    assert "PadLeftInForward (per-layer vjp) 2" in caplog.text
    assert "ActBeforeNorm (per-layer vjp) 2" in caplog.text


class Tied(nn.Module):
    """Input embedding tied to the output layer, a layer called twice, a weight used outside its module."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(CLASSES + 3, 5, padding_idx=0)
        self.out = nn.Linear(5, CLASSES + 3)
        self.out.weight = self.embed.weight
        self.twice = nn.Linear(5, 5)
        self.scale = nn.Linear(5, 5)
        self.pos = nn.Embedding(6, 5)

    def forward(self, x):
        h = self.embed(x) + self.pos(torch.arange(x.shape[1]).unsqueeze(0))  # broadcast over the batch
        h = self.twice(self.twice(h).tanh()) + F.linear(h, self.scale.weight)
        return self.out(self.scale(h).mean(1))


@pytest.mark.parametrize("mode", ["empirical", "exact"])
def test_tied_shared_and_direct_weights_fall_back_exactly(mode, caplog):
    torch.manual_seed(0)
    model = Tied()
    x = torch.tensor([[1, 2, 2, 0, 3, 1], [4, 4, 4, 4, 0, 0], [5, 1, 6, 2, 2, 3]])  # repeats and padding
    batches = [(x, torch.tensor([1, 5, 2]))]
    with caplog.at_level(logging.INFO, logger="tl_lightning.fisher"):
        fisher = fisher_diagonal(model, batches, mode=mode)
    _assert_close(fisher, _reference(model, batches, mode))
    assert "tied to another module" in caplog.text and "called 2 times" in caplog.text
    assert "also used outside its module" in caplog.text


def test_batchnorm_without_running_stats_uses_per_sample_path():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, track_running_stats=False), nn.Flatten(), nn.Linear(12, CLASSES)
    )
    batches = [(torch.randn(5, 2, 2, 2), torch.randint(0, CLASSES, (5,)))]
    with pytest.raises(AssertionError):  # samples interact: a batched pass is not the per-sample Fisher
        _assert_close(_reference_batched(model, batches), _reference(model, batches, "empirical"))
    _assert_close(fisher_diagonal(model, batches), _reference(model, batches, "empirical"))


def _reference_batched(model, batches):
    """Per-sample gradients with every sample in one batch (wrong when samples interact)."""
    model.eval()
    x, y = batches[0]
    logp = model(x).log_softmax(-1)
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for j in range(len(y)):
        grads = torch.autograd.grad(logp[j, y[j]], list(model.parameters()), retain_graph=True)
        for (n, _), g in zip(model.named_parameters(), grads, strict=True):
            total[n] += g.square() / len(y)
    return total


class BertClassifier(nn.Module):
    def __init__(self, encoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, CLASSES)

    def forward(self, batch):
        return self.head(self.encoder(**batch).last_hidden_state[:, 0])


@pytest.mark.parametrize("mode", ["empirical", "sampled", "exact"])
def test_unmodified_hf_bert_encoder(mode, caplog):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
    )
    model = BertClassifier(transformers.BertModel(config))
    ids = torch.randint(1, 40, (5, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    batches = [({"input_ids": ids, "attention_mask": mask}, torch.tensor([0, 1, 2, 3, 1]))]
    with caplog.at_level(logging.INFO, logger="tl_lightning.fisher"):
        fisher = fisher_diagonal(model, batches, mode=mode, chunk_size=3, seed=1)
    _assert_close(fisher, _reference(model, batches, mode, seed=1))
    assert "Embedding 3" in caplog.text  # word, position (broadcast over the batch) and token-type embeddings
