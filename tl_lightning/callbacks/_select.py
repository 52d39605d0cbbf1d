"""Select the modules, parameters and layer groups a callback acts on, for any ``nn.Module``.

Selection rules, shared by every callback so that each works on any LightningModule, not only
``TransferModule`` (README, "The callbacks in your own Lightning project"):

* a selector is an attribute path (``"backbone"``, ``"encoder.layer.3"``) or, when it contains a
  regex metacharacter (``*+?[]()|^$\\``), a regular expression matched in full against module paths;
* module paths are those of ``named_modules()``, with every path of a module registered twice (tied
  weights) and with ``torch.compile``'s ``_orig_mod`` left out: ``"backbone.0"`` reaches the first
  block of a compiled ``backbone``, and selection sees the compiled module as the original;
* a list of selectors selects the union, in order; a module nested in another selected one is dropped;
* parameters are tensors, not names: a tensor owned by two modules (tied weights) is found through
  either owner, handled exactly once and reported under its name in ``root.named_parameters()``;
* layer groups, ordered input -> output: a **regex** selector makes each module it matches one layer
  group, in model order; an **attribute path** selector splits its module into the groups of its
  ``layer_groups()`` method (``dict[str, list[str]]`` of parameter names relative to that module) when
  it has one, else one group per child. So ``"encoder.layer"`` and ``r"encoder\\.layer\\.\\d+"`` give the
  same groups, named ``encoder.layer.0``, ``encoder.layer.1``, ...
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from tl_lightning.callbacks._sharded import reshard

ModuleSelector = str | Sequence[str]
LayerGroupsArg = Mapping[str, Sequence[str]]

_REGEX_CHARS = set("*+?[]()|^$\\")
_COMPILED = "_orig_mod"


def as_selector_list(modules: ModuleSelector) -> list[str]:
    """Normalise a selector argument to a non-empty list of strings.

    Raises:
        ValueError: If ``modules`` is empty or holds something other than strings.
    """
    selectors = [modules] if isinstance(modules, str) else list(modules)
    if not selectors or not all(isinstance(s, str) and s for s in selectors):
        raise ValueError(f"`modules` must be a non-empty string or list of strings, got {modules!r}")
    return selectors


def as_layer_groups_arg(layer_groups: LayerGroupsArg | None) -> dict[str, list[str]] | None:
    """Normalise the ``layer_groups`` argument of a callback: ``{group name: [paths or regexes]}`` or None.

    Raises:
        ValueError: If it is not a mapping of non-empty names to non-empty lists of strings.
    """
    if layer_groups is None:
        return None
    if not isinstance(layer_groups, Mapping) or not layer_groups:
        raise ValueError(
            f"`layer_groups` must be None or a non-empty mapping {{group name: [paths or regexes]}}, "
            f"got {layer_groups!r}"
        )
    normalised = {}
    for name, patterns in layer_groups.items():
        values = [patterns] if isinstance(patterns, str) else list(patterns)
        if not isinstance(name, str) or not name or not values or not all(isinstance(v, str) for v in values):
            raise ValueError(
                f"`layer_groups[{name!r}]` must be a non-empty list of parameter/module paths or regexes, "
                f"got {patterns!r}"
            )
        normalised[name] = values
    return normalised


def is_regex(selector: str) -> bool:
    """Whether ``selector`` is read as a regex (it contains a metacharacter) rather than a path."""
    return not _REGEX_CHARS.isdisjoint(selector)


def unwrap(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds, or ``module`` itself."""
    while type(module).__name__ == "OptimizedModule" and _COMPILED in module._modules:
        module = module._modules[_COMPILED]
    return module


