"""GET /v1/jobs/{id}/events: server-sent events that end with `done`."""

from __future__ import annotations

import json
import threading
import time

from app.store import crud
from tests.api.conftest import dinm_body
from tests.store import factories


def parse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = [line.split(": ", 1) for line in block.splitlines() if not line.startswith(":")]
        lines = dict(fields)
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_stream_follows_the_job_to_done(api, session_factory):
    job_id = api.post("/v1/jobs", json=dinm_body()).json()["id"]

    def worker() -> None:  # what a worker does, through the store
        with session_factory() as session:
            time.sleep(0.4)
            crud.claim_job(session=session, job_id=job_id, worker="w")
            crud.update_progress(session=session, job_id=job_id, stage="tune", progress=0.5)
            time.sleep(0.7)
            crud.finish_job_succeeded(
                session=session,
                job_id=job_id,
                version_name="streamed",
                base_model="tiny",
                base_fingerprint=factories.FINGERPRINT,
                metrics={},
                deltas=[factories.delta()],
            )

    thread = threading.Thread(target=worker)
    thread.start()
    response = api.get(f"/v1/jobs/{job_id}/events")
    thread.join()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_events(response.text)
    names = [name for name, _ in events]
    assert names[0] == "progress" and names[-1] == "done" and names.count("done") == 1
    assert events[0][1]["status"] == "queued"
    assert ("tune", 0.5) in [(data["stage"], data["progress"]) for _, data in events]
    done = events[-1][1]
    assert done["status"] == "succeeded" and done["version"] == "streamed"
    assert done["id"] == job_id and done["progress"] == 1.0


def test_stream_of_a_finished_job_is_one_done_event(api):
    job_id = api.post("/v1/jobs", json=dinm_body()).json()["id"]
    api.post(f"/v1/jobs/{job_id}/cancel")
    events = parse_events(api.get(f"/v1/jobs/{job_id}/events").text)
    assert [(name, data["status"]) for name, data in events] == [("done", "cancelled")]
