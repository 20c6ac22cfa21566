"""The fleet tests' lab, once per session for every module that uses it: two hosts (network
namespaces, each with its own sshd) reaching PostgreSQL at 10.77.0.1:5432 through a relay.

A pytest plugin (``pytest_plugins`` in ``conftest.py``), not a fixture imported into each
test module: a session fixture imported into two modules is two fixtures, and would build
two labs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.netns import SUBNET_HOST, Lab, Relay, netns_unavailable


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Two hosts with sshd, PostgreSQL reachable from them at 10.77.0.1:5432."""
    require_tool("/usr/sbin/sshd", "openssh-server")
    require_tool("ssh", "openssh-client")
    why = netns_unavailable()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    directory = tmp_path_factory.mktemp("lab") / "hosts"
    with Lab(2, directory) as built, Relay(SUBNET_HOST, 5432, "127.0.0.1", 5432):
        yield built
        for host in built.hosts:  # end this session's ssh master connections
            runner(built).close(host.alias)


def runner(lab: Lab) -> Any:
    """The fleet's ssh runner, with the lab's ssh_config."""
    from engine.fleet.ssh import SshRunner

    return SshRunner(config=lab.ssh_config)
