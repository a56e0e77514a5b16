"""Shared fixtures; the helpers they use are in `tests.support`."""

from __future__ import annotations

import pytest

from tests.support.peers import free_port


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session", autouse=True)
def site_key(tmp_path_factory):
    """A site key for `build-dataset`'s pseudonyms, so that no test writes one under $HOME."""
    import os

    path = tmp_path_factory.mktemp("site") / "site.key"
    old = os.environ.get("DICOMNODE_SITE_KEY")
    os.environ["DICOMNODE_SITE_KEY"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DICOMNODE_SITE_KEY", None)
    else:
        os.environ["DICOMNODE_SITE_KEY"] = old
