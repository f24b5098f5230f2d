// Versions: the lineage of every version (a tree from the base), and one version's parent
// chain, delta and before/after metrics as small inline-SVG bar charts.

import { api } from "./api.js";
import { barChart } from "./chart.js";
import { bytes, fmt, h, link, shortId, when } from "./dom.js";

const SAFETY = ["DS", "DG_onlyQ", "DG_otherA", "DG_otherQ", "DG_otherAQ", "DG_avg"];
let showRetired = false;

// --- lineage ----------------------------------------------------------------------------------

function children(versions) {
  const byParent = new Map();
  for (const v of versions) {
    if (!byParent.has(v.parent)) byParent.set(v.parent, []);
    byParent.get(v.parent).push(v);
  }
  return byParent;
}

function tree(versions, selected) {
  const byParent = children(versions);
  const seen = new Set();
  function branch(parent) {
    const kids = (byParent.get(parent) ?? []).filter((v) => !seen.has(v.name));
    if (!kids.length) return null;
    return h(
      "ul",
      null,
      kids.map((v) => {
        seen.add(v.name);
        const name = link("versions", v.name);
        if (v.name === selected) name.setAttribute("aria-current", "true");
        return h(
          "li",
          { class: v.retired ? "retired" : null, dataset: { version: v.name } },
          name,
          h("span", { class: `badge kind-${v.kind}` }, v.kind),
          v.retired ? h("span", { class: "muted" }, " retired") : null,
          branch(v.name),
        );
      }),
    );
  }
  const root = h("li", { dataset: { version: "base" } }, h("strong", null, "base"), branch("base"));
  return h("ul", { class: "tree" }, root);
}

function chain(version, byName) {
  const names = [version.name];
  let parent = version.parent;
  while (parent && parent !== "base" && !names.includes(parent)) {
    names.unshift(parent);
    parent = byName.get(parent)?.parent;
  }
  return ["base", ...names];
}

function breadcrumb(version, byName) {
  const names = chain(version, byName);
  const nav = h("nav", { class: "lineage", "aria-label": "lineage" });
  names.forEach((name, index) => {
    if (index) nav.append(h("span", { class: "sep" }, " › "));
    if (index === names.length - 1) nav.append(h("strong", null, name));
    else if (name === "base") nav.append(h("span", null, "base"));
    else nav.append(link("versions", name));
  });
  return nav;
}

// --- metrics ----------------------------------------------------------------------------------

function beforeAfter(title, labels, before, after, options = {}) {
  return barChart({
    title,
    labels,
    series: [
      { name: "before", values: labels.map((label) => before?.[label] ?? null) },
      { name: "after", values: labels.map((label) => after?.[label] ?? null) },
    ],
    ...options,
  });
}

function single(title, labels, values, options = {}) {
  return barChart({ title, labels, series: [{ name: "evaluated", values }], ...options });
}

function biasScores(bias) {
  const types = Object.keys(bias?.by_type ?? {});
  const scores = Object.fromEntries(types.map((t) => [t, bias.by_type[t].score]));
  return { labels: ["overall", ...types], scores: { overall: bias?.overall, ...scores } };
}

function dinmCharts(m) {
  const { before, after } = m.metrics ?? {};
  if (!before || !after) return [];
  return [
    beforeAfter("SafeEdit defence (higher is safer)", SAFETY, before, after, { max: 100 }),
    beforeAfter("Fluency (n-gram entropy)", ["fluency"], before, after),
    beforeAfter("Over-refusal % (lower is better)", ["over_refusal"], before, after),
  ];
}

function unlearnCharts(m) {
  const { before, after } = m.metrics ?? {};
  const charts = [];
  if (before?.bias && after?.bias) {
    const b = biasScores(before.bias);
    const a = biasScores(after.bias);
    charts.push(
      beforeAfter("Bias score by type (50 = no preference)", b.labels, b.scores, a.scores, {
        max: 100,
        reference: 50,
      }),
    );
  }
  const ppl = (x) => ({ "reference text": x?.perplexity?.perplexity });
  const label = ["reference text"];
  charts.push(beforeAfter("Perplexity (lower is better)", label, ppl(before), ppl(after)));
  if (m.forget_nll) {
    const nll = (x) => ({ "forget NLL": x });
    const { before: b, after: a } = m.forget_nll;
    charts.push(beforeAfter("Forget NLL (higher: forgotten)", ["forget NLL"], nll(b), nll(a)));
  }
  return charts;
}

