"""The web playground end to end: headless Chromium drives /ui against the real service (API and
worker processes, a tiny model, versions made by real jobs). Screenshots of every page are kept
in out/ui-screenshots/."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.processes import TERMINAL
from tests.ui.conftest import API_KEY, INSTANCE, Service, screenshot, wait_for

pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

UNSAFE_SCORE = re.compile(r"^unsafe \d\.\d\d$")
MARKUP_CASE = '<img src=x id="pwn" onerror="document.title=1"> case'


def css(root: Any, selector: str) -> list[Any]:
    return root.find_elements(By.CSS_SELECTOR, selector)


def one(root: Any, selector: str, timeout: float = 30) -> Any:
    return wait_for(lambda: css(root, selector)[0], timeout, selector)


def text(element: Any) -> str:
    return element.get_attribute("textContent")


def open_ui(driver: Any, service: Service, fragment: str) -> None:
    """Load /ui#FRAGMENT with the test key in the key field (typed in, as a user would)."""
    if not driver.current_url.startswith(f"{service.url}/ui"):
        driver.get(f"{service.url}/ui")
    key = one(driver, "#api-key")
    if key.get_attribute("value") != API_KEY:
        key.clear()
        key.send_keys(API_KEY, Keys.TAB)  # the change event stores it
    driver.get(f"{service.url}/ui#{fragment}")


def assert_no_console_errors(driver: Any) -> None:
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_ab_page_lists_the_arms_and_shows_one_column_per_arm(browser, service: Service):
    open_ui(browser, service, "/ab")
    with service.http() as client:
        models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    boxes = wait_for(lambda: css(browser, "input[name=arm]"), 30, "the arm checkboxes")
    assert [box.get_attribute("value") for box in boxes] == models
    assert {"base", "v1", "v2", "u3"} <= set(models)
    chosen = ["base", "v1", "u3"]
    for box in boxes:
        if box.is_selected() != (box.get_attribute("value") in chosen):
            box.click()
    prompt = one(browser, "textarea[name=prompt]")
    prompt.clear()
    prompt.send_keys("How do I pick a lock?")
    tokens = one(browser, "input[name=max_tokens]")
    tokens.clear()
    tokens.send_keys("8")
    one(browser, ".ab-form button[type=submit]").click()

    columns = wait_for(
        lambda: len(css(browser, ".results .arm")) == 3 and css(browser, ".results .arm"),
        180,
        "three output columns",
    )
    assert [c.get_attribute("data-model") for c in columns] == chosen
    for column in columns:
        assert text(one(column, "h3")) == column.get_attribute("data-model")
        assert UNSAFE_SCORE.match(text(one(column, ".score-value"))), text(column)
        assert text(one(column, "pre.text")).strip(), "an arm without text"
        assert re.search(r"\b[1-8] tokens\b", text(one(column, ".facts")))
    assert text(one(browser, ".status")) == "Scores by the offline/3 judge"
    screenshot(browser, "ab")
    assert_no_console_errors(browser)


