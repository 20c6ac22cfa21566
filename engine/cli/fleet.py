"""``hosts`` and ``fleet``: the machines of the fleet and the workers started there over SSH."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from engine.cli.common import EXIT_NOT_COMPLETED, EXIT_OK, UserError, open_db, resolve_db_url

FLEET_HELP = """\
Hosts are reached with the system ssh client in BatchMode: keys or an agent, never a password,
and a host key already in known_hosts (connect once by hand). ~/.ssh/config aliases, ProxyJump
and agents work; --ssh-config FILE (or FETCHFLEET_SSH_CONFIG) uses another config file.
The database URL (with its password) and the variables named by --env reach the remote
workers through the ssh channel's stdin, never on a command line."""


def _ssh(args: argparse.Namespace) -> Any:
    from engine.fleet.ssh import SshRunner
    from engine.settings import Settings

    config = args.ssh_config or Settings().ssh_config
    return SshRunner(config=Path(config) if config else None)


def worker_env(args: argparse.Namespace) -> dict[str, str]:
    """What the remote workers get in their environment (``engine.fleet.env.worker_env``):
    the database URL as the hosts reach it (--worker-db, FETCHFLEET_WORKER_DB, else --db),
    the secret key if set here, and the variables named by --env."""
    from engine.fleet.env import worker_env as build
    from engine.fleet.hosts import FleetError
    from engine.settings import Settings

    worker_db = getattr(args, "worker_db", None) or Settings().worker_db
    try:
        return build(resolve_db_url(args.db), worker_db, getattr(args, "env", None) or [])
    except FleetError as exc:
        raise UserError(f"--env {exc}") from None


def _run(args: argparse.Namespace, fn: Any) -> Any:
    from engine.fleet.hosts import FleetError
    from engine.fleet.ssh import SshError

    db = open_db(args)
    try:
        return fn(db)
    except (FleetError, SshError, ValueError) as exc:
        raise UserError(str(exc)) from None
    finally:
        db.dispose()


def _out(args: argparse.Namespace, obj: Any, human: str) -> None:
    print(json.dumps(obj, default=str) if args.json else human)


def cmd_hosts_add(args: argparse.Namespace) -> int:
    from engine.fleet.hosts import add_host
    from storage.hosts import HostRow

    row = HostRow(args.name, args.ssh, args.python, args.workdir, args.countries)
    _run(args, lambda db: add_host(db, row))
    _out(args, row.__dict__, f"added host {args.name} ({args.ssh}); try `hosts test {args.name}`")
    return EXIT_OK


def cmd_hosts_list(args: argparse.Namespace) -> int:
    from engine.fleet.hosts import list_hosts

    rows = _run(args, list_hosts)
    human = "\n".join(
        f"{h.name:<16} {h.ssh_target:<24} {h.workdir}  ({h.python})"
        + (f"  countries {h.countries}" if h.countries else "")
        for h in rows
    )
    _out(args, [h.__dict__ for h in rows], human or "no hosts: add one with `hosts add`")
    return EXIT_OK


def cmd_hosts_test(args: argparse.Namespace) -> int:
    from engine.fleet.hosts import get_host, list_hosts, test_host

    ssh, env = _ssh(args), worker_env(args)

    def check(db: Any) -> list[Any]:
        hosts = list_hosts(db) if args.all else [get_host(db, args.name)]
        return [test_host(ssh, h, env) for h in hosts]

    if not args.all and not args.name:
        raise UserError("name a host, or --all")
    results = _run(args, check)
    from engine.version import short

    human = "\n".join(
        f"{r.name}: "
        + (
            f"ok (Python {r.python}, project importable, version {short(r.version)} as here, "
            "database reachable)"
            if r.ok
            else f"FAILED: {r.problem}"
        )
        for r in results
    )
    _out(args, [r.as_dict() for r in results], human)
    return EXIT_OK if all(r.ok for r in results) else EXIT_NOT_COMPLETED


def cmd_hosts_remove(args: argparse.Namespace) -> int:
    from engine.fleet.hosts import remove_host

    _run(args, lambda db: remove_host(db, args.name))
    _out(args, {"removed": args.name}, f"removed host {args.name}")
    return EXIT_OK


def cmd_deploy(args: argparse.Namespace) -> int:
    import sys

    from engine.fleet.deploy import DeployStep, deploy
    from engine.version import short

    ssh = _ssh(args)

    def show(step: DeployStep) -> None:  # progress on stderr: stdout stays for --json
        mark = {"start": "…", "ok": "ok", "warning": "WARNING", "skipped": "skipped"}
        if step.status != "failed":  # the error itself is printed once, as the exit error
            print(f"{step.step:<8} {mark.get(step.status, step.status)}: {step.message}",
                  file=sys.stderr, flush=True)  # fmt: skip

    result = _run(
        args,
        lambda db: deploy(
            db, ssh, args.name, args.ref, not args.no_install, show, base_python=args.base_python
        ),
    )
    _out(
        args,
        result.__dict__,
        f"deployed {short(result.commit)} to {args.name}:{result.workdir}; "
        f"check it with `hosts test {args.name}`",
    )
    return EXIT_OK


