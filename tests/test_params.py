"""Run parameters typed once per kind (engine.jobs.params): bounds and defaults on the models,
a bad value as a ParamError naming its field and flag, the CLI flags built from the fields,
prepare's own checks naming their field, and the console forms reading the same models."""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import pytest

from console import forms
from engine.cli.main import build_parser, main
from engine.jobs import get_kind
from engine.jobs.backfill.params import BackfillParams
from engine.jobs.params import ParamError, Params, add_param_flags, bounds, params_from_args
from engine.jobs.scrape.params import ScrapeParams
from engine.jobs.validate.params import ValidateParams
from engine.settings import Settings

JUDGE = "http://127.0.0.2:8080/get"
API = "http://127.0.0.3:9/u/{id}"


def problem(model: type[Params], **params: object) -> ParamError:
    with pytest.raises(ParamError) as info:
        model.build(params)
    return info.value


# --- the models ------------------------------------------------------------------------------


def test_defaults_come_from_the_model_then_the_settings() -> None:
    p = ValidateParams.build({"judge_url": JUDGE})
    assert (p.batch_size, p.timeout_s, p.limit) == (50, 5.0, None)
    s = Settings(batch_size=7, check_timeout_s=2.5, judge_url=JUDGE)
    p = ValidateParams.build({}, s)
    assert (p.batch_size, p.timeout_s, p.judge_url) == (7, 2.5, JUDGE)
    assert ValidateParams.build({"batch_size": 9, "timeout_s": None}, s).batch_size == 9
    b = BackfillParams.build({"ids_file": "x", "url_template": API, "rate_limit": "10/1s"})
    assert (b.timeout_s, b.item_attempts, b.burst, b.retry_backoff_s) == (10.0, 3, 1, 0.5)
    assert ScrapeParams.build({}).strategy == "adaptive"


def test_bounds_live_on_the_fields_and_settings_share_the_batch_size() -> None:
    assert bounds(ValidateParams, "batch_size") == {"ge": 1, "le": 100_000}
    assert bounds(BackfillParams, "batch_size") == bounds(ScrapeParams, "batch_size")
    assert bounds(BackfillParams, "item_attempts") == {"ge": 1, "le": 20}
    assert bounds(BackfillParams, "timeout_s") == bounds(ValidateParams, "timeout_s") == {"gt": 0}
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        Settings(batch_size=0)


def test_a_bad_value_names_its_field_and_flag() -> None:
    err = problem(BackfillParams, ids_file="x", url_template=API, rate_limit="10/1s",
                  item_attempts=30)  # fmt: skip
    assert err.field == "item_attempts" and err.flag == "--item-attempts"
    assert err.message == "requests per ID must be between 1 and 20, not 30"
    assert str(err) == "--item-attempts: requests per ID must be between 1 and 20, not 30"
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))  # e.g. across a process boundary
    assert (again.field, again.flag, str(again)) == (err.field, err.flag, str(err))

    err = problem(ValidateParams, judge_url=JUDGE, timeout_s=0, batch_size=0, status="dead")
    assert err.by_field() == {
        "batch_size": "the batch size must be between 1 and 100,000 items per task, not 0",
        "timeout_s": "the timeout must be more than 0 seconds, not 0",
        "status": "dead: the status must be one of 'untested', 'active', 'inactive' or 'tampering'",
    }
    assert "--timeout: the timeout" in str(err) and "--status dead:" in str(err)


def test_missing_unknown_and_frozen() -> None:
    err = problem(ValidateParams)
    assert err.field == "judge_url" and "a judge URL is required" in err.message
    assert str(err).startswith("--judge: ")
    err = problem(ValidateParams, judge_url=JUDGE, judges=["x"])
    assert err.field is None and "unknown parameter 'judges'" in str(err)
    p = ValidateParams.build({"judge_url": JUDGE})
    with pytest.raises(ValueError):
        p.batch_size = 3  # type: ignore[misc]


