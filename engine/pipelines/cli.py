"""``engine.run pipeline``: run a Python pipeline (engine.pipelines.runner) from the command line.

    python -m engine.run pipeline MODULE:NAME | FILE.py[:NAME] [--country C] [--db URL] [--json]
    python -m engine.run pipeline --resume RUN_ID
    python -m engine.run pipeline MODULE | FILE.py --list

The run keeps the reference (module, or the file's absolute path, and the pipeline's name) in
its parameters, so ``--resume`` finds the same pipeline. Exit codes as everywhere: 0 the run
completed, 1 it ended otherwise, 2 bad input, 130 aborted. Ctrl-C (or SIGTERM) stops
gracefully: the current step is stopped at its next ``check_stop()`` (a script gets
SIGTERM) and the run is ``stopped``, resumable; a second Ctrl-C aborts.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "pipeline",
        help="run a Python pipeline (named steps, scripts as steps)",
        description="Run the steps of a pipeline defined in Python (engine.pipelines.runner) in "
        "order, recording each; --resume continues a run at the step where it stopped. "
        "REF is MODULE:NAME, MODULE, FILE.py or FILE.py:NAME (the name may be left out "
        "when the module defines one pipeline for the country).",
        epilog="Stop it with Ctrl-C or `python -m engine.run stop RUN_ID` from another "
        "terminal. Exit code 0 when the run completed, 1 otherwise, 2 for bad input.",
    )
    p.add_argument("ref", nargs="?", metavar="REF", help="MODULE:NAME or FILE.py[:NAME]")
    p.add_argument("--db", help="database URL or DuckDB path")
    p.add_argument(
        "--json", action="store_true", help="print one JSON summary at the end and nothing else"
    )
    p.add_argument("--country", help="the pipeline registered for this country")
    p.add_argument("--resume", type=int, metavar="RUN_ID", help="continue a pipeline run")
    p.add_argument("--list", action="store_true", help="list the pipelines REF defines")
    p.set_defaults(func=cmd_pipeline)


# --- finding pipelines -----------------------------------------------------------------------


def split_ref(ref: str) -> tuple[str, str | None]:
    """'pkg.mod:name' → ('pkg.mod', 'name'); 'dir/x.py' → ('dir/x.py', None)."""
    head, sep, tail = ref.rpartition(":")
    if sep and head and tail and "/" not in tail and not tail.endswith(".py"):
        return head, tail
    return ref, None


def load_module(where: str) -> tuple[ModuleType, str]:
    """Import a module by name or a file by path; returns it and how to find it again."""
    from engine.cli.common import UserError

    if where.endswith(".py") or "/" in where:
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"{where}: no such file")
        name = f"fetchfleet_pipelines_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
        if name in sys.modules:
            return sys.modules[name], str(path)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise UserError(f"{where}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise UserError(f"cannot load {where}: {type(exc).__name__}: {exc}") from None
        return module, str(path)
    try:
        return importlib.import_module(where), where
    except ImportError as exc:
        raise UserError(f"cannot import {where}: {exc}") from None
    except Exception as exc:
        raise UserError(f"cannot import {where}: {type(exc).__name__}: {exc}") from None


def module_pipelines(module: ModuleType) -> list[Any]:
    """Pipelines the module registered, and module-level Pipeline objects."""
    from engine.pipelines.runner import Pipeline, registered

    found = registered(module.__name__)
    for value in vars(module).values():
        if isinstance(value, Pipeline) and all(value is not p for p in found):
            found.append(value)
    return found


def choose(pipelines: list[Any], where: str, name: str | None, country: str | None) -> Any:
    from engine.cli.common import UserError

    listing = ", ".join(f"{p.name} ({p.country or 'any country'})" for p in pipelines) or "none"
    matches = [p for p in pipelines if name is None or p.name == name]
    if country:
        exact = [p for p in matches if p.country == country]
        matches = exact or [p for p in matches if p.country is None]
    if len(matches) == 1:
        return matches[0]
    what = f"{name!r}" if name else "a pipeline"
    if not matches:
        raise UserError(
            f"{where} has no pipeline {what}{f' for {country}' if country else ''}; it has: "
            f"{listing}"
        )
    raise UserError(
        f"{where} has several pipelines ({listing}): name one ({where}:NAME) or give --country"
    )


# --- the command -----------------------------------------------------------------------------


def cmd_pipeline(args: argparse.Namespace) -> int:
    from engine.cli.common import UserError, emit

    if args.resume is not None:
        if args.ref or args.country or args.list:
            raise UserError(
                f"--resume continues run {args.resume} with its own pipeline and country: "
                "drop REF, --country and --list"
            )
        return _run(args, None, None, None)
    if not args.ref:
        raise UserError("pipeline needs REF (MODULE:NAME or FILE.py) or --resume RUN_ID")
    where, name = split_ref(args.ref)
    module, found_at = load_module(where)
    pipelines = module_pipelines(module)
    if args.list:
        rows = [
            {"name": p.name, "country": p.country, "steps": p.step_names}
            for p in pipelines
            if name is None or p.name == name
        ]
        human = "\n".join(
            f"{r['name']:20} {r['country'] or '(any)':14} {' → '.join(r['steps'])}" for r in rows
        )
        emit(args, rows, human or f"{where} defines no pipeline")
        return 0
    pipeline = choose(pipelines, where, name, args.country)
    return _run(args, pipeline, f"{found_at}:{pipeline.name}", args.country)


def _run(args: argparse.Namespace, pipeline: Any, ref: str | None, country: str | None) -> int:
    from engine.cli.common import (
        EXIT_NOT_COMPLETED,
        EXIT_OK,
        UserError,
        emit,
        open_db,
        settings_from,
    )
    from engine.pipelines.runner import PipelineControl, PipelineError, run_pipeline
    from engine.runtime.control import ControlServer, control_path

    db = open_db(args)
    control = PipelineControl(db, settings=settings_from(args))
    server = None
    presses = 0

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal presses
        presses += 1
        if presses > 1:
            raise KeyboardInterrupt
        print(
            "\nstopping: the current step stops at its next check (a script gets SIGTERM); "
            "Ctrl-C again aborts",
            file=sys.stderr,
        )
        control.request_stop("cli ctrl-c" if signum == signal.SIGINT else "cli sigterm")

    def echo(step: str | None, stream: str, line: str) -> None:
        if not args.json:
            print(f"[{step or 'run'}]{' !' if stream == 'stderr' else ''} {line}", file=sys.stderr)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if pipeline is None:
            pipeline, ref, country = _for_resume(db, args.resume)
        if db.is_duckdb and db.engine.url.database not in (None, "", ":memory:"):
            server = ControlServer(control_path(db.engine.url.database), control)
            server.start()
        try:
            result = run_pipeline(
                db,
                pipeline,
                args.resume,
                country=country,
                ref=ref,
                control=control,
                on_line=echo,
            )
        except PipelineError as exc:
            raise UserError(str(exc)) from None
        summary = _summary(db, result, pipeline)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if server is not None:
            server.stop()
        db.dispose()
    emit(args, summary, format_pipeline(summary))
    return EXIT_OK if summary["status"] == "completed" else EXIT_NOT_COMPLETED


def _for_resume(db: Any, run_id: int) -> tuple[Any, str, str]:
    from engine.cli.common import UserError
    from storage.runs import get_run

    with db.connect() as conn:
        run = get_run(conn, run_id)
    if run is None:
        raise UserError(f"no run with id {run_id}: `python -m engine.run status` lists runs")
    if run.kind != "pipeline":
        raise UserError(f"run {run_id} is a {run.kind} run: `python -m engine.run resume {run_id}`")
    ref = run.params.get("ref")
    if not ref:
        raise UserError(
            f"run {run_id} was started from Python, not from a module or file: resume it "
            f"with engine.pipelines.run_pipeline(db, pipeline, resume_run_id={run_id})"
        )
    where, name = split_ref(ref)
    module, _ = load_module(where)
    pipeline = choose(module_pipelines(module), where, name, run.params.get("country"))
    return pipeline, ref, run.params.get("country")


def _summary(db: Any, result: Any, pipeline: Any) -> dict[str, Any]:
    from engine.summary import run_summary

    summary = run_summary(db, result.run_id)
    summary["pipeline"] = {"name": pipeline.name, "steps": result.steps}
    return summary


def format_pipeline(summary: dict[str, Any]) -> str:
    from engine.cli.common import format_summary

    lines = [format_summary(summary)]
    for s in summary["pipeline"]["steps"]:
        code = f", exit code {s['exit_code']}" if s["exit_code"] is not None else ""
        error = f": {s['error']}" if s["error"] else ""
        lines.append(f"  step {s['position'] + 1} {s['name']}: {s['status']}{code}{error}")
    return "\n".join(lines)