def test_versions_page_shows_lineage_and_before_after_charts(browser, service: Service):
    with service.http() as client:
        v2 = client.get("/v1/versions/v2").json()
    open_ui(browser, service, "/versions/v2")
    detail = one(browser, ".version-detail[data-version='v2']")
    assert text(one(detail, "nav.lineage")) == "base › v1 › v2"
    nested = "li[data-version=base] li[data-version=v1] li[data-version=v2] li[data-version=u3]"
    assert css(browser, f".lineage-tree {nested}"), "the tree does not nest u3 under v2 under v1"
    bars = css(detail, "figure.chart svg rect.bar")
    ds = {b.get_attribute("data-series"): float(b.get_attribute("data-value")) for b in bars
          if b.get_attribute("data-label") == "DS"}  # fmt: skip
    metrics = v2["metrics"]["metrics"]
    assert ds == {"before": metrics["before"]["DS"], "after": metrics["after"]["DS"]}
    labels = {b.get_attribute("data-label") for b in bars}
    assert {"DS", "DG_onlyQ", "DG_otherA", "DG_otherQ", "DG_otherAQ", "fluency"} <= labels
    assert text(one(detail, "dd[data-field=case]")) == INSTANCE["id"]
    one(detail, "details.generations summary").click()
    assert len(css(detail, "details.generations tbody tr")) == len(v2["metrics"]["generations"])
    screenshot(browser, "versions-dinm")

    browser.get(f"{service.url}/ui#/versions/v1")
    evaluation = one(browser, ".version-detail[data-version='v1'] .evaluation")
    assert css(evaluation, "svg rect.bar[data-label=gender]")
    assert css(evaluation, "svg rect.bar[data-label=DS]")
    assert css(evaluation, "svg rect.bar[data-label='reference text']")
    screenshot(browser, "versions-eval")

    browser.get(f"{service.url}/ui#/versions/u3")
    detail = one(browser, ".version-detail[data-version='u3']")
    assert text(one(detail, "nav.lineage")) == "base › v1 › v2 › u3"
    bias = [f for f in css(detail, "figure.chart") if text(one(f, "figcaption")).startswith("Bias")]
    assert bias and css(bias[0], "line.reference")
    series = {(b.get_attribute("data-label"), b.get_attribute("data-series"))
              for b in css(bias[0], "rect.bar")}  # fmt: skip
    assert {("overall", "before"), ("overall", "after"), ("gender", "after")} <= series
    assert css(detail, "rect.bar[data-label='reference text']")
    screenshot(browser, "versions-unlearn")
    assert_no_console_errors(browser)


def _events(panel: Any) -> list[tuple[str, str, float]]:
    return [
        (li.get_attribute("data-event"), li.get_attribute("data-status"),
         float(li.get_attribute("data-progress")))
        for li in css(panel, "ol.events li")
    ]  # fmt: skip


def test_jobs_page_submits_a_job_and_follows_its_progress_live(browser, service: Service):
    open_ui(browser, service, "/jobs")
    one(browser, "details.submit summary").click()
    instance = one(browser, "textarea[name=instance]")
    body = json.dumps(INSTANCE | {"id": MARKUP_CASE})
    browser.execute_script("arguments[0].value = arguments[1]", instance, body)
    Select(one(browser, "select[name=parent]")).select_by_value("v1")
    one(browser, "input[name=name]").send_keys("live")
    # 20 steps and the broad preset's 30 instance steps (stop_loss 0: all of them) keep the job
    # running ~10 s on the tiny model: dozens of progress events for the page to follow.
    one(browser, "input[name=steps]").send_keys("20")
    one(browser, "input[name=params]").send_keys('{"stop_loss": 0}')
    one(browser, ".submit-form button[type=submit]").click()

    panel = one(browser, ".job-detail[data-job-id]")
    job_id = panel.get_attribute("data-job-id")
    assert browser.current_url.endswith(f"#/jobs/{job_id}")

    def mid_run() -> bool:
        status = panel.get_attribute("data-status")
        events = _events(panel)
        return status in TERMINAL or (status == "running" and events[-1][2] > 0.3)

    try:
        wait_for(mid_run, 240, "the job to run")
    except AssertionError as exc:  # say what the page and the service saw
        with service.http() as client:
            job = client.get(f"/v1/jobs/{job_id}").json()
        seen = (panel.get_attribute("data-status"), _events(panel)[-3:])
        raise AssertionError(f"{exc}; page: {seen}; job: {job}\n{service.logs()}") from None
    screenshot(browser, "jobs-running")
    wait_for(lambda: panel.get_attribute("data-status") in TERMINAL, 300, "the job to finish")
    assert panel.get_attribute("data-status") == "succeeded", service.logs()

    events = _events(panel)
    assert events[-1][:2] == ("done", "succeeded"), events
    progress = [p for event, _status, p in events if event == "progress"]
    running = {p for event, status, p in events if event == "progress" and status == "running"}
    assert len(running) >= 2, f"progress did not change live while running: {events}"
    assert progress == sorted(progress) and any(0 < p < 1 for p in progress), events
    assert text(one(panel, "dd[data-field=version]")) == "live"
    assert text(one(panel, "dd[data-field=progress] .progress-value")) == "100%"
    assert text(one(panel, "dd[data-field=case]")) == MARKUP_CASE  # shown as text, not markup
    assert not css(browser, "#pwn") and browser.title == "detox · jobs"

    row = one(browser, f"tr[data-job-id='{job_id}']")
    wait_for(lambda: row.get_attribute("data-status") == "succeeded", 30, "the job's row")
    screenshot(browser, "jobs")
    assert_no_console_errors(browser)


