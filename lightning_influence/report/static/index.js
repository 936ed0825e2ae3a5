// The Influence tab of TensorBoard: plain JavaScript, no build step.
// It reads what the plugin serves (the run list, each run's index.json and its PNG pictures) and
// draws three views: validation examples with their most helpful and harmful training examples
// (by relative score, or raw), the self-influence review, and a summary of each run.

const STYLE = `
  body { font-family: Roboto, Arial, sans-serif; font-size: 14px; color: #212121; margin: 0; }
  header { display: flex; flex-wrap: wrap; gap: 16px; align-items: center; padding: 8px 16px;
           border-bottom: 1px solid #ddd; background: #fafafa; position: sticky; top: 0; z-index: 1; }
  header .runs label { margin-right: 12px; }
  button.view { border: 1px solid #bbb; background: #fff; padding: 4px 10px; cursor: pointer; }
  button.view.on { background: #f57c00; color: #fff; border-color: #f57c00; }
  .layout { display: flex; gap: 16px; padding: 12px 16px; align-items: flex-start; }
  .list { flex: 0 0 auto; max-height: 85vh; overflow-y: auto; border: 1px solid #ddd; }
  table { border-collapse: collapse; }
  th, td { padding: 3px 8px; text-align: right; border-bottom: 1px solid #eee; }
  th { cursor: pointer; background: #f5f5f5; position: sticky; top: 0; }
  td.text, th.text { text-align: left; }
  tr.val:hover { background: #fff3e0; cursor: pointer; }
  tr.chosen { background: #ffe0b2; }
  .wrong { color: #d62728; font-weight: bold; }
  .runs-side { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
  .run { flex: 1 1 480px; min-width: 420px; }
  .run h2 { font-size: 15px; margin: 4px 0 8px; color: #555; }
  .query { display: flex; gap: 12px; align-items: flex-start; border-left: 4px solid #1f77b4;
           padding: 6px 10px; background: #f4f8fc; }
  .cards { display: flex; flex-wrap: wrap; gap: 8px; margin: 6px 0 12px; }
  .card { border: 3px solid #999; padding: 5px; width: 172px; background: #fff; }
  .card.helpful { border-color: #228b22; }
  .card.harmful { border-color: #d62728; }
  .pics { display: flex; gap: 4px; }
  img.pic { width: 160px; image-rendering: pixelated; display: block; }
  .card img.pic { width: 84px; }
  .meta { font-size: 12px; line-height: 1.35; margin-top: 4px; }
  .meta b { font-size: 13px; }
  .snippet { font-family: monospace; font-size: 12px; white-space: pre-wrap; word-break: break-word;
             max-height: 9em; overflow: hidden; background: #f7f7f7; padding: 4px; }
  .fields td { font-size: 12px; padding: 1px 4px; }
  .note { font-size: 12px; color: #555; max-width: 900px; margin: 6px 0; }
  h3 { font-size: 14px; margin: 8px 0 2px; }
  h3.helpful { color: #228b22; } h3.harmful { color: #d62728; }
  .pager { display: flex; gap: 10px; align-items: center; margin: 8px 0; }
  .ranking-switch { display: flex; gap: 6px; align-items: center; flex-wrap: wrap; margin: 0 0 8px; }
  .ranking-switch .note { margin: 0 0 0 8px; }
  .progress { font-weight: bold; }
  td img.pic { width: 64px; }
`;

const state = { runs: [], chosen: [], data: {}, view: "validation", val: null, ranking: "relative",
                sort: { key: "index", up: true }, page: 0, pageSize: 20 };

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const fmt = (x, digits = 4) => (x === null || x === undefined ? "-" : Number(x).toPrecision(digits));
const times = (x) => (x === null ? "-" : `${x >= 1000 ? Math.round(x).toLocaleString("en") : fmt(x, 3)}x`);
const signed = (x, digits = 3) => (x > 0 ? "+" : "") + fmt(x, digits);
const picture = (run, name, cls = "pic", alt = "") =>
  name ? h("img", { class: cls, src: `picture?run=${encodeURIComponent(run)}&name=${name}`, alt }) : null;