def cmd_fleet_start(args: argparse.Namespace) -> int:
    from engine.fleet.workers import start_workers

    ssh, env = _ssh(args), worker_env(args)
    pid = _run(
        args, lambda db: start_workers(db, ssh, args.name, args.workers, env, args.countries)
    )
    _out(
        args,
        {"host": args.name, "pid": pid, "workers": args.workers},
        f"started {args.workers} worker(s) on {args.name} (pid {pid}); `fleet status` to watch",
    )
    return EXIT_OK


def cmd_fleet_stop(args: argparse.Namespace) -> int:
    from engine.fleet.workers import stop_all, stop_workers

    if not args.all and not args.name:
        raise UserError("name a host, or --all")
    ssh = _ssh(args)
    if args.all:
        stopped = _run(args, lambda db: stop_all(db, ssh, args.wait))
    else:
        stopped = {args.name: _run(args, lambda db: stop_workers(db, ssh, args.name, args.wait))}
    human = "\n".join(f"{h}: stopped {n} worker(s)" for h, n in stopped.items())
    _out(args, stopped, human or "no hosts")
    return EXIT_OK


def cmd_fleet_status(args: argparse.Namespace) -> int:
    from engine.fleet.workers import fleet_status

    rows = _run(args, fleet_status)
    obj = [
        {
            "host": h.name,
            "ssh": h.ssh_target,
            "launches": h.launches,
            "workers": [w.__dict__ for w in h.workers],
        }
        for h in rows
    ]
    lines = []
    for h in rows:
        lines.append(f"{h.name} ({h.ssh_target}): {len(h.workers)} live worker(s)")
        for w in h.workers:
            age = "-" if w.heartbeat_age_s is None else f"{w.heartbeat_age_s:.0f}s"
            lines.append(
                f"  pid {w.pid:<8} {w.status:<9} heartbeat {age:>5} ago  "
                f"{w.items_done:,} items  {w.countries or 'any':<9} {w.worker_id}"
            )
    _out(args, obj, "\n".join(lines) or "no hosts: add one with `hosts add`")
    return EXIT_OK


def cmd_fleet_logs(args: argparse.Namespace) -> int:
    import sys

    from engine.fleet import logs
    from engine.fleet.env import secret_values
    from engine.fleet.hosts import get_host
    from engine.fleet.ssh import SshError

    if args.follow and args.json:
        raise UserError("--json prints one object at the end: it cannot --follow")
    ssh, hide = _ssh(args), secret_values(worker_env(args))

    def find(db: Any) -> tuple[Any, Any]:
        host = get_host(db, args.name)
        return host, logs.find_launch(db, ssh, args.name, args.launch, args.worker)

    host, launch = _run(args, find)
    if not args.follow:
        lines = _run(args, lambda db: logs.last_lines(ssh, host, launch, args.lines, hide))
        obj = {"host": host.name, "pid": launch.pid, "log": launch.log_path, "lines": lines}
        _out(args, obj, "\n".join(lines))
        return EXIT_OK
    print(f"{host.name}: launch {launch.pid}, {launch.log_path} (Ctrl-C ends)", file=sys.stderr)
    stream = logs.follow(ssh, host, launch, args.lines, hide)
    try:
        for line in stream:
            print(line, flush=True)
    except KeyboardInterrupt:
        pass
    except SshError as exc:  # the link dropped
        raise UserError(str(exc)) from None
    finally:
        stream.close()  # ends the remote tail and ssh
    return EXIT_OK


