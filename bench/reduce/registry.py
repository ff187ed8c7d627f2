"""The method registry: built-in and third-party methods, both found through one entry-point group.

A method is a `Method` subclass named in the `tokenbench.methods` entry-point group (tokenbench's own
`pyproject.toml` lists the built-ins exactly as a plugin package lists its own). Its `knobs` say what the
sweep varies, with default sweep values, the no-op value that must reproduce the dense model and the
valid range; `build` turns a backbone into the model the harness measures. Knob values are checked here,
once, for the command line and the Python API alike, with the same messages.

This module imports no torch, so that listing methods and parsing arguments start fast.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.resources
import importlib.util
import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tokenbench.errors import BenchError
from tokenbench.reduce.knobs import Knob, keep_rate_knob

if TYPE_CHECKING:
    import torch.nn as nn

ENTRY_POINT_GROUP = "tokenbench.methods"
FAMILIES = ("none", "prune", "merge", "early-exit", "resolution")

# Options of the harness's commands. A knob becomes an option of `bench`, `profile`, `visualize` and
# `train` under its own name, so it may not take one of these (tests/test_cli.py keeps the list complete).
HARNESS_OPTIONS = frozenset({
    "action", "array_parallelism", "backbone", "baseline", "batch_size", "batch_sizes", "budget", "budgets",
    "cache_dir", "cell", "checkpoint", "checkpoints", "cifar10_root", "cluster", "command", "compile", "count",
    "cpus_per_task", "data_root", "dataset", "device", "dtype", "epochs", "gpus_per_node", "help", "image", "images",
    "init", "jobs", "lr", "method", "methods", "model", "name", "no_timing", "nodes", "out", "pairs", "part", "path", "plot",
    "pretrained", "probe", "protocol", "quick", "recalibrate", "recipe", "repeats", "results", "resume", "reuse",
    "rounds", "run", "seed", "shard", "slurm_account", "slurm_partition", "snapshot", "split", "strict", "submitit",
    "submitit_folder", "threads", "timeout_min", "title", "tolerance", "update", "warmup", "warmup_epochs", "what", "workers",
    "write_shipped",
})


def checking_model(hook):
    """`hook(self, model, ...)` that runs `self.check_model(model)` first."""
    @functools.wraps(hook)
    def checked(self, model, *args, **kwargs):
        self.check_model(model)
        return hook(self, model, *args, **kwargs)

    checked.checks_model = True
    return checked


class Method:
    """Base class of a token-reduction method plugin."""

    name: ClassVar[str]
    family: ClassVar[str]
    knobs: ClassVar[tuple[Knob, ...]] = ()
    needs_training: ClassVar[bool] = False
    # build() takes calibration=(images, labels) of a held-out split, or calibrated=calibrate(...)'s result:
    needs_calibration: ClassVar[bool] = False
    calibration_version: ClassVar[int] = 1  # raise it when `calibrate` changes: stored calibrations are redone
    training_optimizer: ClassVar[str] = "adamw"  # or "sgd" (plain, no momentum) for `tokenbench train --method`
    batch_invariant: ClassVar[bool] = True  # an image's result does not depend on the other images in its batch
    summary: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        """A subclass's own `build`, `attach` and `training_loss` check the model first (`check_model`),
        wherever they are called from, so an unsupported backbone gets the one-line reason before the method
        reads anything of it."""
        super().__init_subclass__(**kwargs)
        for hook in ("build", "attach", "training_loss"):
            own = cls.__dict__.get(hook)
            if own is not None and not getattr(own, "checks_model", False):
                setattr(cls, hook, checking_model(own))

    def check_model(self, model: nn.Module) -> None:
        """Raise a one-line BenchError, with the reason, if this method cannot run on `model`. The default
        (every block-level method): a timm ViT whose tokens can be reduced."""
        from tokenbench.reduce.vit import check_vit

        check_vit(model)

    def build(self, model: nn.Module, **knobs: Any) -> nn.Module:
        """Return the model to measure: `model` with this method applied at the given knob values."""
        raise NotImplementedError

    def calibrate(self, model: nn.Module, calibration, **knobs: Any) -> dict:
        """What a `needs_calibration` method chooses on held-out `calibration` = (images, labels) at `knobs`
        (DVT's exit thresholds, DiffRate's rates), as plain data: `build(..., calibrated=that)` uses it as is,
        and `tokenbench calibrate` prints it."""
        raise NotImplementedError(f"{self.name} does not calibrate")

    def checkpoint_for(self, model_name: str, dataset: str):
        """Trained weights shipped for this method on (model, dataset), or None. Only for `needs_training`.

        They ship as `weights/<method>_<backbone>.pt`, the backbone named without `vit_` (`dvt_cifar10_v2.pt`
        for `vit_cifar10_v2`), and serve only the dataset that backbone was trained on: its name's first word."""
        backbone = model_name.removeprefix("vit_")
        if not self.needs_training or backbone.split("_")[0] != dataset:
            return None
        path = self.weights_file(f"{self.name}_{backbone}.pt")
        return path if path.exists() else None

    @classmethod
    def weights_file(cls, name: str) -> Path:
        """A file in the `weights/` folder of the method's package (where a trained method ships its weights)."""
        return Path(str(importlib.resources.files(cls.__module__) / "weights" / name))

    # A method trained with a model of its own (DVT's cascade) adds what that needs to `tokenbench train`.
    @classmethod
    def add_training_options(cls, group) -> None:
        """Add this method's options of `tokenbench train` to `group` (an argparse argument group)."""

    def training_model_kwargs(self, options: dict) -> dict:
        """Keyword arguments of the model built from scratch to train with this method, from its options."""
        return {}

    def prepare_training_model(self, model: nn.Module, options: dict, load_model) -> None:
        """Initialise a model built from scratch before training; `load_model(checkpoint)` loads another model."""

    def training_record(self, model: nn.Module, loader) -> dict:
        """What the trained checkpoint records beyond its test top-1 (DVT: every exit's test top-1)."""
        return {}

    def with_fresh_parts(self, model: nn.Module) -> nn.Module:
        """`model`, or for a method that trains parts of its own (DynamicViT's predictors) a copy given fresh,
        seeded ones by `training_loss`, so that its compute runs without trained weights."""
        if not self.needs_training:
            return model
        import copy

        model = copy.deepcopy(model)
        self.training_loss(model)
        return model

    def attach(self, model: nn.Module) -> nn.Module:
        """Add the method's learned modules to `model` (DynamicViT's predictors), so its checkpoints load."""
        return model

    def training_loss(self, model: nn.Module, **knobs: Any):
        """(module to train, loss_fn(module, images, labels, label_smoothing) or None for cross-entropy).

        The default fine-tunes the backbone with the method in place at `knobs`; the module shares its weights.
        """
        return self.build(model, **knobs), None

    @classmethod
    def noop_knobs(cls) -> dict[str, Any]:
        return {k.name: k.noop for k in cls.knobs}

    @classmethod
    def own_knobs(cls, names) -> dict[str, Knob]:
        """This method's knobs by name, or a BenchError for a name in `names` it does not have."""
        own = {k.name: k for k in cls.knobs}
        for name in names:
            if name not in own:
                raise BenchError(f"{cls.name} has no knob {name!r} (its knobs: {', '.join(own) or 'none'})")
        return own

    @classmethod
    def check_knobs(cls, given: dict[str, Any], default: str = "noop") -> dict[str, Any]:
        """Every knob's value, checked: those `given`, the others at their no-op (or first sweep) value."""
        cls.own_knobs(given)
        return {k.name: k.validate(given[k.name], cls.name) if k.name in given
                else (k.noop if default == "noop" else k.sweep[0]) for k in cls.knobs}

    @classmethod
    def parse_knobs(cls, texts: dict[str, str]) -> dict[str, Any]:
        """{knob name: value} from command-line texts, each checked by this method's own knob."""
        own = cls.own_knobs(texts)
        return {name: own[name].parse(text, cls.name) for name, text in texts.items()}

    @classmethod
    def sweep_points(cls, overrides: dict[str, tuple] | None = None) -> list[dict[str, Any]]:
        """The knob settings of a sweep: the main (first) knob over its values; every other knob at its first
        sweep value unless given, and then over every value given (`--cost 0.2,0.3 --criterion confidence,random`
        is four settings)."""
        overrides = overrides or {}
        if not cls.knobs:
            return [{}]
        main, *rest = cls.knobs
        values = overrides.get(main.name, main.sweep)
        others = [overrides[k.name] if k.name in overrides else k.sweep[:1] for k in rest]
        return [{main.name: v, **dict(zip((k.name for k in rest), combo))}
                for combo in itertools.product(*others) for v in values]


