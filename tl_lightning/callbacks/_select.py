"""Select the modules and layer groups a callback acts on, for any ``nn.Module``.

Selection rules (the callback contract, ARCHITECTURE.md section 3):

* a selector is an attribute path (``"backbone"``, ``"encoder.layer.3"``) or, when it contains a
  regex metacharacter, a regular expression matched in full against ``named_modules()`` names;
* a list of selectors selects the union, in order, without duplicates;
* layer groups, ordered input -> output, come from the module's ``layer_groups()`` when it has one
  (``dict[str, list[str]]`` of parameter names relative to that module), else from its children.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

from torch import nn

ModuleSelector = str | Sequence[str]

_REGEX_CHARS = set("*+?[]()|^$\\")


def as_selector_list(modules: ModuleSelector) -> list[str]:
    """Normalise a selector argument to a non-empty list of strings.

    Raises:
        ValueError: If ``modules`` is empty or holds something other than strings.
    """
    selectors = [modules] if isinstance(modules, str) else list(modules)
    if not selectors or not all(isinstance(s, str) and s for s in selectors):
        raise ValueError(f"`modules` must be a non-empty string or list of strings, got {modules!r}")
    return selectors


def select_modules(root: nn.Module, modules: ModuleSelector) -> dict[str, nn.Module]:
    """Resolve selectors to named sub-modules of ``root``.

    Args:
        root: The module to search, typically the ``LightningModule``.
        modules: An attribute path, a regex over ``named_modules()`` names, or a list of them.

    Returns:
        ``{qualified name: module}`` in selector order. Modules nested inside an already selected
        module are dropped, so every parameter is owned by exactly one selected module.

    Raises:
        AttributeError: If a selector matches nothing; the message lists ``root``'s top-level
            children so the user can see what exists.
    """
    named = dict(root.named_modules())
    selected: dict[str, nn.Module] = {}
    for selector in as_selector_list(modules):
        if _REGEX_CHARS.isdisjoint(selector):
            matches = [selector] if selector in named else []
        else:
            pattern = re.compile(selector)
            matches = [name for name in named if name and pattern.fullmatch(name)]
        if not matches:
            children = ", ".join(repr(n) for n, _ in root.named_children()) or "none"
            raise AttributeError(
                f"{type(root).__name__} has no module matching {selector!r}; "
                f"its top-level children are: {children}"
            )
        for name in matches:
            selected.setdefault(name, named[name])
    return {
        name: module
        for name, module in selected.items()
        if not any(name.startswith(other + ".") for other in selected if other != name)
    }


def selected_parameters(root: nn.Module, modules: ModuleSelector) -> dict[str, nn.Parameter]:
    """Parameters of the selected modules, keyed by their name in ``root``.

    Raises:
        AttributeError: If a selector matches nothing (see :func:`select_modules`).
    """
    params: dict[str, nn.Parameter] = {}
    for prefix, module in select_modules(root, modules).items():
        for name, param in module.named_parameters():
            params.setdefault(f"{prefix}.{name}" if prefix else name, param)
    return params


def layer_groups(
    root: nn.Module, modules: ModuleSelector, explicit: Mapping[str, Sequence[str]] | None = None
) -> dict[str, list[str]]:
    """Ordered (input -> output) layer groups of the selected modules, as parameter names in ``root``.

    With ``explicit`` (``{group name: [paths or regexes]}``, as callers pass it) the groups are
    resolved by :func:`match_layer_groups` instead.

    Each selected module contributes its own groups: those from its ``layer_groups()`` method when
    it has one, else one group per child that owns parameters (plus one for parameters held
    directly). Group names are qualified with the selected module's path.

    Returns:
        ``{group name: [parameter names in root]}``; every parameter appears in exactly one group.

    Raises:
        AttributeError: If a selector matches nothing.
        ValueError: If a module's ``layer_groups()`` misses or repeats a parameter, or names one
            that does not exist.
    """
    if explicit is not None:
        return match_layer_groups(root, modules, dict(explicit))
    groups: dict[str, list[str]] = {}
    for prefix, module in select_modules(root, modules).items():
        if callable(getattr(module, "layer_groups", None)):
            local = module.layer_groups()
            _check_partition(module, local, prefix)
        else:
            local = _children_groups(module)
        for group_name, names in local.items():
            groups[_qualify(prefix, group_name)] = [_qualify(prefix, n) for n in names]
    return groups


def _qualify(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _children_groups(module: nn.Module) -> dict[str, list[str]]:
    local: dict[str, list[str]] = {}
    direct = [name for name, _ in module.named_parameters(recurse=False)]
    if direct:
        local["_direct"] = direct
    for child_name, child in module.named_children():
        names = [f"{child_name}.{n}" for n, _ in child.named_parameters()]
        if names:
            local[child_name] = names
    if not local:
        raise ValueError(f"module {type(module).__name__} has no parameters to group")
    return local


def _check_partition(module: nn.Module, groups: dict[str, list[str]], prefix: str) -> None:
    expected = {name for name, _ in module.named_parameters()}
    seen: list[str] = [n for names in groups.values() for n in names]
    unknown = sorted(set(seen) - expected)
    missing = sorted(expected - set(seen))
    repeated = len(seen) != len(set(seen))
    if unknown or missing or repeated:
        raise ValueError(
            f"layer_groups() of {prefix or type(module).__name__!r} must partition its parameters: "
            f"unknown={unknown[:5]}, missing={missing[:5]}, repeated={repeated}"
        )


def layer_parameters(
    root: nn.Module, groups: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, nn.Parameter]]:
    """``{group: {parameter name: parameter}}`` for layer groups given as parameter names in ``root``."""
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
            module (all its parameters) by its path in ``root``, or is a regex matched in full against
            parameter names.

    Raises:
        AttributeError: If a selector matches nothing.
        ValueError: If a group matches no selected parameter, or the groups do not cover every
            selected parameter exactly once.
    """
    selected = list(selected_parameters(root, modules))
    groups: dict[str, list[str]] = {}
    for group_name, patterns in spec.items():
        groups[group_name] = [n for n in selected if any(_matches(pattern, n) for pattern in patterns)]
        if not groups[group_name]:
            raise ValueError(
                f"layer group {group_name!r} matches no parameter of {modules!r}: {list(patterns)}"
            )
    seen = [n for names in groups.values() for n in names]
    missing = sorted(set(selected) - set(seen))
    repeated = sorted(n for n, count in Counter(seen).items() if count > 1)
    if missing or repeated:
        raise ValueError(
            f"`layer_groups` must cover every parameter of {modules!r} exactly once: "
            f"uncovered={missing[:5]}, in several groups={repeated[:5]}"
        )
    return groups


def _matches(pattern: str, name: str) -> bool:
    if name == pattern or name.startswith(pattern + "."):
        return True
    return not _REGEX_CHARS.isdisjoint(pattern) and re.fullmatch(pattern, name) is not None
