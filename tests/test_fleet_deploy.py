"""``deploy`` to a real host (a namespace with its own sshd, the session's lab), then
``hosts test`` there; an install that fails reports its last lines.

The hosts share this machine's filesystem, so a fresh temporary work directory is a fresh
directory on the host, and ``--python`` can point at this venv's Python (``--no-install``:
the namespaces reach no package registry).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.version import ROOT, VERSION_FILE, compute_version
from tests.fleet_lab import with_password
from tests.netns import SUBNET_HOST, Lab
from tests.test_fleet_ssh import cli, ok


def head() -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


def env_for(lab: Lab, pg_url: str) -> dict[str, str]:
    return {
        "FETCHFLEET_DB": with_password(pg_url, "127.0.0.1"),
        "FETCHFLEET_WORKER_DB": with_password(pg_url, SUBNET_HOST),
        "FETCHFLEET_SSH_CONFIG": str(lab.ssh_config),
    }


def test_deploy_copies_the_committed_tree_and_hosts_test_compares_versions(
    lab: Lab, pg_url: str, tmp_path: Path
) -> None:
    env = env_for(lab, pg_url)
    workdir = tmp_path / "deployed"
    ok(cli(env, "hosts", "add", "h0", "--ssh", lab.hosts[0].alias, "--python", sys.executable,
           "--workdir", str(workdir)))  # fmt: skip
    (workdir / "engine").mkdir(parents=True)
    (workdir / "engine" / "gone.py").write_text("")  # not from a deploy: left alone
    (workdir / "data").mkdir()
    (workdir / "data" / "keep.log").write_text("x")

    done = cli(env, "deploy", "h0", "--no-install", "--json")
    result = ok(done)
    commit = head()
    assert result["commit"] == result["version"] == commit and result["installed"] is False
    assert "copy     ok" in done.stderr and "install  skipped" in done.stderr
    assert (workdir / VERSION_FILE).read_text().strip() == commit
    assert (workdir / "engine" / "run.py").is_file() and (workdir / "run.sh").is_file()
    assert not (workdir / ".venv").exists() and not (workdir / ".git").exists()
    assert (workdir / "data" / "keep.log").read_text() == "x"
    assert compute_version(workdir) == commit  # what a worker there computes

    here = compute_version(ROOT)  # the CLI's own: HEAD, or HEAD-dirty.<hash> while editing
    [check] = (
        ok(cli(env, "hosts", "test", "h0", "--json"))
        if here == commit
        else [_failed(cli(env, "hosts", "test", "h0", "--json"))]
    )
    assert check["project"] is True and check["db"] == "ok"
    assert check["version"] == commit and check["local_version"] == here
    assert check["version_ok"] is (here == commit)
    if here != commit:  # an edited tree: the host runs the commit, and is told so
        assert "`deploy h0`" in check["problem"]

    # a second deploy over the first: files the commit does not have are removed only if
    # a deploy brought them (the manifest), the version is rewritten
    manifest = workdir / ".fetchfleet-files"
    manifest.write_text(manifest.read_text() + "engine/stale_from_last_deploy.py\n")
    (workdir / "engine" / "stale_from_last_deploy.py").write_text("")
    ok(cli(env, "deploy", "h0", "--no-install", "--json"))
    assert not (workdir / "engine" / "stale_from_last_deploy.py").exists()
    assert (workdir / "engine" / "gone.py").exists()


def _failed(done: subprocess.CompletedProcess[str]) -> Any:
    import json

    assert done.returncode == 1, done.stderr
    return json.loads(done.stdout)[0]


def test_deploy_refuses_a_git_checkout_and_reports_a_failed_install(
    lab: Lab, pg_url: str, tmp_path: Path
) -> None:
    """Into a git checkout: refused (deploy would overwrite someone's work). An install
    whose requirements cannot be installed: the install step fails with pip's last lines.
    The failing requirement is committed in a clone of the project, deployed with the
    engine function the console calls, whose progress events are checked too."""
    from engine.fleet.deploy import DeployError, deploy
    from engine.fleet.hosts import add_host
    from storage.db import open_database
    from storage.hosts import HostRow
    from tests.fleet_lab import runner

    env = env_for(lab, pg_url)
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "init", "-q", str(checkout)], check=True)
    ok(cli(env, "hosts", "add", "gitdir", "--ssh", lab.hosts[1].alias, "--workdir",
           str(checkout)))  # fmt: skip
    refused = cli(env, "deploy", "gitdir", "--no-install")
    assert refused.returncode == 2
    assert "is a git checkout" in refused.stderr and "copy:" in refused.stderr

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    reqs = clone / "requirements.txt"
    reqs.write_text("this is not a requirement !!\n" + reqs.read_text())
    git = ["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "commit", "-qam", "broken requirements"], check=True)

    db = open_database(pg_url)
    events: list[Any] = []
    try:
        add_host(db, HostRow("h1", lab.hosts[1].alias, ".venv/bin/python", str(tmp_path / "w")))
        with pytest.raises(DeployError) as err:
            deploy(db, runner(lab), "h1", progress=events.append, root=clone)
    finally:
        db.dispose()
    assert err.value.step == "install"
    assert any("this is not a requirement" in line for line in err.value.tail), err.value.tail
    assert [(e.step, e.status) for e in events] == [
        ("source", "start"), ("source", "ok"), ("copy", "start"), ("copy", "ok"),
        ("install", "start"), ("install", "failed"),
    ]  # fmt: skip
    assert (tmp_path / "w" / ".venv" / "bin" / "python").exists()  # the venv was made
