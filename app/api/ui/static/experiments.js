// Experiments: the list with a form to start one, and one experiment's results: per-arm rates
// with their 95% intervals (table) and as bars (chart), each arm against the control, and a
// stop button. The results refresh every few seconds while the page is shown.

import { api } from "./api.js";
import { barChart } from "./chart.js";
import { errorBox, fmt, h, link, sleep, when } from "./dom.js";

const REFRESH_MS = 5000;
const NAME = "[A-Za-z0-9][A-Za-z0-9._\\-]{0,63}";
const JUDGES = ["service", "offline", "offline/2", "offline/1", "none"];  // "offline" is stored as its version
const LIST_COLUMNS = ["Name", "Status", "Arms", "Serves", "Created"];
const RESULT_COLUMNS = ["Arm", "Weight", "Requests", "Judged", "Unsafe", "Refusals",
  "Mean tokens", "p50 ms", "p95 ms", "Feedback"];
const pct = (x) => (x === null || x === undefined ? null : x * 100);
const option = (value) => h("option", { value }, value);
const feedback = (f) => (f.mean === null ? "–" : `${fmt(f.mean, 2)} (${f.count})`);

export async function render(main, args, signal) {
  if (args.length) return detail(main, args[0], signal);
  return list(main, signal);
}

// --- list and create --------------------------------------------------------------------------

async function list(main, signal) {
  const [page, models] = await Promise.all([
    api("/v1/experiments", { signal }),
    api("/v1/models", { signal }),
  ]);
  const rows = page.data.map((e) =>
    h(
      "tr",
      { dataset: { experiment: e.name, status: e.status } },
      h("td", null, link("experiments", e.name)),
      h("td", null, h("span", { class: `badge status-${e.status}` }, e.status)),
      h("td", null, e.arms.map((a) => `${a.model} (${fmt(a.weight)})`).join(", ")),
      h("td", null, e.serves ?? ""),
      h("td", null, when(e.created_at)),
    ),
  );
  main.append(
    h("h2", null, "Experiments"),
    h(
      "p",
      { class: "muted" },
      'Send requests with model "exp:NAME" (and a `user`, for one arm per user); every ',
      "response is judged in the background.",
    ),
    rows.length
      ? h(
          "table",
          { class: "experiments" },
          h("thead", null, h("tr", null, LIST_COLUMNS.map((t) => h("th", null, t)))),
          h("tbody", null, rows),
        )
      : h("p", { class: "muted empty" }, "No experiment yet."),
    createForm(models.data.map((m) => m.id), signal),
  );
}

function createForm(models, signal) {
  const status = h("div", { class: "form-status" });
  const arms = models.slice(0, 2).map((m) => `${m}=50`).join(", ");
  const form = h(
    "form",
    { class: "experiment-form" },
    h("h3", null, "Start an experiment"),
    h("label", null, "Name ", h("input", { name: "name", required: true, pattern: NAME })),
    h("label", null, "Arms (model=weight, …) ", h("input", { name: "arms", value: arms })),
    h("label", null, "Judge ", h("select", { name: "judge" }, JUDGES.map((j) => option(j)))),
    h("label", null, h("input", { type: "checkbox", name: "keep_text" }), " keep the text"),
    h("p", { class: "muted" }, `Models: ${models.join(", ")}`),
    h("button", { type: "submit" }, "Start"),
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const body = {
      name: data.get("name"),
      arms: parseArms(String(data.get("arms"))),
      judge: data.get("judge"),
      keep_text: data.get("keep_text") === "on",
    };
    status.replaceChildren();
    try {
      const made = await api("/v1/experiments", { method: "POST", body, signal });
      location.hash = `#/experiments/${encodeURIComponent(made.name)}`;
    } catch (error) {
      if (!signal.aborted) status.append(errorBox(error));
    }
  });
  return form;
}

function parseArms(text) {
  return text
    .split(",")
    .map((part) => part.trim())
    .filter(Boolean)
    .map((part) => {
      const [model, weight] = part.split("=");
      return { model: model.trim(), weight: weight === undefined ? 1 : Number(weight) };
    });
}

// --- one experiment ---------------------------------------------------------------------------

