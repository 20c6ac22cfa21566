"""Job kinds: one package per kind (``engine/jobs/<kind>/``), listed by the registry.

``kinds()`` is what everything that lists kinds reads (CLI, navigation, dashboards,
exports); ``get_kind(name, settings)`` builds one, importing its code on first use;
``item_logs()`` and ``components()`` are what the dashboards and the database need of them.

    python -c "from engine.jobs import kinds; print(list(kinds()))"
"""

from __future__ import annotations

from engine.jobs.registry import (
    KindInfo,
    PageInfo,
    components,
    get_kind,
    item_logs,
    kind_info,
    kinds,
    register,
    table_names,
)

__all__ = [
    "KindInfo",
    "PageInfo",
    "components",
    "get_kind",
    "item_logs",
    "kind_info",
    "kinds",
    "register",
    "table_names",
]
