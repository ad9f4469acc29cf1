"""The keys of a model config, read from its family class's constructor without importing the family (which
would import torch and diffusers): the module source is parsed with `ast`, and the `__init__` parameters, their
annotations and defaults become the keys, their types and rules. A constructor taking `**kwargs` passes them on
to its base class, whose keys are read the same way, down to `DiffusionModule.__init__`.

So a family declares each key once, in its constructor: `Literal[...]` gives the choices, `Annotated[..., ModelPath(...)]`
or `Annotated[..., Choices(...)]` (src/config/keys.py) the path checks and the words of the messages. The trainer
group's keys are read the same way from Lightning's `Trainer.__init__`."""
import ast
import dataclasses
import importlib.util
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.machinery import PathFinder
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

from . import keys as markers
from .errors import ConfigError

# Constructor arguments the trainer passes itself, never the config.
SUPPLIED_BY_TRAINER = ("adapter", "optimizer", "scheduler", "eval_names", "seed")
# The names an annotation may use: typing's, the builtin types and the markers of keys.py.
ANNOTATION_NAMES = {**{name: getattr(typing, name) for name in typing.__all__},
                    **{t.__name__: t for t in (bool, int, float, str, list, dict, tuple, Path)},
                    **{name: getattr(markers, name) for name in ("ModelPath", "Choices")}}
# What an OmegaConf structured config can hold; other annotations are stored (and checked) as Any.
STORABLE = (bool, int, float, str, Path)


@dataclass(frozen=True)
class Key:
    name: str
    annotation: Any = Any  # as written, with Annotated markers
    default: Any = "???"  # OmegaConf's "missing": the key is required


@dataclass(frozen=True)
class ClassSource:
    module: str
    node: ast.ClassDef


def model_keys(target: Optional[str]) -> dict[str, Key]:
    """The config keys of the family class `target` ("package.module.Class"), base class keys first."""
    if not target:
        raise ConfigError("model._target_ is not set. Name the family class, e.g. difftrain.modules.flux.FluxModule.")
    return constructor_keys(target, "model._target_", SUPPLIED_BY_TRAINER)


def constructor_keys(target: str, key: str, supplied: tuple[str, ...]) -> dict[str, Key]:
    """The keyword parameters of class `target`'s constructor but the `supplied` ones; `key` names the config key
    that holds `target` in errors."""
    module, _, name = target.rpartition(".")
    cls = _find_class(module, name) if module else None
    if cls is None:
        reason = f"{module} has no class {name}" if _source_path(module) else f"no module {module or name} found"
        raise ConfigError(f"{key}={target} is not a class: {reason}. Check the spelling.")
    found: dict[str, Key] = {}
    for source in reversed(_constructor_chain(cls, target)):
        for parameter in source.parameters:
            if parameter.arg not in supplied:
                found[parameter.arg] = source.key(parameter, found.get(parameter.arg))
    return found


def keys_schema(keys: dict[str, Key]) -> type:
    """The OmegaConf structured dataclass of these keys (types and defaults; choices and paths are checked apart)."""
    fields = [("_target_", str, field(default="???"))]
    fields += [(key.name, storage_type(key.annotation), _field(key.default)) for key in keys.values()]
    return dataclasses.make_dataclass("KeysConfig", fields)


def storage_type(annotation: Any) -> Any:
    """The type OmegaConf stores: markers dropped, a Literal as the type(s) of its values, `X | Y` as Union."""
    annotation = plain(annotation)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return _union(tuple(type(v) for v in args))
    if origin in (Union, UnionType):
        return _union(tuple(storage_type(a) for a in args))
    if origin in (list, tuple):
        return list[storage_type(args[0]) if args else Any]
    if origin is dict:
        return dict[str, storage_type(args[1]) if args else Any]
    return annotation if annotation in STORABLE or annotation is type(None) else Any


def plain(annotation: Any) -> Any:
    """The annotation without its Annotated markers."""
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def marker(annotation: Any, kind: type) -> Any:
    """The `kind` marker (ModelPath, Choices) of an Annotated annotation, or None."""
    metadata = annotation.__metadata__ if get_origin(annotation) is Annotated else ()
    return next((m for m in metadata if isinstance(m, kind)), None)


def choices(annotation: Any) -> Optional[tuple]:
    """The values of a Literal (also inside Optional), or None when the key is not a choice."""
    annotation = plain(annotation)
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    literals = [a for a in get_args(annotation) if get_origin(a) is Literal]
    return get_args(literals[0]) if get_origin(annotation) in (Union, UnionType) and literals else None


def _union(types: tuple) -> Any:
    distinct = tuple(dict.fromkeys(types))  # in order, so Literal[False, True, "offload"] is Union[bool, str]
    if len(distinct) == 1:
        return distinct[0]
    # OmegaConf unions hold plain values only: a union with a list (devices: list[int] | str | int) is stored as Any.
    return Union[distinct] if all(t in STORABLE or t is type(None) for t in distinct) else Any


