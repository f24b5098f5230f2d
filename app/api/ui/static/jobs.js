// Jobs: submit a DINM job, the recent jobs with live progress, and one job followed over its
// server-sent events (GET /v1/jobs/{id}/events: `progress` ... `done`).

import { api, events } from "./api.js";
import { errorBox, fmt, h, link, percent, shortId, sleep, when } from "./dom.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const MAX_STREAMS = 3; // list rows followed live at once (browsers allow ~6 connections a host)
const REFRESH_MS = 4000;
const PAGE = 50;

/** Follow a job until its `done` event: onJob(event, job) per event; reconnects on a drop. */
export async function follow(id, onJob, signal) {
  let failures = 0;
  while (!signal.aborted) {
    let finished = false;
    try {
      await events(
        `/v1/jobs/${encodeURIComponent(id)}/events`,
        (name, data) => {
          let job;
          try {
            job = JSON.parse(data);
          } catch {
            return;
          }
          finished ||= name === "done";
          onJob(name, job);
        },
        { signal },
      );
      failures = 0;
    } catch (error) {
      if (signal.aborted) return;
      if (error.status && error.status < 500) throw error; // 401, 404: a retry cannot help
      if (++failures > 5) throw error;
    }
    if (finished) return;
    await sleep(1000 * Math.min(failures + 1, 5), signal);
  }
}

function progressBar(job) {
  return h(
    "span",
    { class: "progress" },
    h("progress", { max: 1, value: job.progress ?? 0 }),
    h("span", { class: "progress-value" }, percent(job.progress)),
  );
}

function badge(status) {
  return h("span", { class: `badge status-${status}` }, status);
}

function versionLink(name) {
  if (!name) return "–";
  return name === "base" ? "base" : link("versions", name);
}

// --- the list -------------------------------------------------------------------------------

function rowCells(job) {
  return [
    h("td", null, link("jobs", job.id, shortId(job.id))),
    h("td", null, job.kind),
    h("td", { class: "status" }, badge(job.status)),
    h("td", { class: "stage" }, job.stage ?? "–"),
    h("td", null, progressBar(job)),
    h("td", null, versionLink(job.parent)),
    h("td", null, versionLink(job.version)),
    h("td", { class: "muted" }, when(job.created_at)),
  ];
}

class JobTable {
  constructor(selected, signal) {
    this.selected = selected;
    this.signal = signal;
    this.rows = new Map();
    this.followed = new Set();
    this.body = h("tbody");
    this.status = h("p", { class: "muted status" });
    const head = ["Job", "Kind", "Status", "Stage", "Progress", "Parent", "Version", "Created"];
    this.node = h(
      "section",
      { class: "job-list" },
      h("h3", null, "Recent jobs"),
      h(
        "table",
        { class: "jobs" },
        h("thead", null, h("tr", null, head.map((title) => h("th", null, title)))),
        this.body,
      ),
      this.status,
    );
  }

  update(job) {
    let row = this.rows.get(job.id);
    if (!row) {
      row = h("tr", { dataset: { jobId: job.id } });
      this.rows.set(job.id, row);
    }
    row.classList.toggle("selected", job.id === this.selected);
    row.dataset.status = job.status;
    row.replaceChildren(...rowCells(job));
    return row;
  }

  async refresh() {
    const page = await api(`/v1/jobs?limit=${PAGE}`, { signal: this.signal });
    const ordered = page.data.map((job) => this.update(job));
    this.body.replaceChildren(...ordered);
    if (!ordered.length) {
      this.body.append(h("tr", null, h("td", { colSpan: 8, class: "muted" }, "No jobs yet.")));
    }
    for (const job of page.data) {
      const active = !TERMINAL.has(job.status) && job.id !== this.selected;
      if (active && !this.followed.has(job.id) && this.followed.size < MAX_STREAMS) {
        this.followed.add(job.id);
        follow(job.id, (_event, latest) => this.update(latest), this.signal)
          .catch(() => {})
          .finally(() => this.followed.delete(job.id));
      }
    }
  }

  async keepFresh() {
    while (!this.signal.aborted) {
      await sleep(REFRESH_MS, this.signal);
      if (this.signal.aborted) return;
      try {
        await this.refresh();
        this.status.textContent = "";
      } catch (error) {
        if (!this.signal.aborted) this.status.textContent = `Not refreshed: ${error.message}`;
      }
    }
  }
}

// --- one job --------------------------------------------------------------------------------

function summary(job) {
  const m = job.metrics;
  if (!m) return [];
  const before = m.metrics?.before ?? {};
  const after = m.metrics?.after ?? {};
  if (job.kind === "dinm") {
    return [
      ["case", m.case],
      ["layer", m.layer],
      ["judge", m.judge],
      ["DS", `${fmt(before.DS)} → ${fmt(after.DS)}`],
      ["DG avg", `${fmt(before.DG_avg)} → ${fmt(after.DG_avg)}`],
      ["edit", `${fmt(m.edit_seconds, 2)} s`],
    ];
  }
  if (job.kind === "unlearn") {
    return [
      ["method", m.method],
      ["steps", `${m.steps}${m.stopped ? ` (stopped: ${m.stopped})` : ""}`],
      [
        "perplexity",
        `${fmt(before.perplexity?.perplexity, 2)} → ${fmt(after.perplexity?.perplexity, 2)}`,
      ],
      ["edit", `${fmt(m.edit_seconds, 2)} s`],
    ];
  }
  return [
    ["model", m.model],
    ["suites", Object.keys(m.suites ?? {}).join(", ")],
  ];
}

