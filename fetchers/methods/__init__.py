"""Fetch methods: one module per method behind `base.FetchMethod` (see base.py)."""

from fetchers.methods.base import (
    METHOD_NAMES,
    FetchMethod,
    FetchRequest,
    RawResponse,
    Requirement,
    create_method,
    method_class,
)

__all__ = [
    "METHOD_NAMES",
    "FetchMethod",
    "FetchRequest",
    "RawResponse",
    "Requirement",
    "create_method",
    "method_class",
]
