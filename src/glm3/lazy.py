"""Package attributes imported on first use (PEP 562), so importing a package costs only what is used."""

from __future__ import annotations

import importlib


def lazy_attributes(namespace: dict, exports: dict[str, str]):
    """(__getattr__, __dir__) for a package whose `exports` map attribute names to the modules holding them.
    An attribute is imported when first read, then kept in `namespace` (the package's globals())."""
    package = namespace["__name__"]

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(list(namespace) + list(exports))

    return __getattr__, __dir__
