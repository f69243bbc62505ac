"""Typed run configuration: dataclass trees, presets and ``key=value`` overrides.

A recipe declares one dataclass tree (its fields are the keys a user may set) and a table of
named presets. ``parse_config`` applies, lowest precedence first: the dataclass defaults,
``preset=NAME``, ``config=FILE`` (a resolved config an earlier run wrote), then every ``key=value`` /
``section.key=value`` on the command line. A recipe's default preset is applied only when neither
``preset=`` nor ``config=`` is given: a run's ``config.yaml`` is complete, so ``config=`` alone
reproduces that run exactly. Anything it cannot place or parse fails here, before any work starts,
with a message that names the key and what is valid.

The front door stays argparse-compatible for launchers: ``--local_rank N`` (deepspeed) is
tolerated and ``--deepspeed_config FILE`` is honoured for what DeepSpeed alone decides (offload,
bucket sizes, communication); the keys genssl's config owns are refused in it (``read_deepspeed_json``).

``run_identity`` is the one definition of "the same run": a checkpoint is resumed, and a finished
pipeline stage is skipped, only when it matches.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A user mistake in the run configuration (unknown key, bad value, bad preset)."""


@dataclasses.dataclass
class ParsedArgs:
    config: Any
    deepspeed_config: str | None
    local_rank: int | None


