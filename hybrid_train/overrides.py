"""Command-line overrides against the typed config: known keys, the closest real key to a misspelt one,
and the settings a command line gives that replace the config files' values of the ones they exclude.

Plain functions of a dataclass schema (hybrid_train.config.JobConfig in practice) and override strings
as Hydra parses them, so train.py and load_config check a command line the same way, before Hydra
composes it.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import sys
import typing
from pathlib import Path
from typing import Iterable

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType, ValueType
from omegaconf import DictConfig, OmegaConf

# Settings of which a run takes one: a value given on the command line replaces the file's value of the
# others (`train.max_steps=6` runs 6 steps although conf/config.yaml sets train.max_tokens). Two given
# on the command line are still refused, by JobConfig.validate.
EXCLUSIVE = (
    ("train.max_tokens", "train.max_steps", "stage.end_tokens"),
    ("schedule.warmup_steps", "schedule.warmup_tokens", "schedule.warmup_fraction"),
)
ANY_NAME = "*"  # a Dict[str, dataclass] field: any key, e.g. data.sources.NAME


class UnknownKeyError(ValueError):
    """A config key no dataclass declares; the message names the closest real key."""


def parse(overrides: list[str]) -> list[Override]:
    return OverridesParser.create().parse_overrides(list(overrides))


def config_keys(schema: type, prefix: str = "", sections: bool = True) -> list[str]:
    """Every dotted key of a dataclass schema: its fields, and (with `sections`) the sections holding them;
    a dict of dataclasses (data.sources) is a field, and its entries' fields are keyed with NAME as '*'."""
    keys = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key, kind = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(kind):
            keys += [key] * sections + config_keys(kind, key + ".", sections)
        elif typing.get_origin(kind) is dict and dataclasses.is_dataclass(typing.get_args(kind)[1]):
            keys += [key] + config_keys(typing.get_args(kind)[1], f"{key}.{ANY_NAME}.", sections)
        else:
            keys.append(key)
    return keys


def _walk(key: str, schema: type) -> tuple[type | None, str, str, object]:
    """Walk `key` through the schema: (None, '', '', the last field's type) when every part is declared
    (the type is None when the key runs past a field that is no section, a list or a plain dict: not
    ours to judge), else (the dataclass lacking a part, its key in the config, the missing part, None)."""
    node, path, parts, kind = schema, "", key.split("."), None
    i = 0
    while i < len(parts):
        if node is None:
            return None, "", "", None
        hints = typing.get_type_hints(node)
        if parts[i] not in hints:
            return node, path, parts[i], None
        kind = hints[parts[i]]
        path = f"{path}.{parts[i]}".lstrip(".")
        if dataclasses.is_dataclass(kind):
            node = kind
        elif typing.get_origin(kind) is dict and dataclasses.is_dataclass(typing.get_args(kind)[1]):
            node = typing.get_args(kind)[1]
            if i + 1 < len(parts):  # the next part is a name of the user's (data.sources.web)
                i += 1
                path = f"{path}.{parts[i]}"
        else:
            node = None
        i += 1
    return None, "", "", kind


def _resolve(key: str, schema: type) -> tuple[type | None, str, str]:
    """(None, '', '') when `key` is declared (see _walk), else (the dataclass lacking a part, its key in
    the config, the missing part)."""
    return _walk(key, schema)[:3]


def field_type(key: str, schema: type) -> object:
    """The declared type of a dotted key's field (Optional unwrapped); None for an unknown key."""
    kind = _walk(key, schema)[3]
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def whole_numbers(overrides: list[str], schema: type) -> list[str]:
    """The overrides with a whole number written as a float (`train.max_tokens=1e9`, `2.5e12`) turned into
    the integer an int field takes (OmegaConf refuses the float); a fraction for an int field is an error
    naming the key."""
    out = []
    for text, override in zip(overrides, parse(overrides)):
        if (override.type != OverrideType.DEL and override.value_type == ValueType.ELEMENT
                and isinstance(override.value(), float) and field_type(override.key_or_group, schema) is int):
            value = override.value()
            if not value.is_integer():
                raise ValueError(f"{override.key_or_group}={text.split('=', 1)[1]} must be a whole number")
            text = f"{text.split('=', 1)[0]}={int(value)}"
        out.append(text)
    return out


def is_known(key: str, schema: type) -> bool:
    return _resolve(key, schema)[0] is None