_REGISTRY: dict[str, type[Method]] = {}


def check_declaration(cls: type[Method]) -> None:
    """A known family, and knob names that are identifiers and shadow no harness option."""
    where = f"{cls.__module__}.{cls.__qualname__}"
    if getattr(cls, "family", None) not in FAMILIES:
        raise BenchError(f"{where}.family must be one of {FAMILIES}, not {getattr(cls, 'family', None)!r}")
    for knob in cls.knobs:
        if not knob.name.isidentifier() or knob.name in HARNESS_OPTIONS:
            raise BenchError(f"{where}: knob {knob.name!r} would shadow the harness option {knob.flag}; rename it")


def register_method(cls: type[Method]) -> type[Method]:
    """Add a Method subclass to the registry under `cls.name` (entry points do this for installed packages)."""
    check_declaration(cls)
    where = f"{cls.__module__}.{cls.__qualname__}"
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls and (existing.__module__, existing.__qualname__) != (
            cls.__module__, cls.__qualname__):
        raise BenchError(f"{where}: method name {cls.name!r} is taken by "
                         f"{existing.__module__}.{existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


DECLARED = ("name", "family", "knobs", "summary", "needs_training", "needs_calibration", "batch_invariant")
_DECLARED: dict[str, type[Method]] | None = None  # stand-ins read from the methods' source, by method name
_ENTRY_POINTS: dict[str, importlib.metadata.EntryPoint] = {}  # by method name


def _load(ep: importlib.metadata.EntryPoint) -> type[Method]:
    """Import one method plugin and register its class (a broken plugin is named, not a traceback)."""
    try:
        obj = ep.load()
    except Exception as err:
        raise BenchError(f"method plugin {ep.name!r} ({ep.value}) failed to import: {err}") from None
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise BenchError(f"method plugin {ep.name!r} ({ep.value}) is not a tokenbench Method subclass")
    return register_method(obj)


def _declaration(ep: importlib.metadata.EntryPoint) -> type[Method] | None:
    """A stand-in of the method's class with its declared metadata (name, family, knobs, ...), read from its
    source without running it, so that listing methods and parsing options import no torch. None when the
    class does not declare them literally (built on module constants that are not literals, inherited from
    another method): the caller imports it instead."""
    module, _, qualname = ep.value.partition(":")
    try:
        origin = importlib.util.find_spec(module).origin
        tree = ast.parse(Path(origin).read_text())
    except Exception:
        return None
    scope = {"Knob": Knob, "keep_rate_knob": keep_rate_knob, "math": math, "int": int, "float": float, "str": str,
             "bool": bool}
    for node in tree.body:  # module constants that are plain literals (LINKAGES, CRITERIA)
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                scope[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == qualname), None)
    if node is None or [ast.unparse(b) for b in node.bases] != ["Method"]:
        return None
    attrs = {"__module__": module, "__qualname__": qualname,
             "declared_functions": frozenset(f.name for f in node.body if isinstance(f, ast.FunctionDef))}
    for item in node.body:
        targets = item.targets if isinstance(item, ast.Assign) else [getattr(item, "target", None)]
        name = targets[0].id if len(targets) == 1 and isinstance(targets[0], ast.Name) else None
        if name in DECLARED and getattr(item, "value", None) is not None:
            try:
                attrs[name] = eval(compile(ast.Expression(item.value), origin, "eval"), {"__builtins__": {}}, scope)
            except Exception:
                return None
    if "name" not in attrs or "family" not in attrs:
        return None
    return type(qualname, (Method,), attrs)


