"""Marks every notebook (executed by nbmake) as slow, so `pytest -m "not slow"` is the fast development tier."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)