async function fetchJson(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

// An example as the run's kind shows it: its picture, its text, or its named values.
function body(run, kind, example, extra = null) {
  if (kind === "image") return h("div", { class: "pics" }, picture(run, example.image), extra);
  if (kind === "table" && example.fields.length) {
    return h("table", { class: "fields" },
      example.fields.map(([name, value]) => h("tr", {}, h("td", { class: "text" }, name), h("td", {}, value))));
  }
  if (example.tokens) return tokenText(example);
  return h("div", { class: "snippet" }, example.text);
}

// A sequence's tokens tinted by their share of its score: green where the token's loss lowers
// this validation loss, red where it raises it, the largest share in full colour (a token's
// leading space stays untinted).
function tokenText(example) {
  const largest = Math.max(1e-300, ...example.tokens.map(([, share]) => Math.abs(share ?? 0)));
  return h("div", { class: "snippet tokens" }, example.tokens.flatMap(([text, share]) => {
    if (share === null) return text;
    const lead = text.match(/^\s*/)[0];
    return [lead, h("span", { class: "tok", "data-share": share,
      title: `${signed(share, 3)}: ${Math.round((100 * share) / example.score)}% of the score`,
      style: `background: rgba(${share < 0 ? "34, 139, 34" : "214, 39, 40"}, ` +
             `${(0.8 * Math.abs(share) / largest).toFixed(3)})` }, text.slice(lead.length))];
  }));
}

function card(run, kind, entry, which) {
  const map = kind === "image" && entry.saliency ? picture(run, entry.saliency, "pic", "map") : null;
  const wrong = entry.label !== entry.prediction;
  const relative = entry.relative_score ?? null;
  return h("div", { class: `card ${which}`, "data-kind": which, "data-rank": entry.rank,
                    "data-index": entry.index, "data-score": entry.score, "data-relative": relative },
    body(run, kind, entry, map),
    h("div", { class: "meta" },
      h("b", {}, `#${entry.index}`), ` · rank ${entry.rank}`, h("br"),
      "label ", h("span", { class: wrong ? "wrong" : "" }, entry.label), " · predicted ", entry.prediction, h("br"),
      relative === null ? null : [`relative ${signed(relative, 4)}`, h("br")],
      `score ${signed(entry.score, 4)}`, h("br"),
      `if removed: loss ${signed(entry.removal_effect, 3)}`));
}

function validationRows(index) {
  const rows = index.validation.slice();
  const { key, up } = state.sort;
  const value = (v) => (key === "correct" ? (v.correct === null ? 0.5 : Number(v.correct)) : v[key]);
  rows.sort((a, b) => {
    const x = value(a), y = value(b);
    const order = x === y ? 0 : x === null ? 1 : y === null ? -1 : x < y ? -1 : 1;
    return up ? order : -order;
  });
  return rows;
}

function validationList(index) {
  const columns = [["index", "val index"], ["label", "label"], ["prediction", "predicted"],
                   ["loss", "loss"], ["correct", "correct"], ["spread", "spread"]];
  const head = h("tr", {}, columns.map(([key, title]) => h("th", {
    title: key === "spread" ? "sort; spread: standard deviation of its scores over the training set" : "sort", onclick: () => {
      state.sort = { key, up: state.sort.key === key ? !state.sort.up : key === "index" };
      draw();
    } }, title + (state.sort.key === key ? (state.sort.up ? " ▲" : " ▼") : ""))));
  const rows = validationRows(index).map((v) => h("tr", {
      class: `val${v.index === state.val ? " chosen" : ""}`, "data-val": v.index,
      onclick: () => { state.val = v.index; draw(); } },
    h("td", {}, v.index), h("td", {}, v.label), h("td", { class: v.correct === false ? "wrong" : "" }, v.prediction),
    h("td", {}, fmt(v.loss, 3)), h("td", {}, v.correct === null ? "-" : v.correct ? "yes" : "no"),
    h("td", {}, fmt(v.spread, 3))));
  return h("div", { class: "list" }, h("table", {}, head, rows));
}

// The relative ranking (score / sqrt(self-influence)) where the run has it, else the raw one.
const RANKING_NOTES = {
  relative: "Relative: ranked by score / √self-influence, the training examples most specific to " +
    "this one. The raw ranking favours examples with large gradients (outliers, mislabels), which " +
    "lead the lists of every example alike.",
  raw: "Raw: ranked by score, the predicted effect of up-weighting each training example on this " +
    "loss; examples with large gradients (outliers, mislabels) lead most lists.",
};

function rankingSwitch(runs) {
  const any = runs.some((run) => state.data[run].validation.some((v) => v.relative));
  const shown = any ? state.ranking : "raw";
  return h("div", { class: "ranking-switch", "data-ranking": shown }, h("b", {}, "Ranking: "),
    [["relative", "relative"], ["raw", "raw"]].map(([ranking, title]) => h("button", {
      class: `view ranking${shown === ranking ? " on" : ""}`, "data-ranking": ranking,
      disabled: ranking === "relative" && !any,
      title: ranking === "relative" && !any ? "needs self-influence (self_influence=True)" : null,
      onclick: () => { state.ranking = ranking; draw(); } }, title)),
    h("span", { class: "note" }, RANKING_NOTES[shown]));
}

function validationPanel(run, index) {
  const v = index.validation.find((entry) => entry.index === state.val);
  if (!v) return h("div", { class: "run" }, h("h2", {}, run), "This validation example is not scored in this run.");
  const loss = v.loss === null ? "" : ` · loss ${fmt(v.loss, 3)}`;
  const relative = state.ranking === "relative" && Boolean(v.relative);
  const lists = relative ? v.relative : v;
  const which = relative ? " by relative score" : v.relative ? " by raw score" : " by raw score (no self-influence in this run)";
  return h("div", { class: "run", "data-run": run, "data-val": v.index },
    h("h2", {}, run),
    h("div", { class: "query" }, body(run, index.kind, v),
      h("div", { class: "meta" }, h("b", {}, `Validation example ${v.index}`), h("br"),
        `label ${v.label} · predicted `, h("span", { class: v.correct === false ? "wrong" : "" }, v.prediction), loss)),
    h("h3", { class: "helpful" }, `Most helpful training examples${which} (they lower this loss)`),
    h("div", { class: "cards", "data-ranking": relative ? "relative" : "raw" },
      lists.helpful.map((e) => card(run, index.kind, e, "helpful"))),
    h("h3", { class: "harmful" }, `Most harmful training examples${which} (they raise this loss)`),
    h("div", { class: "cards", "data-ranking": relative ? "relative" : "raw" },
      lists.harmful.map((e) => card(run, index.kind, e, "harmful"))),
    h("p", { class: "note" },
      "Score: how much up-weighting the training example changes this loss (negative: it helped); ",
      "relative: the score over the square root of the example's self-influence. ",
      "'If removed' is the predicted change of this loss when the example is left out of training. ",
      index.kind === "image" && v.helpful.some((e) => e.saliency)
        ? "Beside a picture, its map: red pixels are those that raise this loss, blue ones lower it. " : "",
      lists.helpful.concat(lists.harmful).some((e) => e.tokens)
        ? "Tokens are tinted by their share of the score (hover for it): green ones lower this loss, " +
          "red ones raise it. " : "",
      "A training example with a wrong label can still be helpful: its input resembles this one, so learning ",
      "from it moves the model the same way. Judge labels by self-influence (the review), not by this panel."));
}

function checkedKey(run) { return `lightning-influence/checked/${run}`; }
function checkedSet(run) {
  try { return new Set(JSON.parse(localStorage.getItem(checkedKey(run)) || "[]")); } catch { return new Set(); }
}
function saveChecked(run, set) {
  try { localStorage.setItem(checkedKey(run), JSON.stringify([...set])); } catch { /* private mode */ }
}

function reviewCsv(run, index) {
  const checked = checkedSet(run);
  const head = ["rank", "index", "given_label", "predicted_label", "self_influence", "times_median", "checked", "input"];
  const quote = (x) => `"${String(x ?? "").replaceAll('"', '""')}"`;
  const lines = index.review.rows.map((r) => [r.rank, r.index, quote(r.label), quote(r.prediction),
    r.self_influence, r.times_median ?? "", checked.has(r.index) ? 1 : 0, quote(r.text)].join(","));
  return [head.join(","), ...lines].join("\n") + "\n";
}

function reviewPanel(run, index) {
  const rows = index.review.rows;
  if (!rows.length) return h("div", { class: "run" }, h("h2", {}, run), "Self-influence was not computed in this run.");
  const checked = checkedSet(run);
  const pages = Math.ceil(rows.length / state.pageSize);
  const page = Math.min(state.page, pages - 1);
  const shown = rows.slice(page * state.pageSize, (page + 1) * state.pageSize);
  const share = (100 * checked.size) / index.review.n_train;
  const toggle = (i) => { checked.has(i) ? checked.delete(i) : checked.add(i); saveChecked(run, checked); draw(); };
  const download = () => {
    const link = h("a", { href: URL.createObjectURL(new Blob([reviewCsv(run, index)], { type: "text/csv" })),
                          download: `${run.replaceAll("/", "_")}_review.csv` });
    document.body.append(link); link.click(); link.remove();
  };
  return h("div", { class: "run", "data-run": run },
    h("h2", {}, run),
    h("p", { class: "note" }, "Training examples ranked by self-influence: how much an example shapes its own ",
      "prediction. Mislabeled examples rank high; check their labels from the top. 'x median' compares with a typical example ",
      `(median ${fmt(index.review.median, 3)}).`),
    h("div", { class: "pager" },
      h("button", { onclick: () => { state.page = Math.max(0, page - 1); draw(); } }, "previous"),
      `page ${page + 1} of ${pages}`,
      h("button", { onclick: () => { state.page = Math.min(pages - 1, page + 1); draw(); } }, "next"),
      h("button", { onclick: () => { shown.forEach((r) => checked.add(r.index)); saveChecked(run, checked); draw(); } },
        "mark page checked"),
      h("button", { class: "download", onclick: download }, "download CSV"),
      h("span", { class: "progress" },
        `checked ${checked.size} of ${index.review.n_train} training examples (${share.toFixed(1)}%)`)),
    h("table", {},
      h("tr", {}, ["checked", "rank", "example", "index", "given label", "predicted", "self-influence", "x median"]
        .map((t) => h("th", { class: t === "example" ? "text" : "" }, t))),
      shown.map((r) => h("tr", { class: "review", "data-index": r.index },
        h("td", {}, h("input", { type: "checkbox", checked: checked.has(r.index), onchange: () => toggle(r.index) })),
        h("td", {}, r.rank), h("td", { class: "text" }, body(run, index.kind, r)), h("td", {}, r.index),
        h("td", {}, r.label), h("td", { class: r.label !== r.prediction ? "wrong" : "" }, r.prediction),
        h("td", {}, fmt(r.self_influence, 4)), h("td", {}, times(r.times_median))))));
}

function summaryPanel(run, index) {
  const s = index.summary;
  return h("div", { class: "run" }, h("h2", {}, run),
    h("p", {}, `${s.n_train} training x ${s.n_val} validation examples scored, damping ${s.damping}.`),
    s.solver ? h("p", { class: "note" }, `Solver: ${JSON.stringify(s.solver)}`) : null,
    h("table", {}, h("tr", {}, h("th", { class: "text" }, "diagnostic"), h("th", {}, "value")),
      Object.entries(s.diagnostics).map(([k, v]) => h("tr", {}, h("td", { class: "text" }, k), h("td", {}, fmt(v, 4))))));
}

function draw() {
  const root = document.getElementById("influence-root");
  const runs = state.chosen.filter((run) => state.data[run]);
  const header = h("header", {},
    h("span", { class: "runs" }, h("b", {}, "Runs: "), state.runs.map((run) => h("label", {},
      h("input", { type: "checkbox", checked: state.chosen.includes(run), onchange: (event) => {
        state.chosen = event.target.checked ? [...state.chosen, run] : state.chosen.filter((r) => r !== run);
        load().then(draw);
      } }), ` ${run}`))),
    [["validation", "Validation examples"], ["review", "Self-influence review"], ["summary", "Summary"]]
      .map(([view, title]) => h("button", { class: `view${state.view === view ? " on" : ""}`,
        onclick: () => { state.view = view; history.replaceState(null, "", `#${view}`); draw(); } }, title)));
  let main;
  if (!runs.length) {
    main = h("p", { class: "layout" }, state.runs.length ? "Choose a run." :
      "No influence results below the log folder yet: they appear once InfluenceCallback has run.");
  } else if (state.view === "validation") {
    const first = state.data[runs[0]];
    if (state.val === null || !first.validation.some((v) => v.index === state.val)) {
      state.val = first.validation.length ? validationRows(first)[0].index : null;
    }
    main = h("div", { class: "layout" }, validationList(first),
      h("div", {}, rankingSwitch(runs),
        h("div", { class: "runs-side" }, runs.map((run) => validationPanel(run, state.data[run])))));
  } else {
    const panel = state.view === "review" ? reviewPanel : summaryPanel;
    main = h("div", { class: "layout runs-side" }, runs.map((run) => panel(run, state.data[run])));
  }
  root.replaceChildren(header, main);
}

async function load() {
  await Promise.all(state.chosen.filter((run) => !state.data[run]).map(async (run) => {
    state.data[run] = await fetchJson(`index?run=${encodeURIComponent(run)}`);
  }));
}

export async function render() {
  document.head.append(h("style", {}, STYLE));
  document.body.append(h("div", { id: "influence-root" }, "Loading influence results..."));
  const view = location.hash.slice(1);  // #validation, #review or #summary opens that view
  if (["validation", "review", "summary"].includes(view)) state.view = view;
  state.runs = await fetchJson("runs");
  state.chosen = state.runs.slice(0, 4);
  await load();
  draw();
}