async function detail(main, name, signal) {
  const path = `/v1/experiments/${encodeURIComponent(name)}`;
  const panel = h("div", { class: "experiment-detail", dataset: { experiment: name } });
  main.append(h("p", null, link("experiments", "", "← all experiments")), panel);
  while (!signal.aborted) {
    const [experiment, results] = await Promise.all([
      api(path, { signal }),
      api(`${path}/results`, { signal }),
    ]);
    panel.replaceChildren(...view(experiment, results, path, signal));
    panel.dataset.status = experiment.status;
    await sleep(REFRESH_MS, signal);
  }
}

function view(experiment, results, path, signal) {
  return [
    h(
      "h2",
      null,
      experiment.name,
      " ",
      h("span", { class: `badge status-${experiment.status}` }, experiment.status),
    ),
    h(
      "p",
      { class: "muted" },
      `model "${experiment.model}" · judge ${experiment.judge} · `,
      `started ${when(experiment.created_at)}`,
      experiment.serves ? ` · stopped: serves ${experiment.serves}` : "",
    ),
    resultsTable(results),
    h("div", { class: "charts" }, ratesChart(results)),
    differences(results),
    h(
      "p",
      { class: "muted method" },
      `${Math.round(results.confidence * 100)}% intervals: ${results.method.rate} for rates, `,
      `${results.method.difference} for differences.`,
    ),
    experiment.status === "running" ? stopForm(experiment, path, signal) : null,
  ];
}

function interval(rate) {
  if (rate.estimate === null) return "–";
  return `${fmt(pct(rate.estimate))}% [${fmt(pct(rate.low))}, ${fmt(pct(rate.high))}]`;
}

function resultsTable(results) {
  const head = RESULT_COLUMNS.map((t) => h("th", null, t));
  const rows = results.arms.map((arm) =>
    h(
      "tr",
      { class: "arm", dataset: { model: arm.model } },
      h("td", null, arm.model),
      h("td", { class: "num" }, fmt(arm.weight)),
      h("td", { class: "num", dataset: { field: "requests" } }, arm.requests),
      h("td", { class: "num" }, arm.judged),
      h("td", { dataset: { field: "unsafe" } }, interval(arm.unsafe_rate)),
      h("td", { dataset: { field: "refusals" } }, interval(arm.refusal_rate)),
      h("td", { class: "num" }, fmt(arm.mean_output_tokens)),
      h("td", { class: "num" }, fmt(arm.latency_ms.p50, 0)),
      h("td", { class: "num" }, fmt(arm.latency_ms.p95, 0)),
      h("td", null, feedback(arm.feedback)),
    ),
  );
  return h(
    "table",
    { class: "results-table" },
    h("thead", null, h("tr", null, head)),
    h("tbody", null, rows),
  );
}

function ratesChart(results) {
  const labels = results.arms.map((arm) => arm.model);
  return barChart({
    title: "Unsafe and refusal rates, % (95% intervals in the table)",
    labels,
    series: [
      { name: "unsafe", values: results.arms.map((arm) => pct(arm.unsafe_rate.estimate)) },
      { name: "refusals", values: results.arms.map((arm) => pct(arm.refusal_rate.estimate)) },
    ],
    max: 100,
  });
}

function points(diff) {
  if (diff.estimate === null) return "–";
  const sign = (x) => (x > 0 ? "+" : "") + fmt(pct(x));
  return `${sign(diff.estimate)} points [${sign(diff.low)}, ${sign(diff.high)}]`;
}

function differences(results) {
  if (!results.differences.length) return null;
  return h(
    "ul",
    { class: "differences" },
    results.differences.map((d) =>
      h(
        "li",
        { dataset: { model: d.model } },
        h("strong", null, `${d.model} − ${d.versus}`),
        `: unsafe ${points(d.unsafe_rate)}, refusals ${points(d.refusal_rate)}`,
      ),
    ),
  );
}

function stopForm(experiment, path, signal) {
  const status = h("div", { class: "form-status" });
  const winner = h(
    "select",
    { name: "winner" },
    h("option", { value: "" }, "base (no winner)"),
    experiment.arms.map((arm) => h("option", { value: arm.model }, arm.model)),
  );
  const form = h(
    "form",
    { class: "stop-form" },
    h("label", null, "Winner ", winner),
    h("button", { type: "submit", class: "secondary" }, "Stop the experiment"),
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = winner.value ? { winner: winner.value } : {};
    try {
      await api(`${path}/stop`, { method: "POST", body, signal });
      window.dispatchEvent(new HashChangeEvent("hashchange"));
    } catch (error) {
      if (!signal.aborted) status.replaceChildren(errorBox(error));
    }
  });
  return form;
}