def _field(default: Any) -> Any:
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: list(default) if isinstance(default, tuple) else default.copy())
    return field(default=default)


class _Parameters:
    """The keyword parameters of one `__init__` (self, *args and **kwargs left out), read from its AST."""

    def __init__(self, cls: ClassSource, init: ast.FunctionDef):
        self.cls = cls
        args = init.args
        positional = (args.posonlyargs + args.args)[1:]
        self.defaults = dict(zip((p.arg for p in reversed(positional)), reversed(args.defaults)))
        self.defaults.update((p.arg, d) for p, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None)
        self.parameters = positional + args.kwonlyargs

    def key(self, parameter: ast.arg, base: Optional[Key]) -> Key:
        """A subclass's parameter replaces the base's default; its annotation too, unless it has none (then the
        base's type and rules stay: `timestep_sample_method="uniform"`)."""
        annotation = self.annotation(parameter)
        if annotation is None:
            annotation = base.annotation if base else Any
        return Key(parameter.arg, annotation, self.default(parameter))

    def annotation(self, parameter: ast.arg) -> Any:
        if parameter.annotation is None:
            return None
        try:
            value = eval(compile(ast.Expression(parameter.annotation), "<annotation>", "eval"),
                         {"__builtins__": {}}, ANNOTATION_NAMES)
            return eval(value, {"__builtins__": {}}, ANNOTATION_NAMES) if isinstance(value, str) else value
        except (NameError, AttributeError, TypeError):
            return Any  # a type validation cannot name (torch.dtype, ...): not checked before loading

    def default(self, parameter: ast.arg) -> Any:
        node = self.defaults.get(parameter.arg)
        if node is None:
            return "???"
        try:
            return ast.literal_eval(node)
        except ValueError:
            raise ConfigError(f"{self.cls.module}.{self.cls.node.name}: the default of {parameter.arg} must be a "
                              f"literal (a number, string, bool, None, list...) so that validation can read it "
                              f"without importing the model.") from None


def _constructor_chain(cls: ClassSource, target: str) -> list[_Parameters]:
    """The constructors' parameters from `cls` down its base classes, as far as `**kwargs` is passed on."""
    chain = []
    while True:
        init = next((n for n in cls.node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is not None:
            chain.append(_Parameters(cls, init))
            if init.args.kwarg is None:
                return chain
        base = next(filter(None, (_resolve(cls.module, b) for b in cls.node.bases)), None)
        if base is None:
            raise ConfigError(f"model._target_={target}: the keys of {cls.node.name} cannot be read: its "
                              f"constructor passes **kwargs to a base class whose source is not found.")
        cls = base


def _resolve(module: str, expression: ast.expr) -> Optional[ClassSource]:
    """The class a base-class expression of `module` names: `Base` defined there or imported, or `module.Base`."""
    if isinstance(expression, ast.Name):
        return _find_class(module, expression.id)
    if isinstance(expression, ast.Attribute) and isinstance(expression.value, ast.Name):
        imported = _imports(module).get(expression.value.id)
        return _find_class(".".join(filter(None, imported)), expression.attr) if imported else None
    return None


def _find_class(module: str, name: str) -> Optional[ClassSource]:
    tree = _parse(module)
    if tree is None:
        return None
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    if node is not None:
        return ClassSource(module, node)
    imported = _imports(module).get(name)
    return _find_class(*imported) if imported and imported[1] else None


@lru_cache(maxsize=None)
def _imports(module: str) -> dict[str, tuple[str, str]]:
    """Local name -> (module, name) of the module's top-level imports; (module, "") for `import a.b as c`."""
    tree, package = _parse(module), _package(module)
    names = {}
    for node in tree.body if tree else ():
        if isinstance(node, ast.ImportFrom):
            source = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            names.update((a.asname or a.name, (source, a.name)) for a in node.names)
        elif isinstance(node, ast.Import):
            names.update((a.asname, (a.name, "")) for a in node.names if a.asname)
    return names


@lru_cache(maxsize=None)
def _parse(module: str) -> Optional[ast.Module]:
    path = _source_path(module)
    return ast.parse(Path(path).read_text(), path) if path else None


def _source_path(module: str) -> Optional[str]:
    """The module's source file, found without importing it or its packages (lightning's would be heavy)."""
    top, *parts = module.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    for part in parts:
        spec = PathFinder.find_spec(f"{spec.name}.{part}", spec.submodule_search_locations) \
            if spec and spec.submodule_search_locations else None
    origin = spec.origin if spec else None
    return origin if origin and origin.endswith(".py") else None


def _package(module: str) -> str:
    path = _source_path(module) or ""
    return module if path.endswith("__init__.py") else module.rpartition(".")[0]
