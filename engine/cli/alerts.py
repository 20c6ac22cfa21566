"""``alerts``: webhooks told about run ends, auto-stops, missed schedules, lost workers and a
low proxy pool (``alerts add NAME --url-env VAR``, list, test, remove, recent, deliver)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from engine.cli.common import EXIT_NOT_COMPLETED, EXIT_OK, UserError, emit, open_db, settings_from


def _with_db(args: argparse.Namespace, fn: Any) -> Any:
    from engine.alerts.service import AlertError

    db = open_db(args)
    try:
        return fn(db)
    except AlertError as exc:
        raise UserError(str(exc)) from None
    finally:
        db.dispose()


def _alert_dict(a: Any) -> dict[str, Any]:
    from engine.alerts.webhook import describe

    return {
        "name": a.name,
        "target": describe(a.url, a.url_env),
        "url_env": a.url_env,
        "events": list(a.events),
        "pool_below": a.pool_below,
        "enabled": a.enabled,
    }


def _stamp(t: Any) -> str | None:
    return t.isoformat(timespec="seconds") + "Z" if t is not None else None


def cmd_add(args: argparse.Namespace) -> int:
    from engine.alerts.service import add_alert

    added = _with_db(
        args,
        lambda db: add_alert(db, args.name, args.url, args.url_env, args.events, args.pool_below),
    )
    for w in added.warnings:
        print(f"warning: {w}", file=sys.stderr)
    d = _alert_dict(added.alert)
    emit(args, d, f"alert {d['name']}: {d['target']} on {', '.join(d['events'])}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from engine.alerts.service import list_alerts

    rows = [_alert_dict(a) for a in _with_db(args, list_alerts)]
    lines = [
        f"{d['name']:<20} {d['target']:<32} {', '.join(d['events'])}"
        + (f" (pool below {d['pool_below']})" if d["pool_below"] else "")
        for d in rows
    ]
    emit(args, rows, "\n".join(lines) or "no alerts: add one with `alerts add NAME --url-env VAR`")
    return EXIT_OK


def cmd_remove(args: argparse.Namespace) -> int:
    from engine.alerts.service import remove_alert

    _with_db(args, lambda db: remove_alert(db, args.name))
    emit(args, {"removed": args.name}, f"removed alert {args.name} (its past events stay)")
    return EXIT_OK


def cmd_test(args: argparse.Namespace) -> int:
    """Send a test event now; exit 0 only when the receiver answered 2xx."""
    from engine.alerts.service import send_test

    settings = settings_from(args)
    out = _with_db(args, lambda db: send_test(db, settings, args.name))
    d = {
        "alert": out.alert,
        "id": out.uid,
        "status": out.status,
        "http_status": out.http_status,
        "error": out.error,
    }
    human = (
        f"alert {out.alert}: HTTP {out.http_status}"
        if out.http_status
        else f"alert {out.alert}: no answer"
    )
    human += f" ({out.status})" + (f": {out.error}" if out.error else "")
    emit(args, d, human)
    return EXIT_OK if out.status == "delivered" else EXIT_NOT_COMPLETED


def recent_dicts(rows: list[Any]) -> list[dict[str, Any]]:
    return [
        {
            "id": r.uid,
            "event": r.event,
            "subject": r.subject,
            "at": _stamp(r.event_at),
            "text": r.text,
            "alert": r.alert,
            "status": r.status,
            "attempts": r.attempts,
            "http_status": r.last_status,
            "error": r.last_error,
            "next_try_at": _stamp(r.next_try_at) if r.status == "pending" else None,
            "delivered_at": _stamp(r.delivered_at),
        }
        for r in rows
    ]


def cmd_recent(args: argparse.Namespace) -> int:
    from engine.alerts.service import recent

    rows = recent_dicts(_with_db(args, lambda db: recent(db, args.limit)))
    lines = []
    for d in rows:
        state = d["status"] or "-"
        if d["status"] == "pending" and d["attempts"]:
            state += f" (try {d['attempts'] + 1} at {d['next_try_at']})"
        lines.append(f"{d['at']} {d['event']:<17} {d['alert'] or '-':<16} {state}")
        lines.append(f"  {d['text']}" + (f"\n  last error: {d['error']}" if d["error"] else ""))
    emit(args, rows, "\n".join(lines) or "no alert events yet")
    return EXIT_OK


def cmd_deliver(args: argparse.Namespace) -> int:
    """Deliver pending alerts: ``--once`` one round, else until Ctrl-C/SIGTERM."""
    from engine.alerts.deliver import Deliverer

    settings = settings_from(args)
    db = open_db(args)
    try:
        deliverer = Deliverer(db, settings)
        if args.once:
            out = deliverer.run_once()
            lines = [
                f"{o.alert}: {o.event} {o.status}" + (f" ({o.error})" if o.error else "")
                for o in out
            ]
            emit(args, [o.__dict__ for o in out], "\n".join(lines) or "nothing to deliver")
            return EXIT_OK if all(o.status == "delivered" for o in out) else EXIT_NOT_COMPLETED
        stop = threading.Event()

        def on_signal(*_: Any) -> None:
            stop.set()
            deliverer.wake()

        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.signal(s, on_signal) for s in signals}
        try:
            print(f"delivering alerts (database {db.display_url}); Ctrl-C ends", file=sys.stderr)
            deliverer.run_forever(stop)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        return EXIT_OK
    finally:
        db.dispose()


def add_commands(sub: Any) -> None:
    from engine.alerts.events import EVENTS
    from engine.cli.common import common_opts

    s = sub.add_parser(
        "alerts",
        help="webhooks on run ends, missed schedules, lost workers, a low proxy pool",
        description="Alerts are kept in the database and delivered by the console's server, "
        "`engine.run scheduler` or `alerts deliver`: a JSON POST (Slack-compatible `text` "
        "plus generic fields), retried with backoff, each event once.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  export OPS_SLACK_URL=https://hooks.slack.com/services/…\n"
        "  python -m engine.run alerts add ops --url-env OPS_SLACK_URL "
        "--events run_failed,worker_lost",
    )
    ss = s.add_subparsers(dest="alerts_cmd", required=True, metavar="ACTION")
    a = ss.add_parser("add", help="add a webhook alert")
    common_opts(a)
    a.add_argument("name", help="letters, digits, - _ .")
    where = a.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--url-env",
        metavar="VAR",
        help="the environment variable holding the webhook URL (its name is stored, never "
        "its value): for any URL with a token in it",
    )
    where.add_argument(
        "--url", help="a literal webhook URL without credentials (stored in the database)"
    )
    a.add_argument(
        "--events",
        help=f"comma-separated, from: {', '.join(EVENTS)} (default: all but pool_low)",
    )
    a.add_argument(
        "--pool-below",
        type=int,
        metavar="N",
        help="pool_low: alert when fewer than N proxies are active (adds pool_low)",
    )
    a.set_defaults(func=cmd_add)
    ls = ss.add_parser("list", help="the alerts, their targets (never a secret) and events")
    common_opts(ls)
    ls.set_defaults(func=cmd_list)
    for action, fn, text in (
        ("test", cmd_test, "send a test event now; prints the receiver's HTTP status"),
        ("remove", cmd_remove, "remove an alert (its past events stay)"),
    ):
        p = ss.add_parser(action, help=text)
        common_opts(p)
        p.add_argument("name")
        p.set_defaults(func=fn)
    r = ss.add_parser("recent", help="recent alert events and their delivery status")
    common_opts(r)
    r.add_argument("--limit", type=int, default=30, help="events shown (30)")
    r.set_defaults(func=cmd_recent)
    d = ss.add_parser(
        "deliver",
        help="deliver pending alerts here until Ctrl-C (the console's server does it too)",
    )
    common_opts(d)
    d.add_argument("--once", action="store_true", help="one round: record, send what is due, exit")
    d.set_defaults(func=cmd_deliver)
