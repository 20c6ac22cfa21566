"""The one schema, SQLAlchemy Core, shared by DuckDB and PostgreSQL.

Why the shapes below:
- DuckDB (duckdb-engine) has no SERIAL/IDENTITY: integer keys use a Sequence with a server
  default, so raw ``INSERT … SELECT`` bulk statements get ids too.
- Reflection is broken on duckdb-engine + SQLAlchemy 2.1, so the schema is model-first and
  changes are explicit, ordered steps in ``storage.migrations`` recorded in ``schema_version``.
- Timestamps are naive UTC (``TIMESTAMP``), stamped by the database clock where it matters
  (leases), so machines with skewed clocks agree.
- Secrets never land here: proxy passwords are stored encrypted (``password_enc``), and run
  parameters keep environment-variable *names*, never values.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()


def _id(table: str) -> tuple[sa.Sequence, sa.Column]:
    seq = sa.Sequence(f"{table}_id_seq", metadata=metadata)
    return seq, sa.Column(
        "id", sa.BigInteger, seq, server_default=seq.next_value(), primary_key=True
    )


def _created() -> sa.Column:
    return sa.Column("created_at", sa.DateTime, nullable=False)


schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", sa.DateTime, nullable=False),
    sa.Column("description", sa.String, nullable=False),
)

# Versions of the schema components that plugin kinds bring (``storage.migrations.Component``):
# one row per component and applied step. Created by core step 4.
component_versions = sa.Table(
    "component_versions",
    metadata,
    sa.Column("component", sa.String, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String, nullable=False),
    sa.Column("applied_at", sa.DateTime, nullable=False),
)

runs = sa.Table(
    "runs",
    metadata,
    _id("runs")[1],
    sa.Column("kind", sa.String, nullable=False),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("params", sa.Text, nullable=False),  # JSON, no secrets
    sa.Column("total_items", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("total_tasks", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("error", sa.Text),
    sa.Column("coordinator", sa.String),  # host:pid of the process that planned it
    sa.Column("code_version", sa.String),  # its coordinator's (engine.version); step 7
    _created(),
    sa.Column("started_at", sa.DateTime),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("updated_at", sa.DateTime),
)

tasks = sa.Table(
    "tasks",
    metadata,
    _id("tasks")[1],
    sa.Column("run_id", sa.BigInteger, nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("status", sa.String, nullable=False),  # queued, leased, done, failed, cancelled
    sa.Column("items", sa.Text, nullable=False),  # JSON list of item references
    sa.Column("n_items", sa.Integer, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("worker_id", sa.String),
    sa.Column("lease_token", sa.String),
    sa.Column("lease_until", sa.DateTime),
    sa.Column("available_at", sa.DateTime),  # retry backoff: not claimable before
    sa.Column("last_error", sa.Text),
    _created(),
    sa.Column("updated_at", sa.DateTime),
    # normal form (engine.countries): only workers serving it claim the task; NULL: any
    sa.Column("country", sa.String),
    # version 14: how often its holder died or went silent (engine.settings.max_lost_leases)
    sa.Column("lost_leases", sa.Integer, server_default="0"),
)
# Secondary indexes only on PostgreSQL: DuckDB scans columns fast and prunes by zone maps,
# while every ART index it keeps turns an UPDATE of an indexed column into delete+insert.
sa.Index("ix_tasks_run_status", tasks.c.run_id, tasks.c.status).ddl_if(dialect="postgresql")

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("host", sa.String, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("kind", sa.String, nullable=False),  # local, standalone, remote
    sa.Column("status", sa.String, nullable=False),  # starting, idle, busy, stopping, exited, dead
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("heartbeat_at", sa.DateTime),
    sa.Column("tasks_held", sa.String),  # comma-separated task ids
    sa.Column("items_done", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("items_failed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("exit_reason", sa.Text),
    sa.Column("countries", sa.String),  # what it claims: "IN,MY" (normal forms); NULL: any
    sa.Column("code_version", sa.String),  # the code it runs (engine.version); step 7
)

commands = sa.Table(
    "commands",
    metadata,
    _id("commands")[1],
    sa.Column("target_kind", sa.String, nullable=False),  # run, worker
    sa.Column("target_id", sa.String, nullable=False),
    sa.Column("action", sa.String, nullable=False),  # stop, pause, resume, cancel
    sa.Column("source", sa.String),  # who asked: cli host:pid, console
    _created(),
    sa.Column("handled_at", sa.DateTime),
    sa.Column("result", sa.Text),
)

errors = sa.Table(
    "errors",
    metadata,
    _id("errors")[1],
    sa.Column("run_id", sa.BigInteger),
    sa.Column("task_id", sa.BigInteger),
    sa.Column("worker_id", sa.String),
    sa.Column("item_key", sa.String),
    sa.Column("error_type", sa.String, nullable=False),
    sa.Column("message", sa.Text),
    _created(),
)
sa.Index("ix_errors_run", errors.c.run_id).ddl_if(dialect="postgresql")

proxies = sa.Table(
    "proxies",
    metadata,
    _id("proxies")[1],
    sa.Column("key", sa.String, nullable=False, unique=True),
    sa.Column("scheme", sa.String),  # as given; NULL when the line had none
    sa.Column("protocol", sa.String),  # the one that answered last
    sa.Column("host", sa.String, nullable=False),
    sa.Column("port", sa.Integer, nullable=False),
    sa.Column("username", sa.String),
    sa.Column("password_enc", sa.Text),  # Fernet token, never the password itself
    sa.Column("status", sa.String, nullable=False),  # untested, active, inactive
    sa.Column("anonymity", sa.String),
    sa.Column("exit_ip", sa.String),
    sa.Column("country", sa.String),
    sa.Column("latency_ms", sa.Float),
    sa.Column("latency_ewma_ms", sa.Float),
    sa.Column("success_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("failure_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("last_outcome", sa.String),
    sa.Column("last_error", sa.Text),
    sa.Column("last_checked", sa.DateTime),
    sa.Column("source", sa.String),
    _created(),
)
sa.Index("ix_proxies_status", proxies.c.status).ddl_if(dialect="postgresql")

# The proxies a scrape run routes through, copied from ``proxies`` when it is planned: every
# worker of the run, on any machine, reads the same pool from here (step 7).
run_proxies = sa.Table(
    "run_proxies",
    metadata,
    sa.Column("run_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("ord", sa.Integer, primary_key=True, autoincrement=False),  # pool order
    sa.Column("protocol", sa.String),
    sa.Column("scheme", sa.String),
    sa.Column("host", sa.String, nullable=False),
    sa.Column("port", sa.Integer, nullable=False),
    sa.Column("username", sa.String),
    sa.Column("password_enc", sa.Text),  # Fernet token, as in ``proxies``
)

proxy_checks = sa.Table(
    "proxy_checks",
    metadata,
    _id("proxy_checks")[1],
    sa.Column("run_id", sa.BigInteger, nullable=False),
    sa.Column("proxy_id", sa.BigInteger, nullable=False),
    sa.Column("task_id", sa.BigInteger),
    sa.Column("worker_id", sa.String),
    sa.Column("checked_at", sa.DateTime, nullable=False),
    sa.Column("outcome", sa.String, nullable=False),
    sa.Column("alive", sa.Boolean, nullable=False),
    sa.Column("protocol", sa.String),
    sa.Column("latency_ms", sa.Float),
    sa.Column("anonymity", sa.String),
    sa.Column("exit_ip", sa.String),
    sa.Column("country", sa.String),
    sa.Column("error", sa.Text),
)
sa.Index("ix_proxy_checks_checked_at", proxy_checks.c.checked_at).ddl_if(dialect="postgresql")
# Exactly-once per (run, proxy): on PostgreSQL a unique index (concurrent writers); on DuckDB
# the single writing process dedupes against stored rows in the same transaction, which
# costs far less than maintaining the index on every insert.
sa.Index(
    "uq_proxy_checks_run_proxy", proxy_checks.c.run_id, proxy_checks.c.proxy_id, unique=True
).ddl_if(dialect="postgresql")

# --- version 2: the backfill job and shared rate limits -------------------------------------

rate_limits = sa.Table(
    "rate_limits",
    metadata,
    sa.Column("key", sa.String, primary_key=True),  # an API origin, a domain, a --rate-key
    # GCRA's whole state: the theoretical arrival time, epoch seconds of the database clock
    sa.Column("tat", sa.Double, nullable=False, server_default="0"),
    sa.Column("updated_at", sa.DateTime),
    # the key's margin J (engine.ratelimit.margin) and when it was set, database clock
    sa.Column("margin", sa.Double, server_default="0"),
    sa.Column("margin_at", sa.Double, server_default="0"),
)

backfill_runs = sa.Table(
    "backfill_runs",
    metadata,
    sa.Column("run_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("lines", sa.BigInteger, nullable=False),  # lines (or CSV rows) read
    sa.Column("blank", sa.BigInteger, nullable=False),  # blank lines and # comments
    sa.Column("duplicates", sa.BigInteger, nullable=False),
    sa.Column("malformed", sa.BigInteger, nullable=False),  # each one in `errors` (bad_input)
    sa.Column("unique_ids", sa.BigInteger, nullable=False),  # = the run's items
    sa.Column("planned_at", sa.DateTime, nullable=False),
)

# The input set of a run, one row per valid line (duplicates flagged after import): planning
# dedupes here, in SQL, instead of holding a million IDs in memory, and `report` can prove
# the stored set equals it. No index on DuckDB (an in-memory ART would cost what the set
# would); PostgreSQL pages through it by (run_id, line_no).
backfill_inputs = sa.Table(
    "backfill_inputs",
    metadata,
    sa.Column("run_id", sa.BigInteger, nullable=False),
    sa.Column("line_no", sa.BigInteger, nullable=False),
    sa.Column("item_id", sa.String, nullable=False),
    sa.Column("dup", sa.Boolean, nullable=False, server_default=sa.false()),
)
sa.Index("ix_backfill_inputs_run_line", backfill_inputs.c.run_id, backfill_inputs.c.line_no).ddl_if(
    dialect="postgresql"
)

backfill_items = sa.Table(
    "backfill_items",
    metadata,
    _id("backfill_items")[1],
    sa.Column("run_id", sa.BigInteger, nullable=False),
    sa.Column("item_id", sa.String, nullable=False),
    sa.Column("status", sa.String, nullable=False),  # ok, failed
    sa.Column("outcome", sa.String, nullable=False),  # ok, not_found, server_error, …
    sa.Column("http_status", sa.Integer),  # of the last attempt; NULL when none answered
    sa.Column("body", sa.Text),  # the JSON response as received (ok items)
    sa.Column("error", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False),  # HTTP requests made for this item
    sa.Column("worker_id", sa.String),
    sa.Column("task_id", sa.BigInteger),
    sa.Column("fetched_at", sa.DateTime, nullable=False),  # when the last request was sent
    sa.Column("elapsed_ms", sa.Float),
    sa.UniqueConstraint("run_id", "item_id", name="uq_backfill_items_run_item"),
)

# --- version 3: the scrape job, pipelines -----------------------------------------------------

# The URL registry of a scrape run: one row per normalized URL (dedup), its fetch outcome.
# Items of scrape tasks are ids of this table; a URL is stored once (status leaves `queued`).
urls = sa.Table(
    "urls",
    metadata,
    _id("urls")[1],
    sa.Column("run_id", sa.BigInteger, nullable=False),
    sa.Column(
        "url", sa.Text, nullable=False
    ),  # normalized (see engine.jobs.scrape.spec.normalize_url)
    sa.Column("country", sa.String, nullable=False),  # of the spec source it came from
    sa.Column("depth", sa.Integer, nullable=False, server_default="0"),
    sa.Column("parent_id", sa.BigInteger),
    sa.Column("status", sa.String, nullable=False),  # queued, done, failed, blocked, disallowed
    sa.Column("method", sa.String),  # the fetch method that produced the page (or last tried)
    sa.Column("http_status", sa.Integer),
    sa.Column("bytes", sa.BigInteger),
    sa.Column("entities", sa.Integer),  # entities extracted from the page
    sa.Column("error_type", sa.String),
    sa.Column("error", sa.Text),
    sa.Column("fetched_at", sa.DateTime),
    _created(),
)
sa.Index("uq_urls_run_url", urls.c.run_id, urls.c.url, unique=True).ddl_if(dialect="postgresql")

# What was scraped, across runs: one row per (type, country, external id); the content hash
# tells a changed entity (its attributes are replaced) from one seen again (only last_seen).
entities = sa.Table(
    "entities",
    metadata,
    _id("entities")[1],
    sa.Column("entity_type", sa.String, nullable=False),
    sa.Column("country", sa.String, nullable=False),
    sa.Column("external_id", sa.String, nullable=False),
    sa.Column("content_hash", sa.String, nullable=False),
    sa.Column("source_url", sa.Text),
    sa.Column("first_run_id", sa.BigInteger),
    sa.Column("last_run_id", sa.BigInteger),
    sa.Column("first_seen", sa.DateTime, nullable=False),
    sa.Column("last_seen", sa.DateTime, nullable=False),
)
sa.Index(
    "uq_entities_type_country_ext",
    entities.c.entity_type,
    entities.c.country,
    entities.c.external_id,
    unique=True,
).ddl_if(dialect="postgresql")

entity_attributes = sa.Table(
    "entity_attributes",
    metadata,
    sa.Column("entity_id", sa.BigInteger, nullable=False),
    sa.Column("name", sa.String, nullable=False),
    sa.Column("value", sa.Text),
    sa.Column("value_type", sa.String, nullable=False),  # str, int, float, bool, url
)
sa.Index("ix_entity_attributes_entity", entity_attributes.c.entity_id).ddl_if(dialect="postgresql")

files = sa.Table(
    "files",
    metadata,
    _id("files")[1],
    sa.Column("run_id", sa.BigInteger, nullable=False),
    sa.Column("entity_id", sa.BigInteger),
    sa.Column("page_url", sa.Text),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("path", sa.Text),  # where the bytes are, relative to the files directory
    sa.Column("sha256", sa.String),
    sa.Column("bytes", sa.BigInteger),
    sa.Column("content_type", sa.String),
    sa.Column("status", sa.String, nullable=False),  # stored, too_large, failed
    sa.Column("error", sa.Text),
    _created(),
)

# Every attempt of every fetch of a scrape run (the cascade's `Attempt`s), proxies redacted.
fetch_logs = sa.Table(
    "fetch_logs",
    metadata,
    _id("fetch_logs")[1],
    sa.Column("run_id", sa.BigInteger),
    sa.Column("task_id", sa.BigInteger),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("method", sa.String, nullable=False),
    sa.Column("proxy", sa.String),
    sa.Column("status", sa.Integer),
    sa.Column("bytes", sa.BigInteger),
    sa.Column("ms", sa.Float),
    sa.Column("error_type", sa.String),
    sa.Column("blocked_reason", sa.String),
    sa.Column("country", sa.String),
    _created(),
    # version 9, cost accounting: the page's host[:port] (costs per domain), and on a page
    # got without a browser the browser domain learning spared it (``Attempt.avoided``)
    sa.Column("domain", sa.String),
    sa.Column("avoided", sa.String),
)
sa.Index("ix_fetch_logs_created", fetch_logs.c.created_at).ddl_if(dialect="postgresql")

# Pipelines (engine.pipelines.runner): which step a run is at, each step's outcome, and the run log
# (a script step's output, line by line).
pipeline_steps = sa.Table(
    "pipeline_steps",
    metadata,
    sa.Column("run_id", sa.BigInteger, nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("name", sa.String, nullable=False),
    sa.Column("status", sa.String, nullable=False),  # pending, running, done, failed, stopped
    sa.Column("started_at", sa.DateTime),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("exit_code", sa.Integer),
    sa.Column("message", sa.Text),
    sa.PrimaryKeyConstraint("run_id", "position", name="pk_pipeline_steps"),
)

run_logs = sa.Table(
    "run_logs",
    metadata,
    _id("run_logs")[1],
    sa.Column("run_id", sa.BigInteger, nullable=False),
    sa.Column("step", sa.String),
    sa.Column("stream", sa.String, nullable=False),  # stdout, stderr, engine
    sa.Column("line", sa.Text, nullable=False),
    _created(),
)
sa.Index("ix_run_logs_run", run_logs.c.run_id).ddl_if(dialect="postgresql")

# --- version 12: each proxy's quality over time ---------------------------------------------

# One row per proxy: its last N checks and its last N uses by the cascade, oldest first, as
# parallel lists (``storage.proxy_history``), and what follows from them. A bounded list in
# the proxy's row, not a row per event: one set-based UPDATE per stored batch touches only
# that batch's proxies, and the figures the console sorts by are plain columns.
proxy_quality = sa.Table(
    "proxy_quality",
    metadata,
    sa.Column("proxy_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("check_ok", sa.ARRAY(sa.SmallInteger)),  # 1 alive, 0 not
    sa.Column("check_ms", sa.ARRAY(sa.Double)),  # latency when alive, else NULL
    sa.Column("check_at", sa.ARRAY(sa.DateTime)),
    sa.Column("check_run", sa.ARRAY(sa.BigInteger)),  # a run's check counts once
    sa.Column("use_ok", sa.ARRAY(sa.SmallInteger)),  # 1: the site's answer came through
    sa.Column("use_ms", sa.ARRAY(sa.Double)),  # latency of a good use, else NULL
    sa.Column("use_at", sa.ARRAY(sa.DateTime)),
    sa.Column("checks_total", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("uses_total", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("checks_n", sa.Integer),  # in the lists (at most N)
    sa.Column("check_ok_n", sa.Integer),
    sa.Column("check_ratio", sa.Double),
    sa.Column("check_ms_median", sa.Double),
    sa.Column("check_ms_mean", sa.Double),
    sa.Column("uses_n", sa.Integer),
    sa.Column("use_ok_n", sa.Integer),
    sa.Column("use_ratio", sa.Double),
    sa.Column("use_ms_mean", sa.Double),
    sa.Column("reliability", sa.Double),  # Wilson lower bound over checks and uses
    sa.Column("updated_at", sa.DateTime),
)

# Version 13: the first page of each distinct error kind of a run (``storage.snapshots``):
# its HTML (cut at a cap; ``html_bytes`` is the size before) and, when a browser fetched it,
# a PNG screenshot. One row per (run, kind): the first writer wins across workers.
error_snapshots = sa.Table(
    "error_snapshots",
    metadata,
    _id("error_snapshots")[1],
    sa.Column("run_id", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.String, nullable=False),  # blocked:recaptcha, invalid_entity:price
    sa.Column("url", sa.Text, nullable=False),  # without userinfo
    sa.Column("method", sa.String),
    sa.Column("status", sa.Integer),
    sa.Column("message", sa.Text),
    sa.Column("html", sa.LargeBinary),
    sa.Column("html_bytes", sa.BigInteger),
    sa.Column("screenshot", sa.LargeBinary),  # PNG
    sa.Column("worker_id", sa.String),
    sa.Column("task_id", sa.BigInteger),
    sa.Column("captured_at", sa.DateTime),  # when the worker met the page
    _created(),
    sa.UniqueConstraint("run_id", "kind", name="uq_error_snapshots_run_kind"),
)

TABLES: dict[str, sa.Table] = {t.name: t for t in metadata.sorted_tables}
