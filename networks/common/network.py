"""The engine ↔ network contract: what a network package gives ``tao_cli``, in one typed object.

Each ``networks/<net>/__init__.py`` exports ``NETWORK = Network(...)``; the engine and the CLI read a network
only through it (``tao_cli.registry.load`` checks the type), so a missing part is an error when the network is
registered, not an ``AttributeError`` in the middle of a run.  ``docs/architecture.md`` documents each part.

Trainer traits (DDP's ``find_unused_parameters``, ``sync_batchnorm``, the distributed sampler) are data on the
LightningModule *instance* the network builds (:class:`TrainerTraits` via :class:`HasTrainerTraits`), because
they may depend on the spec (Mask2Former: ``train.activation_checkpoint``).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["Network", "NetworkContractError", "TrainerTraits", "HasTrainerTraits", "trainer_traits_of",
           "refuse_deploy_action", "run_extra_action", "lazy", "check_field_support", "random_init_warning",
           "TAO_DEPLOY_ACTIONS", "LIGHTNING_ACTIONS"]

#: Actions the engine runs through a Lightning Trainer (fit / test / predict).
LIGHTNING_ACTIONS = ("train", "evaluate", "inference")
#: TAO's deployment actions (tao-deploy, not tao-cli): listed in help so TAO users find them, then refused.
TAO_DEPLOY_ACTIONS = {
    "gen_trt_engine": "Build a TensorRT engine (tao-deploy; not part of tao-cli yet).",
    "quantize": "Quantize a model (tao-deploy; not part of tao-cli yet).",
}

Builder = Callable[[Any, Any], Any]  # (cfg, ctx) -> LightningModule | LightningDataModule
ActionFn = Callable[[Any, Any], Mapping[str, Any]]  # (cfg, ctx) -> outputs for status.json


class NetworkContractError(TypeError):
    """A network package does not satisfy the contract (a developer error, raised at registration)."""


@dataclass(frozen=True)
class TrainerTraits:
    """What the Trainer must know about a module: DDP ``find_unused_parameters``, ``sync_batchnorm`` and
    whether Lightning should insert a ``DistributedSampler`` (``use_distributed_sampler``)."""

    find_unused_parameters: bool = False
    sync_batchnorm: bool = False
    use_distributed_sampler: bool = True


@runtime_checkable
class HasTrainerTraits(Protocol):
    """A LightningModule that declares its :class:`TrainerTraits` (an attribute or property)."""

    trainer_traits: TrainerTraits


def trainer_traits_of(module: Any) -> TrainerTraits:
    """The traits ``module`` declares; a module that declares none is a contract error (never a silent default)."""
    traits = getattr(module, "trainer_traits", None)
    if not isinstance(traits, TrainerTraits):
        raise NetworkContractError(f"{type(module).__name__} has no trainer_traits (a TrainerTraits); "
                                   "declare it on the LightningModule the network builds")
    return traits


def _arity_ok(fn: Callable, n: int) -> bool:
    try:
        inspect.signature(fn).bind(*([None] * n))
    except TypeError:
        return False
    except ValueError:  # builtins without a signature: trust them
        return True
    return True


@dataclass(frozen=True)
class Network:
    """One network, as the engine sees it.

    * ``name`` — registry key and checkpoint tag (``tao_model``); ``title`` — human name for messages.
    * ``checkpoint_name`` — prefix of ``<checkpoint_name>_latest.pth`` / ``_best.pth``.
    * ``config_class`` — the ``ExperimentConfig`` dataclass (TAO's sections, fields and defaults).
    * ``actions`` — action → one-line description, in help order.  ``train``/``evaluate``/``inference`` run
      through Lightning with ``build_module``/``build_datamodule``; every other action must be in
      ``extra_actions``.
    * ``check(cfg, action)`` — cross-field checks; raises ``ConfigError``.
    * ``input_paths(cfg, action) -> {dotted.key: path}`` — files that must exist (checked before anything is
      written, also by ``--dry-run``); may raise ``ConfigError`` for resources it resolves (text encoders).
    * ``build_module(cfg, ctx)`` / ``build_datamodule(cfg, ctx)`` — the LightningModule (declaring
      ``trainer_traits``) and LightningDataModule for ``ctx.action``.
    * ``main_kpi(cfg) -> (key in module.kpi, "max" | "min")`` — the metric that picks the best checkpoint.
    * ``extra_actions`` — action → ``fn(cfg, ctx) -> outputs`` for actions that are not a Lightning loop.
    * ``deploy_actions`` — actions TAO lists that belong to tao-deploy: shown in help, refused before anything
      is loaded or written.
    * ``sample_drawer(cfg, datamodule) -> (sample -> PIL image)`` — draws a dataset sample after augmentation
      for ``tao dataset browse``; None where the network has none.
    * ``unsupported`` — dotted field (or whole section) → why tao-cli does not act on it (``networks/<net>/
      unsupported.py``); setting one to a non-default value is a ``ConfigError``.  ``tao_ignored`` — fields TAO
      itself ignores: setting one logs one warning naming it.  Every other schema field is read by the code
      (``tests/tao_cli/test_field_walk.py`` proves it).  Both tables are enforced by ``check``: when either is
      non-empty, ``check`` becomes :func:`check_field_support` followed by the network's own check (so the
      engine's plan and ``--dry-run`` refuse before anything is written); ``check.__wrapped__`` is the latter.
    * ``weight_formats() -> [WeightFormat]`` — the weight layouts the network converts (checkpoints of other
      tools, backbone releases; :mod:`networks.common.weight_formats`), most specific first; a function so that
      the registry stays import-light.  None where the network reads only its own checkpoints.
    * ``weights_prefix`` — where converted weights go in the LightningModule's state dict: ``"model."`` (the
      network's model is ``module.model``, the converters' keys have no prefix) or ``""`` where the module itself
      is the model (MAL: ``student.*`` / ``teacher.*``).  ``tao weights convert`` writes ``weights_prefix + key``.
    * ``pretrained_fields`` — the spec keys that start training from released weights (first = the one to
      suggest); ``random_init_lr`` — ``(lr key, threshold)``: warn only when that learning rate is at most the
      threshold (a fine-tuning rate), or None: warn whenever every pretrained field is unset.  Read by
      :func:`random_init_warning` (dry-run and train log); no pretrained fields = no warning.
    """

    name: str
    title: str
    checkpoint_name: str
    config_class: type
    actions: Mapping[str, str]
    check: Callable[[Any, str], None]
    input_paths: Callable[[Any, str], Mapping[str, Any]]
    build_module: Builder
    build_datamodule: Builder
    main_kpi: Callable[[Any], tuple[str, str]]
    extra_actions: Mapping[str, ActionFn] = field(default_factory=dict)
    deploy_actions: tuple[str, ...] = ()
    sample_drawer: Callable[[Any, Any], Callable[[Any], Any]] | None = None
    unsupported: Mapping[str, str] = field(default_factory=dict)
    tao_ignored: Mapping[str, str] = field(default_factory=dict)
    weight_formats: Callable[[], Sequence[Any]] | None = None
    weights_prefix: str = "model."
    pretrained_fields: tuple[str, ...] = ()
    random_init_lr: tuple[str, float] | None = None

    def __post_init__(self) -> None:
        where = f"network {self.name!r}" if isinstance(self.name, str) and self.name else "a network"
        for part in ("name", "title", "checkpoint_name"):
            if not isinstance(getattr(self, part), str) or not getattr(self, part):
                raise NetworkContractError(f"{where}: {part} must be a non-empty string")
        if not (isinstance(self.config_class, type) and dataclasses.is_dataclass(self.config_class)):
            raise NetworkContractError(f"{where}: config_class must be the ExperimentConfig dataclass")
        if not self.actions or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.actions.items()):
            raise NetworkContractError(f"{where}: actions must map action names to one-line descriptions")
        arities = {"check": 2, "input_paths": 2, "build_module": 2, "build_datamodule": 2, "main_kpi": 1}
        for part, n in arities.items():
            fn = getattr(self, part)
            if not callable(fn) or not _arity_ok(fn, n):
                raise NetworkContractError(f"{where}: {part} must be a function of {n} argument(s)")
        for action, fn in self.extra_actions.items():
            if action in LIGHTNING_ACTIONS:
                raise NetworkContractError(f"{where}: {action!r} is run by the engine, not an extra action")
            if action not in self.actions or not callable(fn) or not _arity_ok(fn, 2):
                raise NetworkContractError(f"{where}: extra action {action!r} must be listed in actions and be "
                                           "a function (cfg, ctx)")
        for action in self.deploy_actions:
            if action not in self.actions or action in self.extra_actions or action in LIGHTNING_ACTIONS:
                raise NetworkContractError(f"{where}: deploy action {action!r} must be listed in actions only")
        missing = [a for a in self.actions
                   if a not in LIGHTNING_ACTIONS and a not in self.extra_actions and a not in self.deploy_actions]
        if missing:
            raise NetworkContractError(f"{where}: actions {missing} have no function in extra_actions")
        if self.sample_drawer is not None and (not callable(self.sample_drawer) or not _arity_ok(self.sample_drawer, 2)):
            raise NetworkContractError(f"{where}: sample_drawer must be a function (cfg, datamodule)")
        if self.weight_formats is not None and (not callable(self.weight_formats) or not _arity_ok(self.weight_formats, 0)):
            raise NetworkContractError(f"{where}: weight_formats must be a function () -> [WeightFormat]")
        for table in ("unsupported", "tao_ignored"):
            for key, reason in getattr(self, table).items():
                if not (isinstance(reason, str) and reason.strip()):
                    raise NetworkContractError(f"{where}: {table}[{key!r}] needs a reason")
                if not _schema_has(self.config_class, key):
                    raise NetworkContractError(f"{where}: {table} names {key!r}, which is not a spec field")
        for key in self.pretrained_fields + ((self.random_init_lr[0],) if self.random_init_lr else ()):
            if not _schema_has(self.config_class, key):
                raise NetworkContractError(f"{where}: pretrained_fields/random_init_lr name {key!r}, which is not "
                                           "a spec field")
        both = set(self.unsupported) & set(self.tao_ignored)
        if both:
            raise NetworkContractError(f"{where}: {sorted(both)} are both unsupported and TAO-ignored")
        if (self.unsupported or self.tao_ignored) and not getattr(self.check, "field_support", False):
            own = self.check

            def check(cfg: Any, action: str) -> None:
                check_field_support(self, cfg, action)
                own(cfg, action)

            check.__wrapped__ = own  # type: ignore[attr-defined]
            check.field_support = True  # type: ignore[attr-defined]  # dataclasses.replace must not wrap twice
            check.__doc__ = "Unsupported / TAO-ignored fields first (check_field_support), then the network's check."
            object.__setattr__(self, "check", check)


def _schema_has(cls: type, key: str) -> bool:
    """Whether the dotted ``key`` is a field (or section) of the spec dataclass ``cls``."""
    import typing

    for part in key.split("."):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return False
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            return False
        tp = typing.get_type_hints(cls)[part]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        cls = args[0] if len(args) == 1 and typing.get_origin(tp) is not list else tp
    return True


@functools.lru_cache(maxsize=16)
def _defaults(config_class: type) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.structured(config_class)


def _plain_value(conf: Any, key: str) -> Any:
    """The resolved value at ``key`` as plain Python (``"???"`` when unset, ``None`` when absent)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(conf, parent, throw_on_missing=False) if parent else conf
    if not isinstance(node, DictConfig) or leaf not in node:
        return None
    if OmegaConf.is_missing(node, leaf):
        return "???"
    value = node[leaf]
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True, throw_on_missing=False, enum_to_str=True)
    return value


