"""One options loader for every front: Jupyter config files, then the kernelspec, then flags made from the traits."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from jupyter_core.paths import jupyter_config_path
from traitlets import Bool, Dict, Float, Int, List, TraitError, TraitType
from traitlets.config import Application, Config

from . import logs
from .common.errors import ConfigError
from .kernelspec import load_relay_config
from .options import RelayOptions

log = logging.getLogger(__name__)

RELAYKERNEL_CONFIG = "jupyter_relaykernel_config"
SERVER_CONFIGS = ("jupyter_config", "jupyter_notebook_config", "jupyter_server_config")
SECTIONS = ("RelayOptions", "RelayProvisioner")
"""Config sections relaykernel reads: ``c.RelayOptions.…`` everywhere, ``c.RelayProvisioner.…`` in the server."""

# Older flag spellings kept working beside the generated ``--option-name``.
ALIASES = {
    "ssh_config_file": ("--ssh-config",),
    "remote_workdir": ("--workdir",),
    "sync_ignore": ("--ignore",),
    "sync_max_file_size_mb": ("--max-file-size-mb",),
    "checkpoint_paths": ("--checkpoint-path",),
}
_METAVARS = (("_seconds", "SECONDS"), ("_mb", "MB"), ("_file", "FILE"), ("_dir", "DIR"), ("workdir", "DIR"),
             ("_paths", "GLOB"), ("_dirs", "DIR"), ("_ignore", "PATTERN"), ("python", "COMMAND"), ("_count", "N"),
             ("_files", "N"))


class _FileLoader(Application):
    """traitlets' config-file machinery (``.py`` and ``.json``, path order, merging), raising on a broken file."""

    raise_config_file_errors = True


def jupyter_config(server: Config | None = None) -> Config:
    """The RelayOptions sections of the Jupyter config files, lowest priority first.

    ``jupyter_relaykernel_config.py``/``.json`` on Jupyter's config path, then the server's config: the running
    server's own (``server``, in the provisioner) or else the server config files (``c.RelayOptions`` there applies
    to ``relaykernel launch``, ``cell`` and ``doctor`` as it does in JupyterLab).
    """
    merged = Config()
    merged.merge(_sections(_load(RELAYKERNEL_CONFIG, strict=True)))
    if server is None:
        for name in SERVER_CONFIGS:
            merged.merge(_sections(_load(name, strict=False)))
    else:
        merged.merge(server)  # whole: the provisioner's other sections (its base classes') stay in effect
    if "RelayProvisioner" in merged:  # one section for the fronts that are not the provisioner
        merged.RelayOptions.merge(merged.RelayProvisioner)
    return merged


def _load(name: str, *, strict: bool) -> Config:
    loaded = Config()
    for directory in reversed(jupyter_config_path()):  # lowest priority first, so the user's own wins
        app = _FileLoader()
        try:
            app.load_config_file(name, path=[directory])
        except Exception as error:  # noqa: BLE001 - a user's file can raise anything
            where = os.path.join(directory, name + ".py")
            if strict:
                raise ConfigError(f"{where} (or .json) failed to load: {type(error).__name__}: {error}") from None
            log.warning("skipping %s (or .json) for relaykernel's options: %s: %s", where, type(error).__name__, error)
            continue
        loaded.merge(app.config)
    return loaded


def _sections(config: Config) -> Config:
    return Config({name: config[name] for name in SECTIONS if name in config})


def check_names(names: Iterable[str], where: str, known: Iterable[str] | None = None) -> None:
    """ConfigError for the first name that is no option, naming the closest one."""
    valid = sorted(known if known is not None else RelayOptions.class_trait_names(config=True))
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see docs/options.md for the options"
            raise ConfigError(f"unknown option {name!r} in {where}: {hint}")


