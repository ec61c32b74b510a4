"""Repository-wide pytest hooks (the doctests in dgnh/ and the tests in tests/).

Doctests that import an optional extra (torch) are skipped cleanly when it is
not installed, so the README's test command passes with and without the extras.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
from _pytest.doctest import DoctestItem

OPTIONAL = ("torch",)  # extras a doctest may import


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not isinstance(item, DoctestItem):
            continue
        source = "".join(example.source for example in item.dtest.examples)
        for module in OPTIONAL:
            if re.search(rf"^\s*import .*\b{module}\b", source, re.M) and _missing(module):
                item.add_marker(pytest.mark.skip(reason=f"needs the optional extra {module!r}"))
