// The playground's shell: the API key field and a fragment router (#/ab, #/jobs/ID,
// #/versions/NAME, #/experiments/NAME). Each page module exports render(main, args, signal);
// the signal aborts its requests and event streams when another view is shown.

import { getKey, setKey } from "./api.js";
import { errorBox, h } from "./dom.js";
import * as ab from "./ab.js";
import * as experiments from "./experiments.js";
import * as jobs from "./jobs.js";
import * as versions from "./versions.js";

const PAGES = { ab, jobs, versions, experiments };
let current = null;

function parseHash() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  const [page, ...args] = parts.map((part) => decodeURIComponent(part));
  return PAGES[page] ? { name: page, args } : { name: "ab", args: [] };
}

async function show() {
  current?.abort();
  current = new AbortController();
  const { name, args } = parseHash();
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.page === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const main = document.getElementById("main");
  main.replaceChildren();
  main.dataset.page = name;
  document.title = `detox · ${name}`;
  const signal = current.signal;
  if (!getKey() && !keyless) {
    main.append(keyNotice());
    return;
  }
  try {
    await PAGES[name].render(main, args, signal);
  } catch (error) {
    if (!signal.aborted) main.append(errorBox(error));
  }
}

// A server without authentication (DETOX_AUTH=false) needs no key: the notice lets one go on.
let keyless = false;

function keyNotice() {
  return h(
    "div",
    { class: "notice", role: "status" },
    h("p", null, "Enter an API key at the top to use this server."),
    h(
      "p",
      { class: "muted" },
      h("code", null, "detox up"),
      " prints an admin key on its first start; ",
      h("code", null, "detox keys create NAME --role reader"),
      " makes more. The key stays in this browser.",
    ),
    h(
      "button",
      { type: "button", class: "secondary", onclick: () => { keyless = true; show(); } },
      "Continue without a key (a server without authentication)",
    ),
  );
}

function setupKey() {
  const input = document.getElementById("api-key");
  input.value = getKey();
  input.addEventListener("change", () => {
    setKey(input.value.trim());
    show();
  });
}

setupKey();
window.addEventListener("hashchange", show);
show();
