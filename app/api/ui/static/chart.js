// A small grouped bar chart drawn as inline SVG (no library): one group per label, one bar per
// series (e.g. before / after), a 0..max axis and an optional reference line (e.g. 50 for bias).

import { fmt, s } from "./dom.js";

const HEIGHT = 150; // plot area
const TOP = 26; // legend
const LEFT = 36;
const BAR = 22;
const GAP = 16;
const LEGEND = 80; // width of one legend entry
const CHAR = 6; // width of a label character, about
const SLANT = 35; // degrees: long labels are drawn slanted

function niceMax(values) {
  const top = Math.max(0, ...values.filter((v) => typeof v === "number" && Number.isFinite(v)));
  if (top === 0) return 1;
  const step = 10 ** Math.floor(Math.log10(top));
  return Math.ceil((top * 1.1) / step) * step;
}

/**
 * barChart({title, labels: [...], series: [{name, values: [...]}, ...], max?, reference?})
 * Values may be null (drawn as "–"). Returns a <figure> holding the <svg>.
 */
export function barChart({ title, labels, series, max, reference }) {
  const all = series.flatMap((one) => one.values);
  const top = max ?? niceMax(all);
  const longest = Math.max(...labels.map((label) => String(label).length));
  const rotate = labels.length > 1 && longest > 9;
  const groupWidth = Math.max(series.length * BAR + GAP, rotate ? 0 : longest * CHAR + 8);
  // a slanted label reaches left of its group and below the axis by about this much
  const reach = (longest * CHAR * Math.cos((SLANT * Math.PI) / 180)) | 0;
  const left = rotate ? Math.max(LEFT, reach - groupWidth / 2 + 4) : LEFT;
  const bottom = rotate ? 20 + ((longest * CHAR * Math.sin((SLANT * Math.PI) / 180)) | 0) : 24;
  const plotRight = left + labels.length * groupWidth + GAP / 2;
  const width = Math.max(plotRight + GAP / 2, LEFT + series.length * LEGEND);
  const height = TOP + HEIGHT + bottom;
  const y = (value) => TOP + HEIGHT - (Math.max(0, Math.min(value, top)) / top) * HEIGHT;

  const svg = s("svg", {
    class: "chart",
    width,
    height,
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": title,
  });
  for (const tick of [0, top / 2, top]) {
    svg.append(
      s("line", { class: "grid", x1: left, x2: plotRight, y1: y(tick), y2: y(tick) }),
      s("text", { class: "tick", x: left - 4, y: y(tick) + 3, "text-anchor": "end" }, fmt(tick)),
    );
  }
  series.forEach((one, index) => {
    const x = LEFT + index * LEGEND;
    svg.append(
      s("rect", { class: `swatch series-${index}`, x, y: 6, width: 10, height: 10 }),
      s("text", { class: "legend", x: x + 14, y: 15 }, one.name),
    );
  });
  labels.forEach((label, group) => {
    const x0 = left + group * groupWidth + (groupWidth - series.length * BAR) / 2;
    series.forEach((one, index) => {
      const value = one.values[group];
      const x = x0 + index * BAR;
      if (typeof value !== "number" || !Number.isFinite(value)) {
        svg.append(s("text", { class: "value", x: x + BAR / 2, y: y(0) - 3 }, "–"));
        return;
      }
      const bar = s(
        "rect",
        {
          class: `bar series-${index}`,
          x: x + 1,
          y: y(value),
          width: BAR - 2,
          height: Math.max(0.5, y(0) - y(value)),
          "data-label": label,
          "data-series": one.name,
          "data-value": value,
        },
        s("title", null, `${label} · ${one.name}: ${fmt(value, 3)}`),
      );
      const shown = Math.abs(value) >= 100 ? value.toFixed(0) : fmt(value);
      svg.append(bar, s("text", { class: "value", x: x + BAR / 2, y: y(value) - 3 }, shown));
    });
    const cx = x0 + (series.length * BAR) / 2;
    const ly = TOP + HEIGHT + 14;
    const text = s("text", { class: "label", x: cx, y: ly, "text-anchor": "middle" }, label);
    if (rotate) {
      text.setAttribute("text-anchor", "end");
      text.setAttribute("transform", `rotate(-${SLANT} ${cx} ${ly})`);
    }
    svg.append(text);
  });
  if (typeof reference === "number") {
    svg.append(
      s("line", {
        class: "reference", x1: left, x2: plotRight, y1: y(reference), y2: y(reference),
      }),
    );
  }
  svg.append(s("line", { class: "axis", x1: left, x2: plotRight, y1: y(0), y2: y(0) }));
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  const figure = document.createElement("figure");
  figure.className = "chart";
  figure.append(caption, svg);
  return figure;
}