def test_field_validators_report_on_their_field() -> None:
    err = problem(ValidateParams, judge_url="ftp://judge")
    assert err.field == "judge_url" and "is not an http(s) URL" in err.message
    assert ScrapeParams.build({"methods": "HTTP, tor,http"}).methods == ("http", "tor")
    err = problem(ScrapeParams, methods="http,carrier-pigeon", max_pages=0)
    assert err.by_field().keys() == {"methods", "max_pages"}
    err = problem(BackfillParams, ids_file="x", url_template="http://x/users", rate_limit="abc",
                  headers=["Authorization=Bearer abc"], id_pattern="(")  # fmt: skip
    fields = err.by_field()
    assert "put {id} where the ID goes" in fields["url_template"]
    assert "write N/period" in fields["rate_limit"]
    assert "env:VARIABLE" in fields["headers"]
    assert "not a regular expression" in fields["id_pattern"]
    assert "--url-template 'http://x/users': put {id}" in str(err)


def test_the_rate_with_its_burst_and_headers_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = {"ids_file": "x", "url_template": API}
    err = problem(BackfillParams, **base, rate_limit="3/1s", burst=3)
    assert err.field == "rate_limit" and "must exceed the burst" in err.message
    err = problem(BackfillParams, **base, rate_limit="3/1s", headers=["X-Key=env:FF_NOT_SET_1"])
    assert err.field == "headers" and "FF_NOT_SET_1 is not set" in err.message
    monkeypatch.setenv("FF_PARAMS_TOKEN", "Bearer s3cret")
    p = BackfillParams.build({**base, "rate_limit": "3/1s",
                              "headers": ["Authorization=env:FF_PARAMS_TOKEN", "Accept=x"]})  # fmt: skip
    stored = p.stored()
    assert stored["headers"] == [
        {"name": "Authorization", "env": "FF_PARAMS_TOKEN"},
        {"name": "Accept", "value": "x"},
    ]
    assert "s3cret" not in json.dumps(stored)
    assert BackfillParams.build(stored).stored() == stored  # the stored form reads back


# --- the CLI ---------------------------------------------------------------------------------


def test_flags_come_from_the_fields_with_their_defaults_in_the_help() -> None:
    parser = argparse.ArgumentParser()
    add_param_flags(parser, BackfillParams, exclude=("rate_key",))
    text = parser.format_help()
    assert "--item-attempts ITEM_ATTEMPTS" in text and "(default 3)" in text
    assert "--timeout SECONDS" in text and "(default 10)" in text
    assert "env FETCHFLEET_BATCH_SIZE" in text and "--rate-key" not in text
    assert "--retry-backoff" not in text  # cli=False
    args = parser.parse_args(["--ids", "a.txt", "--header", "A=b", "--header", "C=d",
                              "--item-attempts", "4"])  # fmt: skip
    assert params_from_args(BackfillParams, args) == {
        "ids_file": "a.txt", "headers": ["A=b", "C=d"], "item_attempts": 4,
    }  # fmt: skip
    validate = argparse.ArgumentParser()
    add_param_flags(validate, ValidateParams)
    assert validate.parse_args(["--type", "socks5", "--limit", "3"]).limit == 3
    with pytest.raises(SystemExit):  # the choices are the Literal's
        validate.parse_args(["--status", "dead"])