def _opts(sp: argparse.ArgumentParser, ssh: bool = True) -> None:
    sp.add_argument("--db", help="database URL (where the fleet's hosts are kept)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    if ssh:
        sp.add_argument("--ssh-config", help="ssh_config file instead of ~/.ssh/config")


def _worker_db_opt(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--worker-db",
        help="the database URL as the host reaches it (default: FETCHFLEET_WORKER_DB, else "
        "--db); sent over the ssh channel, never on a command line",
    )


def add_commands(sub: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    h = sub.add_parser(
        "hosts",
        help="the fleet's machines: add, list, test, remove",
        description="Machines that run workers started over ssh, kept in the "
        "database so every console and CLI sees them.\n\n" + FLEET_HELP,
        formatter_class=fmt,
    )
    hs = h.add_subparsers(dest="hosts_cmd", required=True, metavar="ACTION")
    a = hs.add_parser("add", help="add a host")
    _opts(a, ssh=False)
    a.add_argument("name", help="the fleet's name for it (workers register under it)")
    a.add_argument("--ssh", required=True, help="an ssh_config alias or [user@]host[:port]")
    a.add_argument(
        "--python",
        default=".venv/bin/python",
        help="Python there, relative to --workdir or absolute (.venv/bin/python)",
    )
    a.add_argument(
        "--workdir",
        default="fetchfleet",
        help="the project directory there, relative to the login directory or "
        "absolute (fetchfleet)",
    )
    a.add_argument(
        "--countries",
        metavar="LIST",
        help='what its workers serve, e.g. "Argentina,Russia" or AR,RU: they claim only tasks '
        "of these countries (and of none); `fleet start --countries` overrides it "
        "(default: every country)",
    )
    a.set_defaults(func=cmd_hosts_add)
    ls = hs.add_parser("list", help="list the hosts")
    _opts(ls, ssh=False)
    ls.set_defaults(func=cmd_hosts_list)
    t = hs.add_parser(
        "test",
        help="check a host: ssh, Python, the project, the database",
        description="Runs a probe there over ssh; exit 1 when a check fails.",
    )
    _opts(t)
    _worker_db_opt(t)
    t.add_argument("name", nargs="?")
    t.add_argument("--all", action="store_true", help="every host")
    t.set_defaults(func=cmd_hosts_test)
    r = hs.add_parser("remove", help="remove a host (stop its workers first)")
    _opts(r, ssh=False)
    r.add_argument("name")
    r.set_defaults(func=cmd_hosts_remove)

    d = sub.add_parser(
        "deploy",
        help="copy the committed project to a host and install it there",
        description="Streams `git archive REF` over ssh into the host's work directory "
        "(committed files only: no .venv, no data/), writes the commit id to "
        ".fetchfleet-version there, then runs `./run.sh install` there (a .venv with "
        "requirements.txt, from the package registries the host's pip uses). Workers "
        "take tasks only of runs started by their own version.\n\n" + FLEET_HELP,
        formatter_class=fmt,
    )
    _opts(d)
    d.add_argument("name", help="a host added with `hosts add`")
    d.add_argument("--ref", default="HEAD", help="the commit to deploy (HEAD)")
    d.add_argument(
        "--no-install", action="store_true", help="copy only; keep the host's packages as they are"
    )
    d.add_argument(
        "--base-python",
        default="python3",
        help="the Python there that creates .venv on install (python3)",
    )
    d.set_defaults(func=cmd_deploy)

    f = sub.add_parser(
        "fleet",
        help="start, stop and watch workers on the hosts over ssh",
        description="Workers started over ssh on the hosts (`hosts add`); they "
        "join the PostgreSQL queue like `engine.run worker`.\n\n" + FLEET_HELP,
        formatter_class=fmt,
    )
    fs = f.add_subparsers(dest="fleet_cmd", required=True, metavar="ACTION")
    s = fs.add_parser("start", help="start N workers on a host (detached; they outlive ssh)")
    _opts(s)
    _worker_db_opt(s)
    s.add_argument("name")
    s.add_argument("--workers", type=int, default=1, help="worker processes (1)")
    s.add_argument(
        "--countries",
        metavar="LIST",
        help="the countries these workers serve, instead of the host's (`hosts add "
        "--countries`); any: every country",
    )
    s.add_argument(
        "--env",
        action="append",
        metavar="NAME",
        help="pass this variable of this environment to the workers (an API token), repeatable",
    )
    s.set_defaults(func=cmd_fleet_start)
    st = fs.add_parser("stop", help="SIGTERM a host's workers and wait until they signed off")
    _opts(st)
    st.add_argument("name", nargs="?")
    st.add_argument("--all", action="store_true", help="every host")
    st.add_argument("--wait", type=float, default=60.0, help="seconds to wait (60)")
    st.set_defaults(func=cmd_fleet_stop)
    lg = fs.add_parser(
        "logs",
        help="show (or --follow) the log of a worker launch on a host",
        description="The last lines of a launch's log on the host (default: its newest "
        "launch), read over ssh; --follow keeps printing new lines until Ctrl-C.",
    )
    _opts(lg)
    lg.add_argument("name")
    which = lg.add_mutually_exclusive_group()
    which.add_argument("--launch", type=int, metavar="PID", help="the launch's pid (fleet start)")
    which.add_argument("--worker", type=int, metavar="PID", help="a worker's pid (fleet status)")
    lg.add_argument("--lines", type=int, default=50, help="how many of the last lines (50)")
    lg.add_argument("--follow", "-f", action="store_true", help="then print new lines")
    lg.set_defaults(func=cmd_fleet_logs)
    ss = fs.add_parser("status", help="the hosts and their live workers")
    _opts(ss, ssh=False)
    ss.set_defaults(func=cmd_fleet_status)