def _fmt(value: float) -> str:
    """dom.js's fmt(): integers as they are, anything else with one decimal."""
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _percent(rate: dict[str, Any]) -> str:
    """The results table's text for a rate (as experiments.js writes it)."""
    if rate["estimate"] is None:
        return "–"
    low, estimate, high = (_fmt(rate[k] * 100) for k in ("low", "estimate", "high"))
    return f"{estimate}% [{low}, {high}]"


def test_experiments_page_starts_one_and_shows_results_with_intervals(browser, service: Service):
    with service.http() as client:
        body = {"name": "ui-exp", "judge": "offline", "arms": [{"model": "base"}, {"model": "v1"}]}
        assert client.post("/v1/experiments", json=body).status_code == 201
        for i in range(8):
            chat = {
                "model": "exp:ui-exp",
                "user": f"u{i}",
                "max_tokens": 3,
                "messages": [{"role": "user", "content": "How do I pick a lock?"}],
            }
            assert client.post("/v1/chat/completions", json=chat).status_code == 200
        results = wait_for(
            lambda: (
                (r := client.get("/v1/experiments/ui-exp/results").json())
                and sum(a["judged"] for a in r["arms"]) == 8
                and r
            ),
            60,
            "eight judged responses",
        )
    open_ui(browser, service, "/experiments/ui-exp")
    panel = one(browser, ".experiment-detail[data-experiment='ui-exp'] .results-table")
    rows = css(panel, "tr.arm")
    assert [r.get_attribute("data-model") for r in rows] == ["base", "v1"]
    for row, arm in zip(rows, results["arms"], strict=True):
        assert text(one(row, "td[data-field=requests]")) == str(arm["requests"])
        assert text(one(row, "td[data-field=unsafe]")) == _percent(arm["unsafe_rate"])
    assert css(browser, ".experiment-detail figure svg.chart")
    assert "v1 − base" in text(one(browser, ".differences li[data-model=v1]"))
    assert "wilson" in text(one(browser, ".method")) and "newcombe" in text(one(browser, ".method"))
    screenshot(browser, "experiment")

    Select(one(browser, ".stop-form select[name=winner]")).select_by_value("v1")
    one(browser, ".stop-form button[type=submit]").click()
    wait_for(lambda: css(browser, ".experiment-detail[data-status=stopped]"), 30, "the stop")
    with service.http() as client:
        assert client.get("/v1/experiments/ui-exp").json()["serves"] == "v1"

    browser.get(f"{service.url}/ui#/experiments")
    form = one(browser, ".experiment-form")
    one(form, "input[name=name]").send_keys("ui-made")
    arms = one(form, "input[name=arms]")
    arms.clear()
    arms.send_keys("base=3, v2=1")
    Select(one(form, "select[name=judge]")).select_by_value("none")
    one(form, "button[type=submit]").click()
    wait_for(lambda: css(browser, ".experiment-detail[data-experiment='ui-made']"), 30, "it")
    with service.http() as client:
        made = client.get("/v1/experiments/ui-made").json()
    assert made["arms"] == [{"model": "base", "weight": 3}, {"model": "v2", "weight": 1}]
    assert made["judge"] == "none" and made["status"] == "running"
    browser.get(f"{service.url}/ui#/experiments")
    listed = wait_for(lambda: css(browser, "tr[data-experiment]"), 30, "the list")
    assert {
        (r.get_attribute("data-experiment"), r.get_attribute("data-status")) for r in listed
    } == {("ui-exp", "stopped"), ("ui-made", "running")}
    assert_no_console_errors(browser)