def _applies(net: Network, key: str, action: str) -> bool:
    """A field in another action's section (``evaluate.*`` while training, ``gen_trt_engine.*``) does not concern
    ``action``: one TAO spec file may hold every section.  Fields outside action sections always apply."""
    top = key.split(".")[0]
    return top == action or (top not in net.actions and top not in TAO_DEPLOY_ACTIONS
                             and top not in LIGHTNING_ACTIONS and top != "export")


def check_field_support(net: Network, cfg: Any, action: str) -> None:
    """Refuse a non-default value of a field in ``net.unsupported`` (one-line ``ConfigError`` naming the field
    and the reason); log one warning per non-default field in ``net.tao_ignored``.  Only the fields that concern
    ``action`` are looked at (see :func:`_applies`)."""
    from networks.common.errors import ConfigError

    defaults = _defaults(net.config_class)
    for key, reason in net.unsupported.items():
        if _applies(net, key, action) and _plain_value(cfg, key) != _plain_value(defaults, key):
            raise ConfigError(key, f"is not supported by tao-cli ({reason})",
                              "remove it from the spec or set it back to its default")
    ignored = [key for key, _ in net.tao_ignored.items()
               if _applies(net, key, action) and _plain_value(cfg, key) != _plain_value(defaults, key)]
    for key in ignored:
        logging.getLogger("tao").warning("%s is set but has no effect (%s)", key, net.tao_ignored[key])


