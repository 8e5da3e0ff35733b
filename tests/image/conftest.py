"""The container image, run with podman and checked from outside (`make test-image`).

Environment (set by `make test-image`):
  MESH_TEST_IMAGE          the image to test (built from the Dockerfile)
  CONTAINERS_CONF, CONTAINERS_STORAGE_CONF   podman's configuration and storage
  BUILD_CA_DIR             CA certificates the build trusted (must not be in the image)

Without MESH_TEST_IMAGE every test here is skipped, so `pytest tests` stays the module suite.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MESH_TEST_IMAGE"):
        return
    skip = pytest.mark.skip(reason="container image tests: run `make test-image` (MESH_TEST_IMAGE is not set)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)