def _field_map(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _describe(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is tuple:
        return "a comma-separated tuple of " + ", ".join(_describe(a) for a in get_args(tp))
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _convert(text: Any, tp, key: str):
    """Parse ``text`` (a string from the command line, or a YAML/JSON value) as type ``tp``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (text is None or (isinstance(text, str) and text.lower() in ("none", "null", ""))):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(text, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={text!r}: expected {_describe(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if str(choice) == str(text):
                return choice
        raise ConfigError(f"{key}={text!r} is not valid; choose one of: {', '.join(map(str, choices))}")
    if origin is tuple:
        items = text.split(",") if isinstance(text, str) else list(text)
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(i, args[0], key) for i in items)
        if len(items) != len(args):
            raise ConfigError(f"{key}={text!r}: expected {len(args)} comma-separated values ({_describe(tp)})")
        return tuple(_convert(i, a, key) for i, a in zip(items, args))
    if tp is bool:
        if isinstance(text, bool):
            return text
        low = str(text).lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r}: expected a boolean (true/false, on/off, 1/0)")
    if tp is int:
        try:
            if isinstance(text, float) and not text.is_integer():
                raise ValueError
            return int(float(text)) if isinstance(text, str) and "e" in text.lower() else int(text)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={text!r}: expected an integer") from None
    if tp is float:
        try:
            return float(text)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={text!r}: expected a number") from None
    if tp is str:
        return str(text)
    if tp is Any:
        return text
    raise ConfigError(f"{key}: cannot parse values of type {_describe(tp)}")


def _resolve(cfg, dotted: str):
    """Return (owner dataclass instance, field name, field type) for ``a.b.c``."""
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts):
        fields = _field_map(type(node))
        if part not in fields:
            prefix = ".".join(parts[:i])
            valid = sorted(fields)
            close = difflib.get_close_matches(part, valid, n=1)
            hint = f" Did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            where = f"section {prefix!r}" if prefix else "this recipe"
            raise ConfigError(f"unknown key {dotted!r}: {where} has no key {part!r}.{hint} Valid keys: {', '.join(valid)}")
        _, tp = fields[part]
        if i == len(parts) - 1:
            if _is_dataclass_type(tp):
                raise ConfigError(f"{dotted!r} is a section; set one of its keys, e.g. {dotted}.{next(iter(_field_map(tp)))}=...")
            return node, part, tp
        if not _is_dataclass_type(tp):
            raise ConfigError(f"{'.'.join(parts[: i + 1])!r} is a value, not a section; remove '.{'.'.join(parts[i + 1:])}'")
        node = getattr(node, part)
    raise AssertionError("unreachable")


def set_value(cfg, dotted: str, value: Any) -> None:
    owner, name, tp = _resolve(cfg, dotted)
    setattr(owner, name, _convert(value, tp, dotted))


def apply_overrides(cfg, overrides: dict[str, Any], source: str = "") -> None:
    for key, value in overrides.items():
        try:
            set_value(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def validate(cfg) -> None:
    """Run each section's ``validate()`` (and dataclass ``__post_init__`` checks) after overrides."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value)
    post = getattr(cfg, "__post_init__", None)
    if post is not None:
        try:
            post()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    check = getattr(cfg, "validate", None)
    if check is not None:
        check()


def presets_in_effect(argv: list[str], default_preset: str | None = None) -> list[str]:
    """The presets a command line applies: its ``preset=NAME``s in order; else ``default_preset``,
    unless ``config=FILE`` is given (a resolved config is complete: a preset under it would be
    invisible at best and, for a hand-written partial file, a silent change of the run)."""
    given = [a.partition("=")[2].strip() for a in argv if a.partition("=")[0].strip() == "preset"]
    if given:
        return given
    if default_preset is None or any(a.partition("=")[0].strip() == "config" for a in argv):
        return []
    return [default_preset]


def parse_config(argv: list[str] | None, cls, presets: dict[str, dict] | None = None,
                 default_preset: str | None = None) -> ParsedArgs:
    """Build the config tree from ``argv`` (default ``sys.argv[1:]``).

    Accepted tokens: ``preset=NAME``, ``key=value``, ``section.key=value``, ``config=FILE.yaml``
    (a resolved config written by an earlier run), ``--deepspeed_config FILE``, ``--local_rank N``.
    Precedence, lowest first: dataclass defaults < preset (``default_preset`` when neither
    ``preset=`` nor ``config=`` is given) < ``config=FILE`` < command-line keys.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    presets = presets or {}
    deepspeed_config = None
    local_rank = None
    assignments: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--"):
            name, eq, val = tok[2:].partition("=")
            if name in ("local_rank", "local-rank", "deepspeed_config", "deepspeed-config", "deepspeed"):
                if name == "deepspeed":  # bare flag added by some launchers
                    i += 1
                    continue
                if not eq:
                    if i + 1 >= len(argv):
                        raise ConfigError(f"--{name} needs a value")
                    val = argv[i + 1]
                    i += 1
                if name.startswith("local"):
                    local_rank = int(val)
                else:
                    deepspeed_config = val
                i += 1
                continue
            raise ConfigError(f"unknown option {tok!r}: settings are given as key=value (e.g. epochs=10); "
                              "the only --options are --deepspeed_config FILE and --local_rank N")
        key, eq, val = tok.partition("=")
        if not eq or not key:
            raise ConfigError(f"cannot read argument {tok!r}: write settings as key=value, e.g. epochs=10 or optim.lr=1e-3")
        assignments.append((key.strip(), val.strip()))
        i += 1

    cfg = cls()
    for name in presets_in_effect(argv, default_preset):
        if name not in presets:
            raise ConfigError(f"preset={name!r} is not valid; choose one of: {', '.join(sorted(presets))}")
        apply_overrides(cfg, _flatten(presets[name]), source=f"preset {name!r}")
    for key, val in assignments:
        if key == "config":
            if not os.path.isfile(val):
                raise ConfigError(f"config={val!r}: no such file")
            with open(val) as fh:
                apply_overrides(cfg, _flatten(yaml.safe_load(fh) or {}), source=val)
    for key, val in assignments:
        if key not in ("preset", "config"):
            set_value(cfg, key, val)
    if deepspeed_config is not None:
        read_deepspeed_json(deepspeed_config)  # refuse a bad file now, before any work
    validate(cfg)
    return ParsedArgs(cfg, deepspeed_config, local_rank)


# Keys of a DeepSpeed JSON that genssl's own config decides, and the key to use instead. The data
# loader, the lr scaling (lr x global batch / 256) and the crops' dtype are built from genssl's keys
# before DeepSpeed starts, and config.yaml records them, so the file must not change them afterwards.
# Every other DeepSpeed key (offload, bucket sizes, overlap, communication dtype, ...) is allowed.
DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "batch_size= (per rank; the global batch is batch_size x ranks)",
    "train_micro_batch_size_per_gpu": "batch_size= (per rank)",
    "gradient_accumulation_steps": "batch_size= (gradient accumulation is not supported: raise batch_size or add ranks)",
    "gradient_clipping": "optim.clip_grad=",
    "zero_optimization.stage": "zero_stage=",
    "bf16.enabled": "precision=",
    "bfloat16.enabled": "precision=",
    "fp16.enabled": "precision=",
    "amp": "precision=",
    "torch_autocast": "precision=",
    "optimizer": "optim.* (genssl hands DeepSpeed its own AdamW)",
    "scheduler": "optim.* (lr and weight decay follow genssl's schedules)",
}


def read_deepspeed_json(path: str) -> dict:
    """A user's DeepSpeed JSON (``--deepspeed_config``), refused if it sets a key genssl owns."""
    if not os.path.isfile(path):
        raise ConfigError(f"--deepspeed_config {path!r}: no such file")
    try:
        with open(path) as fh:
            user = json.load(fh)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path!r}: not valid JSON ({e})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"--deepspeed_config {path!r}: expected a JSON object of DeepSpeed settings")
    given = set(_flatten(user)) | set(user)
    for key, instead in DEEPSPEED_OWNED_KEYS.items():
        if key in given or any(k.startswith(key + ".") for k in given):
            raise ConfigError(f"--deepspeed_config {path!r}: remove {key!r}; genssl sets it from its own config, "
                              f"use {instead} instead")
    return user


