"""Shared fixtures; the helpers they use are in `tests.support`."""

from __future__ import annotations

import pytest

from tests.support.peers import free_port


@pytest.fixture
def port() -> int:
    return free_port()