def random_init_warning(net: Network, cfg: Any, *, resuming: bool = False) -> str | None:
    """One line when ``train`` would start from random weights (every ``net.pretrained_fields`` unset, not
    resuming) — with a fine-tuning learning rate where ``net.random_init_lr`` sets a threshold — naming the key to
    set; else None."""
    if resuming or not net.pretrained_fields:
        return None
    if any(_plain_value(cfg, key) not in (None, "", "???") for key in net.pretrained_fields):
        return None
    fields = " or ".join(net.pretrained_fields)
    if net.random_init_lr is None:
        return f"training from random weights; set {fields} to start from a backbone release, see docs/weights.md"
    lr_key, threshold = net.random_init_lr
    lr = _plain_value(cfg, lr_key)
    if not isinstance(lr, (int, float)) or float(lr) > float(threshold):
        return None
    return (f"training from random weights with {lr_key}={lr:g}, a fine-tuning learning rate; set {fields} to "
            "start from released weights, see docs/weights.md")


def refuse_deploy_action(net: Network, action: str) -> None:
    """Raise the one-line ``ConfigError`` for an action TAO lists that belongs to tao-deploy (else nothing)."""
    if action in net.deploy_actions:
        from networks.common.errors import ConfigError

        raise ConfigError(action, "is not part of tao-cli yet",
                          f"use tao-deploy (`{net.name} {action}`) with the ONNX file from `export`")


def run_extra_action(net: Network, action: str, cfg: Any, ctx: Any) -> Mapping[str, Any]:
    """Run a non-Lightning action of ``net``; an action it does not have is a ``ConfigError``."""
    from networks.common.errors import ConfigError

    refuse_deploy_action(net, action)
    if action not in net.extra_actions:
        raise ConfigError("action", f"{net.name} has no action {action!r}", f"choose from {', '.join(net.actions)}")
    return net.extra_actions[action](cfg, ctx) or {}


def lazy(target: str) -> Callable[..., Any]:
    """A part (builder, extra action, sample drawer, ``weight_formats``) that imports ``"package.module:name"``
    when it is first called and calls it with the same arguments — so ``import networks.<net>`` (and
    ``tao --help``) never loads torch models."""
    module_path, _, name = target.partition(":")

    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(module_path), name)(*args)

    call.__name__ = call.__qualname__ = f"lazy({target})"
    call.__doc__ = f"Import and call ``{target}``."
    return call