def to_dict(cfg) -> dict:
    """The config tree as plain dicts/lists (YAML/JSON-ready)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


def write_config(cfg, path: str) -> None:
    """Write the resolved config as YAML, atomically."""
    from genssl.engine.atomic import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# Keys that cannot change what a run computes: where it writes, how it reports, how many loader
# threads it uses, where caches live, how often it checkpoints (resume is exact). They are left out
# of a run's identity at every depth of the tree (recipes nest other recipes' configs: generator.log,
# generator.ae.out), so a run folder that was moved or copied (another out=), or rerun with other
# logging or workers, is still the same run. Everything else is part of it: data, seed, model, epochs,
# every optim / ema / crops / method key.
NOT_RESULT_KEYS = ("out", "log", "progress", "num_workers", "cache_dir", "ckpt.every_steps", "ckpt.keep_last",
                   "ckpt.resume", "report", "report_sources", "verify", "tensorboard", "contact_sheet")
# A checkpoint holds the training alone; evaluation runs after it, so eval.* may change on resume.
NOT_TRAINING_KEYS = NOT_RESULT_KEYS + ("eval",)


def run_identity(cfg, training_only: bool = False) -> dict[str, Any]:
    """What defines a run's results: the config as ``{dotted key: value}`` without ``NOT_RESULT_KEYS``.

    ``training_only=True`` (checkpoint resume) also leaves out ``eval.*``. Two configs describe the
    same run exactly when their identities are equal; store it as JSON next to the result.
    """
    ignored = set(NOT_TRAINING_KEYS if training_only else NOT_RESULT_KEYS)

    def counts(key: str) -> bool:  # no run of its parts is an ignored key ("generator.log.every_steps" has "log")
        parts = key.split(".")
        runs = {".".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)}
        return runs.isdisjoint(ignored)

    return {key: value for key, value in _flatten(to_dict(cfg)).items() if counts(key)}


def run_differences(stored: dict | None, cfg, training_only: bool = False) -> list[str]:
    """``'key: stored value there, value now'`` for every setting where ``cfg`` is not the run recorded
    as ``stored`` (a ``run_identity``); empty when it is the same run.

    A key the record lacks while ``cfg`` leaves it at its default is no difference: the record was
    written before the key existed, and a new key's default keeps the behaviour it had then."""
    if stored is None:
        return ["the record holds no settings to compare (written by an older genssl)"]
    now = run_identity(cfg, training_only)
    defaults = run_identity(type(cfg)(), training_only)
    stored = {**{k: v for k, v in now.items() if k not in stored and k in defaults and v == defaults[k]}, **stored}

    def shown(values: dict, key: str) -> str:
        return repr(values[key]) if key in values else "(no such key)"

    return [f"{key}: {shown(stored, key)} there, {shown(now, key)} now"
            for key in sorted(set(stored) | set(now)) if key not in stored or key not in now or stored[key] != now[key]]


def identity_at_world_size(stored: dict | None, cfg, saved_world: int, world: int) -> dict | None:
    """A recorded run identity (a checkpoint's, a finished stage's) as seen at this run's world size.

    ``batch_size`` is per rank. What must not change is the global batch: the data order, the steps
    per epoch and the scaled lr all follow from it (data/sampler.py). So a checkpoint of 2 ranks x 16
    resumes on 1 rank with batch_size=32, and on 4 ranks with batch_size=8."""
    if stored is None or saved_world == world or "batch_size" not in stored:
        return stored
    global_batch = stored["batch_size"] * saved_world
    if global_batch != cfg.batch_size * world:
        fix = (f"batch_size={global_batch // world}" if global_batch % world == 0
               else f"a number of ranks that divides {global_batch}")
        raise ConfigError(
            f"the recorded run (a checkpoint, a finished stage) has a global batch of {global_batch} ({stored['batch_size']} per rank x "
            f"{saved_world} ranks), but batch_size={cfg.batch_size} on {world} rank(s) gives {cfg.batch_size * world}; "
            f"the data order and schedules follow the global batch, so resume with {fix} (or start afresh with a new "
            "out= or ckpt.resume=false)")
    return {**stored, "batch_size": cfg.batch_size}


__all__ = ["ConfigError", "ParsedArgs", "parse_config", "presets_in_effect", "apply_overrides", "set_value",
           "validate", "write_config", "to_dict", "read_deepspeed_json", "DEEPSPEED_OWNED_KEYS", "NOT_RESULT_KEYS",
           "NOT_TRAINING_KEYS", "run_identity", "run_differences", "identity_at_world_size"]