def closest_keys(key: str, schema: type) -> list[str]:
    """The real keys nearest to `key` (best first, at most two): the same field name anywhere in the
    config, else the most similar key, preferring the section the user named."""
    parts = key.split(".")
    candidates = []
    for known in config_keys(schema, sections=False):
        kparts = known.split(".")
        # show a dict field under the name the user gave (data.sources.web.weight, not data.sources.*)
        kparts = [parts[i] if p == ANY_NAME and i < len(parts) else p for i, p in enumerate(kparts)]
        candidates.append(".".join(kparts).replace(ANY_NAME, "NAME"))
    leaf = parts[-1]
    scored = []
    for cand in candidates:
        cparts = cand.split(".")
        if cand == key:
            continue
        if cparts[-1] == leaf:
            score = 2.0
        else:  # the field name alone is noisy for short names; the whole key alone misses moved fields
            score = (difflib.SequenceMatcher(None, leaf, cparts[-1]).ratio()
                     + difflib.SequenceMatcher(None, key.replace(".", "_"), cand.replace(".", "_")).ratio()) / 2
        if cparts[0] == parts[0] and len(parts) > 1:
            score += 0.1
        scored.append((score, cand))
    scored.sort(key=lambda s: -s[0])
    return [c for s, c in scored if s >= 0.6 and s >= scored[0][0] - 0.03][:2]


def unknown_key_message(key: str, schema: type) -> str:
    owner, where, missing = _resolve(key, schema)
    owner = owner or schema
    source = Path(inspect.getsourcefile(owner)).resolve()
    root = Path(inspect.getsourcefile(schema)).resolve().parents[1]  # the folder holding the package
    if source.is_relative_to(root):
        source = source.relative_to(root)
    message = (f"unknown config key {key!r}: {where or 'the top level'} ({owner.__name__}, {source.as_posix()}) "
               f"has no field {missing!r}")
    near = closest_keys(key, schema)
    if near:
        message += "; did you mean " + " or ".join(near) + "?"
    return message


def check_keys(overrides: list[str], schema: type, groups: Iterable[str] = ()) -> None:
    """Refuse an override of a key the schema lacks (with or without `+`), naming the closest real key.
    Group choices (`model=bamba_9b`, `+stage=extend`) are config keys too; Hydra's own settings and the
    config folders' other groups (`+experiment=NAME` for a conf/experiment/) pass."""
    groups = set(groups)
    for override in parse(overrides):
        key = override.key_or_group
        if (override.type == OverrideType.DEL or key.split(".")[0] == "hydra" or "/" in key or override.package
                or key in groups):
            continue
        if not is_known(key, schema):
            raise UnknownKeyError(unknown_key_message(key, schema))


def config_groups(*config_dirs: Path) -> set[str]:
    """The config groups of these folders: their subfolders (model, data, ..., and any a user adds)."""
    return {p.name for d in config_dirs if Path(d).is_dir() for p in Path(d).iterdir() if p.is_dir()}


def command_line_wins(cfg: DictConfig, overrides: list[str]) -> None:
    """For each EXCLUSIVE set: when the command line gives one of its settings a non-zero value, the
    others it does not give are set to 0 in `cfg` (their values came from config files)."""
    given = {o.key_or_group for o in parse(overrides) if o.type != OverrideType.DEL}
    for keys in EXCLUSIVE:
        if any(key in given and OmegaConf.select(cfg, key) for key in keys):
            for key in keys:
                if key not in given and OmegaConf.select(cfg, key):
                    OmegaConf.update(cfg, key, 0)


def check_command_line(argv: list[str], config_dir: Path) -> list[str]:
    """train.py's arguments before Hydra composes them: exit with the message of an unknown key (Hydra's
    own would suggest `+key=...`, which the typed config then refuses too); returns them with whole
    numbers written as floats turned into integers (whole_numbers)."""
    from hybrid_train.config import JobConfig

    dirs, overrides = [config_dir], []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
        elif not arg.startswith("-") and ("=" in arg or arg.startswith("~")):
            overrides.append(arg)
    try:
        check_keys(overrides, JobConfig, config_groups(*dirs))
        numbers = dict(zip(overrides, whole_numbers(overrides, JobConfig)))
    except ValueError as err:  # UnknownKeyError too
        sys.exit(f"error: {err}")
    if _asks_for_job_config(argv) and len(dirs) == 1:
        _print_job(overrides, config_dir)
    return [numbers.get(arg, arg) for arg in argv]


def _asks_for_job_config(argv: list[str]) -> bool:
    """`--cfg job` / `-c job` of one run of conf/config.yaml; with Hydra's --package, --resolve, a sweep
    (--multirun) or another --config-name it stays Hydra's."""
    asked = any(a in ("--cfg", "-c") and b == "job" for a, b in zip(argv, argv[1:])) or "--cfg=job" in argv
    hydras = ("--package", "-p", "--resolve", "--multirun", "-m", "--config-name", "-cn")
    return asked and not any(a in hydras or a.startswith(("--package=", "--config-name=")) for a in argv)


def _print_job(overrides: list[str], config_dir: Path) -> None:
    """Print the job as the run uses it and exit: validated, the command line's run length winning over
    the files' (EXCLUSIVE), interpolations resolved. Hydra's `--cfg job` prints the files' raw values."""
    from hybrid_train.config import load_config, to_yaml

    try:
        job = load_config(overrides, config_dir, require_init_from=False)
    except ValueError as err:
        sys.exit(f"error: {err}")
    print(to_yaml(job), end="")
    sys.exit(0)