def declared_methods() -> dict[str, type[Method]]:
    """Every method's declared metadata, without importing the methods that declare it literally (all the
    built-ins): what `tokenbench methods` lists and what option parsing checks. Classes already imported
    (or registered in this session) are returned as themselves."""
    global _DECLARED
    if _DECLARED is None:
        declared = {}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            cls = _declaration(ep) or _load(ep)
            check_declaration(cls)
            declared[cls.name] = cls
            _ENTRY_POINTS[cls.name] = ep
        if "none" not in declared:
            raise BenchError("no built-in methods found: tokenbench is not installed "
                             "(pip install -e . in its checkout)")
        _DECLARED = declared
    return dict(sorted({**_DECLARED, **_REGISTRY}.items()))


def method_class(name: str) -> type[Method]:
    """The method's class, importing its module (and no other method's) if need be."""
    methods = declared_methods()
    if name not in methods:
        raise BenchError(f"unknown method {name!r}; known methods: {', '.join(methods)}")
    if name not in _REGISTRY:
        _load(_ENTRY_POINTS[name])
    return _REGISTRY[name]


def all_methods() -> dict[str, type[Method]]:
    """Every registered method's class, imported."""
    return {name: method_class(name) for name in declared_methods()}


def get_method(name: str) -> Method:
    return method_class(name)()


def resolve_methods(spec: str) -> list[str]:
    """`all` or a comma-separated list of method names, validated, duplicates dropped."""
    known = declared_methods()
    if spec.strip() == "all":
        return list(known)
    names = list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    if not names:
        raise BenchError(f"no method named in {spec!r}; known methods: {', '.join(known)}")
    for name in names:
        if name not in known:
            raise BenchError(f"unknown method {name!r}; known methods: {', '.join(known)}")
    return names


def knob_owners() -> dict[str, list[tuple[str, Knob]]]:
    """{knob name: [(method, its Knob), ...]} over every registered method, in method order."""
    out: dict[str, list] = {}
    for name, cls in declared_methods().items():
        for knob in cls.knobs:
            out.setdefault(knob.name, []).append((name, knob))
    return out


def knob_by_name() -> dict[str, Knob]:
    """Every knob name used by a registered method, with its first definition."""
    return {name: owners[0][1] for name, owners in knob_owners().items()}


def knob_overrides(methods: list[str], given: dict) -> dict[str, tuple]:
    """Sweep values ({knob name: 'v,v' or a list}), checked by each of `methods` that has the knob.

    A knob none of `methods` has is an error, so a typo never silently runs the default sweep.
    """
    out = {}
    for name, text in given.items():
        owners = [m for m in methods if any(k.name == name for k in declared_methods()[m].knobs)]
        if not owners:
            raise BenchError(f"{name!r} is not a knob of {', '.join(methods)}")
        for owner in owners:
            knob = next(k for k in declared_methods()[owner].knobs if k.name == name)
            out[name] = knob.parse_values(text, owner)
    return out
