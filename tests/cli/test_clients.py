"""`detox jobs ...` and `detox versions ...` against a live `detox api` (uvicorn subprocess, SQLite
under a temporary DETOX_HOME, Redis broker; no worker, so jobs stay queued)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.conftest import closed_port
from tests.cli.servers import detox, running_api
from tests.instances import CASE_ID, safeedit_instance


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_api(tmp_path_factory.mktemp("home")) as url:
        yield url


@pytest.fixture
def cases(tmp_path: Path) -> Path:
    path = tmp_path / "cases.json"
    path.write_text(json.dumps([safeedit_instance()]))
    return path


def test_lists_as_json(server):
    jobs = detox(server, "jobs", "list", "--json")
    assert jobs.returncode == 0, jobs.stderr
    assert set(json.loads(jobs.stdout)) == {"data", "next_cursor"}
    versions = detox(server, "versions", "list", "--json")
    assert versions.returncode == 0 and json.loads(versions.stdout) == {"data": []}


def test_missing_version_is_one_line_and_nonzero(server):
    done = detox(server, "versions", "show", "nope")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0
    assert "no version named 'nope'" in done.stderr


def test_submit_show_cancel_watch(server, cases):
    submitted = detox(
        server, "jobs", "submit", cases, "--case", CASE_ID, "--name", "cli-1",
        "--params", '{"steps": 2, "preset": "contrastive"}', "--json",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["status"] == "queued" and job["kind"] == "dinm"
    shown = json.loads(detox(server, "jobs", "show", job["id"], "--json").stdout)
    assert shown["id"] == job["id"]
    cancelled = detox(server, "jobs", "cancel", job["id"], "--json")
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    watched = detox(server, "jobs", "watch", job["id"], "--json")
    assert watched.returncode == 1  # ended, but not succeeded
    assert json.loads(watched.stdout)["status"] == "cancelled"
    table = detox(server, "jobs", "list")
    assert table.returncode == 0 and job["id"][:8] in table.stdout


def test_submit_of_several_cases_or_all_sends_one_job(server, tmp_path):
    path = tmp_path / "two.json"
    path.write_text(json.dumps([safeedit_instance(), safeedit_instance(id="t2")]))
    for choice in (["--case", "t2", "--case", CASE_ID], ["--all"]):
        submitted = detox(server, "jobs", "submit", path, *choice, "--json")
        assert submitted.returncode == 0, submitted.stderr
        assert json.loads(submitted.stdout)["status"] == "queued"
    neither = detox(server, "jobs", "submit", path)
    assert neither.returncode == 2 and "--case ID (repeatable) or --all" in neither.stderr


def test_input_errors_exit_2_with_one_line(server, cases):
    bad_lr = detox(server, "jobs", "submit", cases, "--case", CASE_ID, "--params", '{"lr": 0}')
    assert bad_lr.returncode == 2 and "params.lr" in bad_lr.stderr
    assert bad_lr.stderr.strip().count("\n") == 0
    bad_case = detox(server, "jobs", "submit", cases, "--case", "zz")
    assert bad_case.returncode == 2 and "unknown case 'zz'" in bad_case.stderr
    unknown = detox(server, "jobs", "show", "no-such-job")
    assert unknown.returncode == 2 and "no job" in unknown.stderr


def test_unreachable_server_exits_1():
    done = detox(f"http://127.0.0.1:{closed_port()}", "jobs", "list")
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