def walk_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` of ``module`` and every sub-module, compiled modules seen through, each once.

    Like ``named_modules(prefix=prefix)``, but a compiled module is yielded as its original module
    under its own path (no ``_orig_mod``).
    """
    seen: set[int] = set()

    def visit(path: str, current: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        current = unwrap(current)
        if id(current) in seen:
            return
        seen.add(id(current))
        yield path, current
        for name, child in current.named_children():
            yield from visit(f"{path}.{name}" if path else name, child)

    yield from visit(prefix, module)


def module_paths(root: nn.Module) -> dict[str, nn.Module]:
    """Every path of every sub-module of ``root`` (a module registered twice has two), compiled ones
    seen through, in registration order."""
    paths: dict[str, nn.Module] = {}

    def visit(path: str, current: nn.Module, ancestors: tuple[int, ...]) -> None:
        current = unwrap(current)
        if id(current) in ancestors:
            return
        paths.setdefault(path, current)
        for name, child in current.named_children():
            visit(f"{path}.{name}" if path else name, child, (*ancestors, id(current)))

    visit("", root, ())
    return paths


def canonical_names(root: nn.Module) -> dict[int, str]:
    """``{id(parameter): its name in root.named_parameters()}``: one name per tensor, tied or not."""
    return {id(p): name for name, p in root.named_parameters()}


def parameters_by_name(root: nn.Module, names: Sequence[str]) -> dict[str, nn.Parameter]:
    """Current parameters of ``root`` by canonical name (look them up again after a strategy moved them;
    under FSDP2, the sharded ones).

    Raises:
        KeyError: If a name is not a parameter name of ``root``; the message lists a few that are.
    """
    reshard(root)
    params = dict(root.named_parameters())
    unknown = [name for name in names if name not in params]
    if unknown:
        raise KeyError(
            f"{type(root).__name__} has no parameters {unknown[:5]}; "
            f"its parameters include {list(params)[:5]}"
        )
    return {name: params[name] for name in names}


@dataclass(frozen=True)
class _Selected:
    path: str
    module: nn.Module
    regex: bool


def _resolve(root: nn.Module, modules: ModuleSelector) -> list[_Selected]:
    paths = module_paths(root)
    selected: dict[str, _Selected] = {}
    for selector in as_selector_list(modules):
        if is_regex(selector):
            pattern = re.compile(selector)
            matches = [path for path in paths if path and pattern.fullmatch(path)]
        else:
            matches = [selector] if selector in paths else []
        if not matches:
            children = ", ".join(repr(n) for n, _ in unwrap(root).named_children()) or "none"
            raise AttributeError(
                f"{type(root).__name__} has no module matching {selector!r}; "
                f"its top-level children are: {children}"
            )
        for path in matches:
            selected.setdefault(path, _Selected(path, paths[path], is_regex(selector)))
    return [
        item
        for item in selected.values()
        if not any(_inside(item.path, other) for other in selected if other != item.path)
    ]


def _inside(path: str, ancestor: str) -> bool:
    return ancestor == "" or path.startswith(ancestor + ".")


def select_modules(root: nn.Module, modules: ModuleSelector) -> dict[str, nn.Module]:
    """Resolve selectors to sub-modules of ``root`` (compiled modules seen through).

    Args:
        root: The module to search, typically the ``LightningModule``.
        modules: An attribute path, a regex over module paths, or a list of them.

    Returns:
        ``{path: module}`` in selector order. Modules nested inside an already selected module are
        dropped.

    Raises:
        AttributeError: If a selector matches nothing; the message lists ``root``'s top-level
            children so the user can see what exists.
    """
    return {item.path: item.module for item in _resolve(root, modules)}


def selected_parameters(root: nn.Module, modules: ModuleSelector) -> dict[str, nn.Parameter]:
    """Parameters of the selected modules, each tensor once, keyed by its name in ``root``.

    Raises:
        AttributeError: If a selector matches nothing (see :func:`select_modules`).
    """
    canonical = canonical_names(root)
    return {canonical[id(p)]: p for p, _ in _selected_tensors(root, modules).values()}


def shared_parameters(
    root: nn.Module, first: ModuleSelector, second: ModuleSelector
) -> list[tuple[str, str]]:
    """Tensors selected by both ``first`` and ``second``, as ``(path via first, path via second)``.

    Tied weights count: a tensor reached as ``embed.weight`` by one selection and as
    ``lm_head.weight`` by the other is reported as that pair.
    """
    a, b = _selected_tensors(root, first), _selected_tensors(root, second)
    return [(path, b[key][1]) for key, (_, path) in a.items() if key in b]


def _selected_tensors(root: nn.Module, modules: ModuleSelector) -> dict[int, tuple[nn.Parameter, str]]:
    """``{id: (parameter, path through which the selection reached it)}`` in selection order."""
    found: dict[int, tuple[nn.Parameter, str]] = {}
    for item in _resolve(root, modules):
        for name, param in _named_tensors(item.module, item.path):
            found.setdefault(id(param), (param, name))
    return found


def _named_tensors(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters of ``module`` with their path (compiled modules seen through), each tensor once."""
    seen: set[int] = set()
    for path, sub in walk_modules(module, prefix):
        for name, param in sub.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield (f"{path}.{name}" if path else name), param


def layer_groups(
    root: nn.Module, modules: ModuleSelector, explicit: LayerGroupsArg | None = None
) -> dict[str, list[str]]:
    """Ordered (input -> output) layer groups of the selected modules, as parameter names in ``root``.

    A regex selector makes each module it matches one group named by its path; an attribute path
    selector contributes its module's ``layer_groups()`` when it has one, else one group per child that
    owns parameters (plus ``<path>._direct`` for parameters held directly). With ``explicit``
    (``{group name: [paths or regexes]}``, as callers pass it) the groups are resolved by
    :func:`match_layer_groups` instead. A tied tensor belongs to the first group that holds it;
    groups left empty by that are dropped.

    Returns:
        ``{group name: [parameter names in root]}``; every selected tensor appears in exactly one group.

    Raises:
        AttributeError: If a selector matches nothing.
        ValueError: If a module's ``layer_groups()`` misses or repeats a parameter, or names one
            that does not exist.
    """
    if explicit is not None:
        return match_layer_groups(root, modules, dict(explicit))
    canonical = canonical_names(root)
    groups: dict[str, list[str]] = {}
    taken: set[int] = set()
    for item in _resolve(root, modules):
        for group_name, params in _local_groups(item):
            names = [canonical[id(p)] for p in params if id(p) not in taken]
            taken.update(id(p) for p in params)
            if names:
                groups[group_name] = names
    return groups


def _local_groups(item: _Selected) -> list[tuple[str, list[nn.Parameter]]]:
    if item.regex:
        return [(item.path, [p for _, p in _named_tensors(item.module, "")])]
    if callable(getattr(item.module, "layer_groups", None)):
        return _declared_groups(item)
    local = []
    direct = [p for _, p in item.module.named_parameters(recurse=False)]
    if direct:
        local.append((_qualify(item.path, "_direct"), direct))
    for child_name, child in item.module.named_children():
        params = [p for _, p in _named_tensors(child, "")]
        if params:
            local.append((_qualify(item.path, child_name), params))
    if not local:
        raise ValueError(f"module {item.path or type(item.module).__name__!r} has no parameters to group")
    return local


def _declared_groups(item: _Selected) -> list[tuple[str, list[nn.Parameter]]]:
    """The groups of a module's ``layer_groups()``, checked to partition its tensors."""
    module = item.module
    aliases = dict(module.named_parameters(remove_duplicate=False))
    declared = module.layer_groups()
    unknown = sorted(n for names in declared.values() for n in names if n not in aliases)
    tensors = [aliases[n] for names in declared.values() for n in names if n in aliases]
    ids = [id(p) for p in tensors]
    missing = sorted(n for n, p in module.named_parameters() if id(p) not in set(ids))
    repeated = len(ids) != len(set(ids))
    if unknown or missing or repeated:
        raise ValueError(
            f"layer_groups() of {item.path or type(module).__name__!r} must partition its parameters: "
            f"unknown={unknown[:5]}, missing={missing[:5]}, repeated={repeated}"
        )
    return [(_qualify(item.path, g), [aliases[n] for n in names]) for g, names in declared.items()]


def _qualify(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def layer_parameters(
    root: nn.Module, groups: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, nn.Parameter]]:
    """``{group: {parameter name: parameter}}`` for layer groups given as parameter names in ``root``
    (under FSDP2, the sharded parameters)."""
    reshard(root)
    params = dict(root.named_parameters())
    return {group: {name: params[name] for name in names} for group, names in groups.items()}


def match_layer_groups(
    root: nn.Module, modules: ModuleSelector, spec: dict[str, Sequence[str]]
) -> dict[str, list[str]]:
    """Caller-given layer groups, resolved to parameter names in ``root``.

    Args:
        root: The module to search, typically the ``LightningModule``.
        modules: The selectors whose parameters the groups must partition.
        spec: ``{group name: [patterns]}`` ordered input -> output. A pattern names a parameter or a
            module (all its parameters) by its path, or is a regex matched in full against parameter
            paths; a tied tensor matches through any of its paths.

    Raises:
        AttributeError: If a selector matches nothing.
        ValueError: If a group matches no selected parameter, or the groups do not cover every
            selected parameter exactly once.
    """
    canonical = canonical_names(root)
    selected = [p for p, _ in _selected_tensors(root, modules).values()]
    paths = _parameter_paths(root)
    groups: dict[str, list[str]] = {}
    for group_name, patterns in spec.items():
        groups[group_name] = [
            canonical[id(p)]
            for p in selected
            if any(_matches(pattern, path) for pattern in patterns for path in paths[id(p)])
        ]
        if not groups[group_name]:
            raise ValueError(
                f"layer group {group_name!r} matches no parameter of {modules!r}: {list(patterns)}"
            )
    seen = [n for names in groups.values() for n in names]
    missing = sorted({canonical[id(p)] for p in selected} - set(seen))
    repeated = sorted(n for n, count in Counter(seen).items() if count > 1)
    if missing or repeated:
        raise ValueError(
            f"`layer_groups` must cover every parameter of {modules!r} exactly once: "
            f"uncovered={missing[:5]}, in several groups={repeated[:5]}"
        )
    return groups


def _parameter_paths(root: nn.Module) -> dict[int, list[str]]:
    """Every path of every tensor in ``root`` (tied tensors have several), compiled modules seen through."""
    found: dict[int, list[str]] = {}
    for path, module in module_paths(root).items():
        for name, param in module.named_parameters(recurse=False):
            found.setdefault(id(param), []).append(_qualify(path, name))
    return found


def _matches(pattern: str, name: str) -> bool:
    if name == pattern or name.startswith(pattern + "."):
        return True
    return is_regex(pattern) and re.fullmatch(pattern, name) is not None


def modules_of_groups(
    root: nn.Module, modules: ModuleSelector, groups: Mapping[str, Sequence[str]]
) -> dict[str, set[str]]:
    """The layer groups each sub-module of the selection belongs to: ``{module path: {group names}}``.

    A module with parameters belongs to the groups of all its tensors; a module without any (dropout,
    drop-path, activations, pooling) to the group of the nearest parameter before it in model order
    (or after it, when none comes before). So a module is wholly frozen exactly when all its groups are.
    """
    params = dict(root.named_parameters())
    group_of = {id(params[name]): group for group, names in groups.items() for name in names}
    found: dict[str, set[str]] = {}
    pending: list[str] = []
    last: str | None = None
    for item in _resolve(root, modules):
        for path, module in walk_modules(item.module, item.path):
            owned = {group_of[id(p)] for p in module.parameters() if id(p) in group_of}
            direct_groups = [group_of[id(p)] for p in module.parameters(recurse=False) if id(p) in group_of]
            if owned:
                found[path] = owned
                for waiting in pending:
                    found[waiting] = {min(owned, key=list(groups).index)}
                pending = []
            elif last is not None:
                found[path] = {last}
            else:
                pending.append(path)
            if direct_groups:
                last = direct_groups[-1]
    return found