function evalSection(evaluation) {
  const job = evaluation.job_id;
  const charts = [];
  const safe = evaluation.safeedit;
  if (safe) {
    const values = SAFETY.map((key) => safe[key] ?? null);
    charts.push(single("SafeEdit defence", SAFETY, values, { max: 100 }));
  }
  if (evaluation.bias) {
    const { labels, scores } = biasScores(evaluation.bias);
    const values = labels.map((label) => scores[label]);
    charts.push(single("Bias score by type", labels, values, { max: 100, reference: 50 }));
  }
  if (evaluation.perplexity) {
    charts.push(single("Perplexity", ["reference text"], [evaluation.perplexity.perplexity]));
  }
  return h(
    "section",
    { class: "evaluation" },
    h("h4", null, "Evaluation ", job ? ["(job ", link("jobs", job, shortId(job)), ")"] : null),
    h("div", { class: "charts" }, charts),
  );
}

function generations(items) {
  if (!items?.length) return null;
  const mark = (unsafe) =>
    h(
      "span",
      { class: `badge ${unsafe ? "status-failed" : "status-succeeded"}` },
      unsafe ? "unsafe" : "safe",
    );
  const head = ["Kind", "Prompt", "Before", "After"].map((title) => h("th", null, title));
  return h(
    "details",
    { class: "generations" },
    h("summary", null, `Generations before / after (${items.length})`),
    h(
      "table",
      null,
      h("thead", null, h("tr", null, head)),
      h(
        "tbody",
        null,
        items.map((g) =>
          h(
            "tr",
            null,
            h("td", null, g.kind),
            h("td", { class: "prompt" }, g.prompt),
            h("td", null, mark(g.unsafe_before), h("pre", null, g.before ?? "")),
            h("td", null, mark(g.unsafe_after), h("pre", null, g.after ?? "")),
          ),
        ),
      ),
    ),
  );
}

function facts(version) {
  const m = version.metrics ?? {};
  const delta = version.delta ?? {};
  const items = [
    ["kind", version.kind],
    ["parent", version.parent === "base" ? "base" : link("versions", version.parent)],
    ["job", version.job_id ? link("jobs", version.job_id, shortId(version.job_id)) : "–"],
    ["created", when(version.created_at)],
    ["delta", `${delta.params?.length ?? 0} params · ${bytes(delta.bytes)} · ${delta.encoding}`],
    ["sha256", h("code", { title: delta.sha256 ?? "" }, shortId(delta.sha256))],
  ];
  if (version.kind === "dinm") {
    items.push(["case", m.case], ["layer", m.layer], ["judge", m.judge]);
    const after = m.metrics?.after ?? {};
    if (after.locality !== undefined) {
      items.push(["locality", `${fmt(after.locality)} (KL ${fmt(after.locality_kl, 4)})`]);
    }
  } else if (version.kind === "unlearn") {
    const stopped = m.stopped ? ` (stopped: ${m.stopped})` : "";
    items.push(["method", m.method], ["scope", m.scope], ["steps", `${m.steps}${stopped}`]);
  }
  return h(
    "dl",
    { class: "facts" },
    items.flatMap(([term, value]) => [
      h("dt", null, term),
      h("dd", { dataset: { field: term } }, value ?? "–"),
    ]),
  );
}

function detail(version, byName) {
  const m = version.metrics ?? {};
  const charts = version.kind === "unlearn" ? unlearnCharts(m) : dinmCharts(m);
  return h(
    "section",
    { class: "version-detail card", dataset: { version: version.name } },
    h(
      "h3",
      null,
      version.name,
      h("span", { class: `badge kind-${version.kind}` }, version.kind),
      version.retired ? h("span", { class: "badge status-cancelled" }, "retired") : null,
    ),
    breadcrumb(version, byName),
    facts(version),
    charts.length
      ? h("div", { class: "charts" }, charts)
      : h("p", { class: "muted" }, "No before/after metrics stored."),
    m.eval ? evalSection(m.eval) : null,
    version.kind === "dinm" ? generations(m.generations) : null,
  );
}

export async function render(main, args, signal) {
  main.append(h("h2", null, "Versions"));
  const all = (await api("/v1/versions?include_retired=true", { signal })).data;
  const live = all.filter((v) => !v.retired);
  const byName = new Map(all.map((v) => [v.name, v]));
  const selected = args[0] ?? live[live.length - 1]?.name;
  const toggle = h("input", { type: "checkbox", checked: showRetired });
  const aside = h("aside", { class: "lineage-tree card" });
  const drawTree = () =>
    aside.replaceChildren(
      h("h3", null, "Lineage"),
      tree(showRetired ? all : live, selected),
      h("label", { class: "muted" }, toggle, " show retired"),
    );
  toggle.addEventListener("change", () => {
    showRetired = toggle.checked;
    drawTree();
  });
  drawTree();
  const right = h("div", { class: "version-pane" });
  main.append(h("div", { class: "versions-layout" }, aside, right));
  if (!selected) {
    const jobs = h("a", { href: "#/jobs" }, "jobs page");
    right.append(h("p", { class: "muted" }, "No versions yet: submit a job on the ", jobs, "."));
    return;
  }
  const version = await api(`/v1/versions/${encodeURIComponent(selected)}`, { signal });
  right.append(detail(version, byName));
}
