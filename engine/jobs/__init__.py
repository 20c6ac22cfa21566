"""Job kinds: one package per kind (``engine/jobs/<kind>/``), listed by the registry.

``kinds()`` is what everything that lists kinds reads (CLI, navigation, dashboards,
exports); ``get_kind(name, settings)`` builds one, importing its code on first use.
"""

from __future__ import annotations

from engine.jobs.registry import KindInfo, PageInfo, get_kind, kind_info, kinds, register

__all__ = ["KindInfo", "PageInfo", "get_kind", "kind_info", "kinds", "register"]
