"""The registry of run kinds: the one list that the CLI, the console and the dashboards read.

A kind registers itself once, with a ``KindInfo`` that is cheap to import (names and dotted
paths only; the kind's code loads when first used, so a worker process imports only what its
runs need — as Scrapy loads its download handlers by name). Where registrations come from:

1. the built-in kinds, the packages listed in ``BUILTIN`` (each exposes ``KIND``);
2. installed plugins: the ``fetchfleet.kinds`` entry point group, each entry naming a
   ``KindInfo`` (``my_kind = "my_package:KIND"`` in the plugin's ``pyproject.toml``);
3. modules named in ``FETCHFLEET_PLUGINS`` (comma-separated, importable from ``sys.path``),
   each exposing ``KIND``: a plugin without packaging, e.g. in a test.

The variable is read from the environment of each process, so the CLI, the console's server
and every worker (spawned, or started on another machine) see the same kinds.

What the registry derives from the kinds, for code that lists them: ``item_logs()`` (where
each kind stores its items: the dashboards count them), ``components()`` (the schema steps
and tables a plugin kind brings: ``open_database`` migrates them, exports list them) and
``table_names()``. A plugin kind is then one package: nothing else needs an edit.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.jobs.base import RunKind
    from engine.settings import Settings
    from storage.item_logs import ItemLog
    from storage.migrations import Component

log = logging.getLogger(__name__)

BUILTIN = ("engine.jobs.validate", "engine.jobs.scrape", "engine.jobs.backfill", "engine.pipelines")
ENTRY_POINT_GROUP = "fetchfleet.kinds"
PLUGINS_ENV = "FETCHFLEET_PLUGINS"


@dataclass(frozen=True, slots=True)
class PageInfo:
    """A kind's console page: a Streamlit page script (``st.Page`` takes its path; the
    engine never imports streamlit), shown under "Jobs" in the navigation."""

    path: str  # relative to app.py, or absolute
    title: str
    icon: str = ":material/work:"


@dataclass(frozen=True, slots=True)
class KindInfo:
    """What a kind registers. ``job`` is ``"module:Class"`` of its ``RunKind``; ``cli`` is
    ``"module:function"`` that adds its subcommands to the CLI's subparsers; ``schema`` is
    ``"module:attr"`` of its ``storage.migrations.Component`` (its own tables and their
    migration steps), for a kind whose tables are not in the core schema (the built-in
    kinds' tables are core steps 2 and 3)."""

    name: str
    title: str
    job: str
    cli: str | None = None
    page: PageInfo | None = None
    order: int = 100  # where it is listed (CLI help, navigation)
    schema: str | None = None

    def load(self) -> type[RunKind]:
        return _load(self.job)

    def load_schema(self) -> Component | None:
        return None if self.schema is None else _load(self.schema)

    def add_cli(self, sub: Any) -> None:
        if self.cli:
            _load(self.cli)(sub)


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


_lock = threading.Lock()
_kinds: dict[str, KindInfo] | None = None
_extra: dict[str, KindInfo] = {}
_derived: dict[str, Any] = {}  # item_logs, components: built once per set of kinds


def register(info: KindInfo) -> KindInfo:
    """Register a kind in this process (the other two ways reach every process; this one is
    for code that builds its kinds at run time)."""
    with _lock:
        _extra[info.name] = info
        if _kinds is not None:
            _kinds[info.name] = info
        _derived.clear()
    return info


def _discover() -> dict[str, KindInfo]:
    found: list[KindInfo] = [importlib.import_module(m).KIND for m in BUILTIN]
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            found.append(ep.load())
        except Exception as exc:  # a broken plugin is reported, not fatal (Scrapy's NotConfigured)
            log.warning("job kind plugin %s (%s) not loaded: %s", ep.name, ep.value, exc)
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            found.append(importlib.import_module(module).KIND)
        except Exception as exc:
            log.warning("%s=%s: module %s not loaded: %s", PLUGINS_ENV, module, module, exc)
    out: dict[str, KindInfo] = {}
    for info in [*found, *_extra.values()]:
        if not isinstance(info, KindInfo):
            raise TypeError(f"a kind registration must be a KindInfo, got {info!r}")
        if info.name in out and out[info.name] != info:
            raise ValueError(f"two kinds are named {info.name!r}: {out[info.name].job}, {info.job}")
        out[info.name] = info
    return dict(sorted(out.items(), key=lambda kv: (kv[1].order, kv[0])))


def kinds() -> dict[str, KindInfo]:
    """Every registered kind by name, in listing order."""
    global _kinds
    with _lock:
        if _kinds is None:
            _kinds = _discover()
        return dict(_kinds)


def kind_info(name: str) -> KindInfo:
    try:
        return kinds()[name]
    except KeyError:
        raise ValueError(f"unknown job kind {name!r}: one of {', '.join(kinds())}") from None


def get_kind(name: str, settings: Settings) -> RunKind:
    """An instance of the kind named ``name`` (its code imported now)."""
    return kind_info(name).load()(settings)


def item_logs() -> dict[str, ItemLog]:
    """Kind name → where it stores its items, for every kind that has an item log (in
    listing order): what the dashboards (``storage.dashboard``) count. Built once (every
    kind's code is imported)."""
    with _lock:
        cached = _derived.get("item_logs")
    if cached is None:
        from engine.settings import Settings

        settings = Settings()
        built = {name: info.load()(settings).item_log() for name, info in kinds().items()}
        cached = {name: log for name, log in built.items() if log is not None}
        with _lock:
            _derived["item_logs"] = cached
    return dict(cached)


def components() -> list[Component]:
    """The schema components of the registered kinds (their own tables and migration
    steps), for ``open_database(url, components=…)``: every process that opens the database
    for a kind migrates them. Only the kinds that declare ``schema`` are imported. The
    engine's own come first: the fleet's hosts (``storage.hosts``), the schedules and
    the alerts."""
    with _lock:
        cached = _derived.get("components")
    if cached is None:
        from storage.alerts import COMPONENT as alerts
        from storage.hosts import COMPONENT as fleet
        from storage.schedules import COMPONENT as schedules

        cached = [fleet, schedules, alerts]
        for info in kinds().values():
            component = info.load_schema()
            if component is not None and all(c.name != component.name for c in cached):
                cached.append(component)
        with _lock:
            _derived["components"] = cached
    return list(cached)


def table_names() -> list[str]:
    """Every exportable table: the core schema's and the kinds' components'."""
    from storage.migrations import exportable_tables

    return list(exportable_tables(components()))


def reset() -> None:
    """Forget what was discovered (tests that change FETCHFLEET_PLUGINS)."""
    global _kinds
    with _lock:
        _kinds = None
        _extra.clear()
        _derived.clear()