function facts(job) {
  const items = [
    ["kind", job.kind],
    ["status", badge(job.status)],
    ["stage", job.stage ?? "–"],
    ["progress", progressBar(job)],
    ["parent", versionLink(job.parent)],
    ["version", versionLink(job.version)],
    ["attempts", job.attempts],
    ["created", when(job.created_at)],
    ["started", when(job.started_at)],
    ["finished", when(job.finished_at)],
    ...summary(job),
  ];
  return items.flatMap(([term, value]) => [
    h("dt", null, term),
    h("dd", { dataset: { field: term } }, value ?? "–"),
  ]);
}

class JobPanel {
  constructor(job, onChange, signal) {
    this.onChange = onChange;
    this.signal = signal;
    this.list = h("dl", { class: "facts" });
    this.error = h("div");
    this.log = h("ol", { class: "events" });
    this.cancel = h("button", { type: "button", class: "secondary" }, "Cancel job");
    this.cancel.addEventListener("click", async () => {
      try {
        this.update(await api(`/v1/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" }));
      } catch (error) {
        this.error.replaceChildren(errorBox(error));
      }
    });
    this.stream = h("p", { class: "muted stream" });
    this.node = h(
      "section",
      { class: "job-detail card", dataset: { jobId: job.id } },
      h("h3", null, `Job ${job.id}`),
      this.list,
      this.error,
      this.cancel,
      h("h4", null, "Events"),
      this.stream,
      this.log,
    );
    this.update(job);
  }

  update(job) {
    this.node.dataset.status = job.status;
    this.list.replaceChildren(...facts(job));
    this.cancel.hidden = TERMINAL.has(job.status);
    this.error.replaceChildren();
    if (job.error) this.error.append(errorBox(job.error));
    this.onChange(job);
  }

  record(event, job) {
    const time = new Date().toLocaleTimeString();
    this.log.append(
      h(
        "li",
        { dataset: { event, status: job.status, progress: job.progress } },
        `${time} · ${event} · ${job.status} · ${job.stage ?? "–"} · ${percent(job.progress)}`,
      ),
    );
    this.update(job);
  }

  async follow() {
    this.stream.textContent = "Following the job's event stream…";
    try {
      await follow(this.node.dataset.jobId, (event, job) => this.record(event, job), this.signal);
      this.stream.textContent = "The stream ended: the job is finished.";
    } catch (error) {
      if (!this.signal.aborted) this.stream.replaceChildren(errorBox(error));
    }
  }
}

// --- submitting ------------------------------------------------------------------------------

function parseInstance(text) {
  let value;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new Error(`the instance is not valid JSON: ${error.message}`);
  }
  if (Array.isArray(value)) {
    if (value.length !== 1) throw new Error("paste one SafeEdit instance (a JSON object)");
    [value] = value;
  }
  if (!value || typeof value !== "object") throw new Error("the instance must be a JSON object");
  return value;
}

function submitForm(versions, signal) {
  const instance = h("textarea", {
    name: "instance",
    rows: 8,
    required: true,
    placeholder: '{"id": "c01", "question": "...", "adversarial prompt": "...", ...}',
  });
  const parent = h(
    "select",
    { name: "parent" },
    h("option", { value: "base" }, "base"),
    versions.map((v) => h("option", { value: v.name }, v.name)),
  );
  const name = h("input", { name: "name", placeholder: "default v{N}", maxLength: 64 });
  const preset = h(
    "select",
    { name: "preset" },
    h("option", { value: "" }, "broad (default)"),
    ["contrastive", "selective", "guarded", "paper"].map((p) => h("option", { value: p }, p)),
  );
  const steps = h("input", {
    name: "steps", type: "number", min: 1, max: 1000, placeholder: "preset",
  });
  const params = h("input", { name: "params", placeholder: '{"lr": 0.001}' });
  const button = h("button", { type: "submit" }, "Submit DINM job");
  const message = h("div");
  const form = h(
    "form",
    { class: "submit-form" },
    h("label", { class: "wide" }, "SafeEdit instance (JSON)", instance),
    h(
      "div",
      { class: "row" },
      h("label", null, "Parent ", parent),
      h("label", null, "Name ", name),
      h("label", null, "Preset ", preset),
      h("label", null, "Steps ", steps),
      h("label", null, "More params ", params),
      button,
    ),
    message,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.replaceChildren();
    button.disabled = true;
    try {
      const extra = params.value.trim() ? JSON.parse(params.value) : {};
      const body = {
        kind: "dinm",
        parent: parent.value,
        instance: parseInstance(instance.value),
        params: { ...extra },
      };
      if (name.value.trim()) body.name = name.value.trim();
      if (preset.value) body.params.preset = preset.value;
      if (steps.value) body.params.steps = Number(steps.value);
      const job = await api("/v1/jobs", { method: "POST", body, signal });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (error) {
      if (!signal.aborted) message.append(errorBox(error));
    } finally {
      button.disabled = false;
    }
  });
  return h("details", { class: "card submit" }, h("summary", null, "Submit a DINM job"), form);
}

export async function render(main, args, signal) {
  const [selected] = args;
  main.append(h("h2", null, "Jobs"));
  const [versions, job] = await Promise.all([
    api("/v1/versions", { signal }),
    selected ? api(`/v1/jobs/${encodeURIComponent(selected)}`, { signal }) : null,
  ]);
  const table = new JobTable(selected, signal);
  main.append(submitForm(versions.data, signal));
  if (job) {
    const panel = new JobPanel(job, (latest) => table.update(latest), signal);
    main.append(panel.node);
    panel.follow();
  }
  main.append(table.node);
  await table.refresh();
  table.keepFresh();
}
