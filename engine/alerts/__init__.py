"""Alerts: webhooks told about run ends, auto-stops, missed schedules, lost workers and a
low proxy pool — each event delivered once.

``events`` names the events and writes their one-line summaries; ``record`` puts an event
in the outbox (``emit``: what other engine parts call) with one pending delivery per alert
that wants it; ``sweep`` finds the events nobody emitted (a crash between a run's end and
its hook, the watchdog's dead workers, the scheduler's missed fires, the pool's size);
``webhook`` resolves, checks and redacts URLs and sends one POST; ``deliver`` claims
pending deliveries under a lease and retries them with backoff; ``service`` is what the CLI
and the console do (add, list, test, remove, recent).
"""

from engine.alerts.record import emit, runs_ended

__all__ = ["emit", "runs_ended"]
