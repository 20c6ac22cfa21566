"""The one Settings object. Every field can be set as FETCHFLEET_<NAME> or in a .env file;
CLI flags override it for one command. It is passed in explicitly, never read globally."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.jobs.params import BATCH_SIZE, BatchSize


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FETCHFLEET_", env_file=".env", extra="ignore")

    db: str | None = Field(None, description="Database URL; see storage.db.resolve_db_url.")
    data_dir: Path = Field(Path("data"), description="Where the DuckDB file and keys live.")
    secret_key: str | None = Field(
        None, description="Fernet key encrypting proxy passwords; the same on every machine."
    )
    secret_key_file: Path = Field(
        Path("data/secret.key"), description="Used (and created) when secret_key is unset."
    )
    workers: int = Field(
        2,
        ge=0,
        le=256,
        description="Local worker processes (0: only standalone workers, PostgreSQL).",
    )
    concurrency: int = Field(200, ge=1, le=10_000, description="Items in flight per worker.")
    # The runs' default; its bounds are the run parameter's (engine.jobs.params).
    batch_size: BatchSize = Field(BATCH_SIZE, description="Items per task.")
    max_attempts: int = Field(3, ge=1, le=100, description="Tries per task before it fails.")
    retry_backoff_s: float = Field(2.0, ge=0, description="First retry delay; doubles after.")
    max_lost_leases: int = Field(
        5,
        ge=1,
        le=1000,
        description="Times a task's worker may die or go silent while holding it (its lease "
        "lost) before the task fails: a task that crashes or wedges every worker that takes "
        "it fails with the reason instead of coming back for ever. A lost lease uses no "
        "attempt (max_attempts).",
    )
    lease_s: float = Field(
        30.0,
        gt=0,
        description="A task returns to the queue when its "
        "worker has not heartbeated for this long.",
    )
    heartbeat_s: float = Field(3.0, gt=0, description="How often workers heartbeat.")
    flush_s: float = Field(0.5, gt=0, description="How often buffered results are stored.")
    check_timeout_s: float = Field(5.0, gt=0, description="Proxy check timeout per attempt.")
    judge_url: str | None = Field(None, description="Judge for proxy checks (httpbin or azenv).")
    keep_uploads: bool = Field(
        False,
        description="Keep pasted and uploaded lists (data/uploads) after their run is done; "
        "by default a run's uploads are deleted once it completes, fails, stops or is cancelled.",
    )
    ssh_config: Path | None = Field(
        None,
        description="An ssh_config file the fleet's ssh uses instead of ~/.ssh/config "
        "(FETCHFLEET_SSH_CONFIG; `ssh -F`).",
    )
    worker_db: str | None = Field(
        None,
        description="The database URL remote workers get, when the hosts reach PostgreSQL at "
        "another address than this machine does (FETCHFLEET_WORKER_DB).",
    )
    scheduler: bool = Field(
        True,
        description="The console's server fires due schedules (FETCHFLEET_SCHEDULER=0: leave "
        "it to `engine.run scheduler`; several schedulers on one PostgreSQL are safe).",
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="The console's server also serves /metrics (Prometheus) on this port of "
        "127.0.0.1 (FETCHFLEET_METRICS_PORT); `engine.run metrics` does it standalone.",
    )
    stop_rules_every_s: float = Field(
        10.0,
        gt=0,
        description="Seconds between evaluations of the running runs' stop rules (in the "
        "coordinator's watchdog; one coordinator at a time on PostgreSQL).",
    )
    scheduler_poll_s: float = Field(
        5.0, gt=0, description="Seconds between a scheduler's looks for due schedules."
    )
    alerts: bool = Field(
        True,
        description="The console's server and `engine.run scheduler` deliver alerts "
        "(FETCHFLEET_ALERTS=0: leave it to another; several deliverers on one PostgreSQL "
        "send each delivery once).",
    )
    alerts_poll_s: float = Field(5.0, gt=0, description="Seconds between a deliverer's rounds.")
    alerts_timeout_s: float = Field(10.0, gt=0, description="Seconds a webhook may take to answer.")
    alerts_backoff_s: float = Field(
        5.0, gt=0, description="First retry delay of a failed delivery; doubles after."
    )
    alerts_backoff_max_s: float = Field(300.0, gt=0, description="Longest retry delay.")
    error_snapshots: int = Field(
        50,
        ge=0,
        le=1000,
        description="Error snapshots kept per scrape run: the first page (HTML, and a "
        "screenshot when a browser fetched it) of each distinct error kind; 0: none.",
    )
    alerts_retry_window_s: float = Field(
        3600.0, gt=0, description="How long after its event a delivery is retried."
    )
    proxy_history_n: int = Field(
        20,
        ge=1,
        le=1000,
        description="Checks and cascade uses kept per proxy (each): the window of its success "
        "ratios, latency and reliability (FETCHFLEET_PROXY_HISTORY_N; the same on every "
        "machine that stores results).",
    )
