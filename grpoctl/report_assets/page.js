// grpoctl report --html: the run page's viewer, inlined into the page.
// Data: the run summary in <script type="application/json" id="run-data">; each step's
// groups in its own step-NNNNNN.js file, loaded on demand by a <script> tag (fetch does
// not work from file://), which calls grpoctlStep(data).
// Model text is only ever put in the page with textContent (never innerHTML), so a
// completion holding <script> is shown, never run.
"use strict";
window.onerror = function (message, source, line) {
  var box = document.getElementById("errors");
  box.textContent += message + " (" + source + ":" + line + ")\n";
};

var RUN = JSON.parse(document.getElementById("run-data").textContent);
var PAGE = 25;            // groups rendered at a time; "more" renders the next ones
var loaded = {};          // step -> its data, once its file has run
var current = null;       // the step on screen
var visible = [];         // the groups of the current step that pass the filters
var rendered = 0;

function el(tag, className, text) {
  var node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function fmt(x) {
  if (x === null || x === undefined) return "—";
  return Number.isInteger(x) ? String(x) : x.toFixed(2);
}

function grpoctlStep(data) {
  loaded[data.step] = data;
  if (data.step === current) render();
}

function stepInfo(step) {
  for (var i = 0; i < RUN.steps.length; i++) if (RUN.steps[i].step === step) return RUN.steps[i];
  return null;
}

function status(text) { document.getElementById("status").textContent = text; }

function showStep(step) {
  current = step;
  var links = document.querySelectorAll("nav.steps a");
  for (var i = 0; i < links.length; i++)
    links[i].className = links[i].getAttribute("href") === "#step-" + step ? "current" : "";
  if (loaded[step]) { render(); return; }
  var info = stepInfo(step);
  if (!info) { status("this run has no step " + step); clearGroups(); return; }
  status("loading step " + step + "…");
  var script = document.createElement("script");
  script.src = info.script;
  script.charset = "utf-8";
  script.onerror = function () { status("cannot load " + info.script); };
  document.head.appendChild(script);
}

function fromHash() {
  var m = /^#step-(\d+)$/.exec(location.hash);
  var steps = RUN.steps;
  showStep(m ? Number(m[1]) : steps[steps.length - 1].step);
}

function clearGroups() {
  var box = document.getElementById("groups");
  while (box.firstChild) box.removeChild(box.firstChild);
  document.getElementById("more").hidden = true;
}

function matches(group, filter, needle) {
  if (filter === "tied" && group.kind !== "tied") return false;
  if (filter === "contrastive" && group.kind !== "contrastive") return false;
  if (filter === "right" && !group.recs.some(function (r) { return r.ok === true; })) return false;
  if (filter === "wrong" && !group.recs.some(function (r) { return r.ok === false; })) return false;
  if (!needle) return true;
  var texts = [group.id, group.p || "", group.g || ""];
  group.recs.forEach(function (r) { texts.push(r.c || ""); });
  return texts.some(function (t) { return t.toLowerCase().indexOf(needle) >= 0; });
}

function render() {
  var t0 = performance.now();
  var data = loaded[current];
  var filter = document.getElementById("filter").value;
  var needle = document.getElementById("search").value.trim().toLowerCase();
  visible = data.groups.filter(function (g) { return matches(g, filter, needle); });
  clearGroups();
  rendered = 0;
  document.getElementById("step-title").textContent = "Step " + data.step + " (" + data.file + ")";
  var m = data.metrics || {};
  status(data.groups.length + " groups, " + visible.length + " shown by the filters; " +
         "reward " + fmt(m.reward_mean) + ", accuracy " + fmt(m.accuracy) +
         ", tied groups " + fmt(m.zero_adv_frac));
  renderMore();
  document.body.setAttribute("data-render-ms", (performance.now() - t0).toFixed(1));
  document.body.setAttribute("data-step", String(data.step));
}

function renderMore() {
  var box = document.getElementById("groups");
  var end = Math.min(visible.length, rendered + PAGE);
  var tokens = document.getElementById("tokens").checked;
  var vocab = loaded[current].vocab || {};
  for (; rendered < end; rendered++) box.appendChild(groupNode(visible[rendered], tokens, vocab));
  var more = document.getElementById("more");
  more.hidden = rendered >= visible.length;
  more.textContent = "show " + Math.min(PAGE, visible.length - rendered) + " more of " +
                     (visible.length - rendered);
}

function pairText(group) {
  // G = 2: 2-GRPO's pairwise contrast, winner +1, loser -1, tie 0.
  if (group.recs.length !== 2 || group.kind === null) return null;
  var a = group.recs[0], b = group.recs[1];
  if (group.kind === "tied") {
    var both = a.ok === true ? "both right" : a.ok === false ? "both wrong" : "same reward";
    return "tied (" + both + "): no gradient";
  }
  var winner = a.r > b.r ? a : b;
  return "#" + winner.s + " won (" + fmt(a.r) + " vs " + fmt(b.r) + ")";
}

function groupNode(group, tokens, vocab) {
  var node = el("div", "group");
  node.id = "group-" + group.id;
  var title = el("h3", null, group.id);
  title.appendChild(el("span", "badge " + (group.kind || "unscored"), group.kind || "unscored"));
  var pair = pairText(group);
  if (pair) title.appendChild(el("span", "badge muted", pair));
  node.appendChild(title);
  if (group.p !== null) node.appendChild(el("pre", "prompt", group.p));
  node.appendChild(el("div", "muted", "gold: " + (group.g === null ? "—" : group.g)));
  var best = Math.max.apply(null, group.recs.map(function (r) { return r.r === null ? -Infinity : r.r; }));
  group.recs.forEach(function (r) {
    var rowClass = "completion";
    if (group.kind === "contrastive") rowClass += r.r === best ? " won" : " lost";
    var row = el("div", rowClass);
    var meta = el("div", "meta");
    var parts = ["#" + r.s];
    if (r.r !== null) {
      var comps = Object.keys(r.rc || {}).map(function (k) { return k + " " + fmt(r.rc[k]); });
      parts.push("reward " + fmt(r.r) + (comps.length ? " (" + comps.join(", ") + ")" : ""));
    }
    if (r.a !== null) parts.push("advantage " + (r.a > 0 ? "+" : "") + fmt(r.a));
    if (r.n !== null) parts.push(r.n + " tokens");
    if (r.f) parts.push(r.f === "stop" ? "stopped" : "cut at the limit");
    parts.push("answer: " + (r.x === null ? "none" : r.x) + (r.rule ? " (" + r.rule + ")" : ""));
    meta.appendChild(el("span", null, parts.join(" · ") + " "));
    if (r.ok !== null) meta.appendChild(el("span", r.ok ? "right" : "wrong", r.ok ? "✓ right" : "✗ wrong"));
    row.appendChild(meta);
    row.appendChild(el("pre", null, r.c));  // the record's text, exactly as the model wrote it
    if (tokens && r.t) row.appendChild(tokenNode(r, vocab));
    node.appendChild(row);
  });
  return node;
}

function tokenNode(r, vocab) {
  // Each token shaded by its probability under the sampler: white when sure, red when not.
  var pre = el("pre", "tokens");
  for (var i = 0; i < r.t.length; i++) {
    var lp = -r.q[i] / 100, p = Math.exp(lp);
    var text = vocab[r.t[i]];
    var span = el("span", "tok", text === undefined ? "[" + r.t[i] + "]" : text);
    if (p < 0.9) span.style.background = "rgba(230, 40, 40, " + (0.15 + 0.75 * (1 - p)).toFixed(2) + ")";
    span.title = "token " + r.t[i] + "  log-prob " + lp.toFixed(2) + "  p " + p.toFixed(3);
    pre.appendChild(span);
  }
  return pre;
}

document.getElementById("filter").addEventListener("change", function () { if (loaded[current]) render(); });
document.getElementById("search").addEventListener("input", function () { if (loaded[current]) render(); });
document.getElementById("tokens").addEventListener("change", function () { if (loaded[current]) render(); });
document.getElementById("more").addEventListener("click", renderMore);
window.addEventListener("hashchange", fromHash);
fromHash();