def test_every_kind_keeps_its_flags(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    expected = {
        "validate": "--proxies --judge --revalidate --minutes-old --status --type "
        "--older-than-hours --limit --every --rounds --batch-size --timeout --workers",
        "scrape": "--spec --country --methods --max-pages --proxies --strategy --files-dir "
        "--resume --batch-size --workers --concurrency",
        "backfill": "--ids --id-column --id-pattern --url-template --rate-limit --burst "
        "--rate-margin --rate-key --header --timeout --item-attempts --batch-size --resume "
        "--retry-failed --workers",
    }
    for kind, flags in expected.items():
        have = {o for a in sub.choices[kind]._actions for o in a.option_strings}
        assert set(flags.split()) <= have, (kind, set(flags.split()) - have)
        assert get_kind(kind, Settings()).params_model.kind == kind
    help_text = sub.choices["validate"].format_help()
    assert "{untested,active,inactive,tampering}" in help_text and "default 5" in help_text


def test_the_cli_exits_2_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("a\n")
    base = ["backfill", "--db", str(tmp_path / "x.duckdb"), "--ids", str(ids)]
    code = main([*base, "--url-template", API, "--rate-limit", "10/1s", "--item-attempts", "0"])
    assert code == 2
    assert (
        "error: --item-attempts: requests per ID must be between 1 and 20"
        in capsys.readouterr().err
    )
    code = main([*base, "--url-template", API, "--rate-limit", "10/1s", "--id-column", "did"])
    assert code == 2 and "--id-column did: not in the header" in capsys.readouterr().err
    code = main(["validate", "--db", str(tmp_path / "x.duckdb"), "--judge", JUDGE,
                 "--batch-size", "0", "--proxies", str(ids)])  # fmt: skip
    assert code == 2 and "--batch-size: the batch size must be between" in capsys.readouterr().err
    assert not (tmp_path / "x.duckdb").exists()  # refused before any database was opened


# --- prepare's own checks --------------------------------------------------------------------


def test_prepare_raises_param_errors_naming_the_field(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    with pytest.raises(ParamError) as info:
        get_kind("validate", s).prepare({"judge_url": JUDGE, "proxies_file": str(tmp_path / "no")})
    assert info.value.field == "proxies_file" and str(info.value).startswith("--proxies ")
    with pytest.raises(ParamError) as info:
        get_kind("validate", s).prepare({"judge_url": JUDGE})
    assert info.value.field is None and "nothing to validate" in str(info.value)

    table = tmp_path / "ids.csv"
    table.write_text("name,did\nx,1\n")
    with pytest.raises(ParamError) as info:
        get_kind("backfill", s).prepare(
            {"ids_file": str(table), "url_template": API, "rate_limit": "10/1s"}
        )
    assert info.value.field == "ids_file" and "--id-column" in info.value.message

    spec = tmp_path / "s.toml"
    spec.write_text(
        'name = "s"\n[[sources]]\ncountry = "Malaysia"\nstart_urls = ["http://127.0.0.4:1/"]\n'
        '[follow]\ncss = ["a"]\n'
    )
    with pytest.raises(ParamError) as info:
        get_kind("scrape", s).prepare({"spec": str(spec), "country": "Peru"})
    assert info.value.field == "country"
    assert str(info.value) == "--country Peru: the spec has sources for Malaysia"
    assert info.value.text() == "Peru: the spec has sources for Malaysia"
    prepared = get_kind("scrape", s).prepare({"spec": str(spec), "methods": "http"})
    assert prepared["methods"] == ["http"] and prepared["countries"] == ["Malaysia"]
    assert "spec" not in prepared and json.dumps(prepared)


# --- the console forms -----------------------------------------------------------------------


def test_console_forms_read_the_models() -> None:
    s = Settings(batch_size=25)
    assert forms.number_field(ValidateParams, "batch_size", s)["value"] == 25
    field = forms.number_field(BackfillParams, "item_attempts")
    assert field["value"] == 3 and "at least 1, at most 20" in field["help"]
    res = forms.check_validation(
        source="paste", has_list=True, judge_url=JUDGE, timeout_s=1.0, batch_size=100_001,
        workers=1, concurrency=10, duckdb=True,
    )  # fmt: skip
    assert res.errors == {
        "batch_size": "the batch size must be between 1 and 100,000 items per task, not 100,001"
    }
    ok = dict(source="paste", has_list=True, judge_url=JUDGE, timeout_s=1.0, batch_size=10,
              workers=1, concurrency=10, duckdb=True)  # fmt: skip
    assert "canary_url" not in forms.check_validation(**ok).params  # the judge's own
    assert forms.check_validation(**ok, canary_url=" off ").params["canary_url"] == "off"
    bad = forms.check_validation(**ok, canary_url="ftp://x/")
    assert "not a plain http:// URL" in bad.errors["canary_url"]
    res = forms.check_backfill(
        url_template=API, rate_limit="10/1s", burst=1, headers="", timeout_s=1.0,
        item_attempts=21, batch_size=10, workers=1, concurrency=10, duckdb=True,
    )  # fmt: skip
    assert res.errors == {"item_attempts": "requests per ID must be between 1 and 20, not 21"}
    err = ParamError("x: no such file", "ids_file")
    assert forms.param_errors(err) == {"ids_file": "x: no such file"}
    assert forms.param_errors(ParamError("nothing to do")) == {forms.GENERAL: "nothing to do"}