@contextmanager
def checked_construction(options: RelayOptions, kwargs: dict[str, Any]) -> Iterator[None]:
    """Around ``RelayOptions.__init__``: refuse unknown names, make type errors one line, add the config files.

    With a parent (the provisioner, built by jupyter_client with the KernelManager as parent) the
    jupyter_relaykernel_config files apply too, below the parent's (the Jupyter server's) config, and
    relaykernel's log lines follow the parent's log.
    """
    parent = kwargs.get("parent")
    if parent is not None and "config" not in kwargs:
        kwargs["config"] = jupyter_config(server=getattr(parent, "config", None) or Config())
    known = set(type(options).class_trait_names()) | {"parent", "config", "log"}
    check_names(kwargs, "the provisioner config or the command line", known)
    config = kwargs.get("config")
    for section in ("RelayOptions", type(options).__name__):
        if config is not None and section in config:
            check_names(config[section], f"c.{section} of a Jupyter config file", known)
    try:
        yield
    except TraitError as error:
        raise ConfigError(describe_trait_error(error)) from None
    if parent is not None:
        logs.follow_application_log(options.log)


def load_options(
    *, flags: Mapping[str, Any] | None = None, spec_dir: str | None = None,
    spec_config: Mapping[str, Any] | None = None,
) -> RelayOptions:
    """RelayOptions from the Jupyter config files, then the kernelspec's provisioner config, then the flags."""
    with logs.step("loading the options"):
        return _load_options(dict(flags or {}), spec_dir, dict(spec_config or {}))


def _load_options(given: dict[str, Any], spec_dir: str | None, spec: dict[str, Any]) -> RelayOptions:
    config = jupyter_config()
    if spec_dir:
        spec_dir = spec_dir.strip().strip("'\"")  # VS Code wraps a path with spaces in literal quotes
        spec.update(load_relay_config(spec_dir))
        check_names(spec, f"the provisioner config of {os.path.join(spec_dir, 'kernel.json')}")
    options = RelayOptions(config=config, **{**spec, **given})
    sources = {name: "a Jupyter config file" for name in config.RelayOptions}
    sources.update({name: "the kernelspec" for name in spec})
    sources.update({name: "the command line" for name in given})
    options.sources = sources
    for name, source in sorted(sources.items()):
        log.debug("option %s = %r (from %s)", name, getattr(options, name), source)
    return options


def add_option_flags(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """One flag per option (``lease_seconds`` → ``--lease-seconds SECONDS``), its help the option's own."""
    traits = RelayOptions.class_traits(config=True)
    group = parser.add_argument_group("options (also settable in Jupyter config files and the kernelspec)")
    for name in names:
        _add_flag(group, name, traits[name])


def _add_flag(group: Any, name: str, trait: TraitType) -> None:
    flags = [f"--{name.replace('_', '-')}", *ALIASES.get(name, ())]
    text = " ".join(trait.help.split()).replace("%", "%%")
    default = trait.default_value_repr()
    common: dict[str, Any] = {"dest": name, "default": None}
    if isinstance(trait, Bool):
        group.add_argument(*flags, action=argparse.BooleanOptionalAction, help=f"{text} (default: {default})",
                           **common)
        return
    metavar = next((word for suffix, word in _METAVARS if name.endswith(suffix)), "TEXT")
    if isinstance(trait, List):
        group.add_argument(*flags, action="append", metavar=metavar,
                           help=f"{text} (repeatable; default: {default})", **common)
    elif isinstance(trait, Dict):
        group.add_argument(*flags, action="append", type=_key_value, metavar="KEY=VALUE",
                           help=f"{text} (repeatable; default: {default})", **common)
    else:
        kind = float if isinstance(trait, Float) else int if isinstance(trait, Int) else str
        group.add_argument(*flags, type=kind, metavar=metavar, help=f"{text} (default: {default})", **common)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def given_flags(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The options the user set on the command line (others come from config or keep their defaults)."""
    given: dict[str, Any] = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            given[name] = dict(value) if RelayOptions.class_traits()[name].__class__ is Dict else value
    return given


_TRAIT_NAME = re.compile(r"'(\w+)' trait")
_EXPECTED = (re.compile(r"expected (.+?), not (.+?)\.?$"),
             re.compile(r"must be (.+?), but a value of (.+?) was specified"))


def describe_trait_error(error: TraitError) -> str:
    """traitlets' wording as one line: 'option lease_seconds must be a float, not the str 'x''."""
    text = " ".join(str(error).split())
    name = _TRAIT_NAME.search(text)
    found = next((match for match in (pattern.search(text) for pattern in _EXPECTED) if match), None)
    if not name or not found:
        return f"bad option value: {text}"
    expected, got = found.groups()
    what = "each item of " if "contains" in text or text.startswith("Values of") else ""
    return f"{what}option {name.group(1)} must be {expected}, not {got}"