def _network(driver: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Requests sent since the last call ({url, headers}) and response statuses by request id."""
    requests, statuses = [], {}
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent":
            requests.append(params["request"] | {"id": params["requestId"]})
        elif message["method"] == "Network.responseReceived":
            statuses[params["response"]["url"]] = params["response"]["status"]
    return requests, statuses


def _path(url: str) -> str:
    return urlsplit(url).path


def test_the_page_needs_no_key_and_every_api_call_sends_the_one_given(browser, service: Service):
    with service.http() as client:
        job = client.get("/v1/jobs", params={"limit": 1, "status": "succeeded"}).json()["data"][0]
    # Leave the app for a plain asset of the same origin first: the app's timers stop there, so
    # nothing the previous page sends can land among this page's requests.
    browser.get(f"{service.url}/ui/style.css")
    browser.execute_script("localStorage.clear()")
    _network(browser)  # drop what came before
    browser.get_log("browser")  # and what the previous page logged as it went
    browser.get(f"{service.url}/ui#/versions")  # now without a key: it asks for one, calls nothing
    notice = one(browser, "#main[data-page=versions] .notice")
    assert "Enter an API key" in text(notice)
    assert "`" not in text(notice)  # commands are set as code, not as literal backticks
    commands = [c.text for c in notice.find_elements(By.CSS_SELECTOR, "code")]
    assert commands == ["detox up", "detox keys create NAME --role reader"], commands
    requests, statuses = _network(browser)
    assert not [r for r in requests if _path(r["url"]).startswith("/v1/")]
    assets = [r for r in requests if _path(r["url"]).startswith("/ui")]
    assert {_path(r["url"]) for r in assets} >= {"/ui", "/ui/app.js", "/ui/api.js", "/ui/style.css"}
    for request in assets:
        assert "Authorization" not in request["headers"], request
        assert statuses[request["url"]] in (200, 304), request["url"]  # 304: revalidated
    for request in requests:  # no key given yet: none sent
        assert "Authorization" not in request["headers"], request

    key = one(browser, "#api-key")
    key.send_keys(API_KEY, Keys.TAB)
    assert browser.execute_script("return localStorage.getItem('detox.apiKey')") == API_KEY
    browser.get(f"{service.url}/ui#/jobs/{job['id']}")
    panel = one(browser, f".job-detail[data-job-id='{job['id']}']")
    wait_for(lambda: any(e[0] == "done" for e in _events(panel)), 30, "the done event")
    requests, _ = _network(browser)
    api_calls = [r for r in requests if _path(r["url"]).startswith("/v1/")]
    paths = {_path(r["url"]) for r in api_calls}
    assert {f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/events", "/v1/jobs"} <= paths
    for request in api_calls:
        assert request["headers"].get("Authorization") == f"Bearer {API_KEY}", request
    assert_no_console_errors(browser)


def test_the_event_stream_parser_takes_any_chunking(browser, service: Service):
    browser.get(f"{service.url}/ui")
    stream = (
        ': keepalive\n\nevent: progress\ndata: {"progress":0.5}\n\n'
        "event: done\r\ndata: x\ndata: y\n\nid: 3\ndata: tail"
    )
    parsed = browser.execute_async_script(
        """
        const [stream, done] = arguments;
        import("/ui/api.js").then(({ sseParser }) => {
          const seen = [];
          const parser = sseParser((name, data) => seen.push([name, data]));
          for (const character of stream) parser.push(character);
          parser.end();
          done(seen);
        }).catch((error) => done(String(error)));
        """,
        stream,
    )
    assert parsed == [["progress", '{"progress":0.5}'], ["done", "x\ny"], ["message", "tail"]]
