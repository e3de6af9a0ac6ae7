"use strict";
const API = "/aibridge/api/v1/";
const COLORS = ["#3d5afe","#00a389","#ff8f00","#d81b60","#8e24aa","#546e7a","#43a047","#f4511e","#1e88e5","#6d4c41"];
const $ = (s, el=document) => el.querySelector(s);
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
const num = n => (n ?? 0).toLocaleString("en-US");
const usd = d => d.cost === "unpriced" || d.priced === false && d.cost_usd == null ? "unpriced"
               : "$" + (d.cost_usd ?? 0).toFixed(4) + (d.unpriced_models && d.unpriced_models.length ? " +unpriced" : "");
const when = t => t ? t.replace("T", " ").slice(0, 19) : "";
// The token lives in sessionStorage: gone with the tab, never shared with other tabs or written to disk.
let token = sessionStorage.getItem("aibridge_token") || "";
localStorage.removeItem("aibridge_token");  // left there by older versions
let me = null;

async function api(path, params={}) {
  const q = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v != null));
  const r = await fetch(API + path + (q.toString() ? "?" + q : ""), {headers: {Authorization: "Bearer " + token}});
  const body = await r.json();
  if (r.status === 401) { logout(); throw new Error("not signed in"); }
  if (!r.ok) throw new Error(body.error?.message || r.statusText);
  return body;
}
async function apiPost(path, body) {
  const r = await fetch(API + path, {method: "POST", body: JSON.stringify(body),
                                     headers: {Authorization: "Bearer " + token, "Content-Type": "application/json"}});
  const out = await r.json();
  if (!r.ok) throw new Error(out.error?.message || r.statusText);
  return out;
}
function logout() { sessionStorage.removeItem("aibridge_token"); token = ""; me = null; render(); }

function loginView(msg) {
  $("#app").innerHTML = `<div id="login" class="panel"><h2>aibridge dashboard</h2>
    <p class="muted">Sign in with your aibridge token (admins see everyone; others see their own usage).</p>
    <input id="tok" type="password" placeholder="aib_…" autocomplete="off"><button id="go">Sign in</button>
    <div class="err">${esc(msg || "")}</div></div>`;
  const go = async () => { token = $("#tok").value.trim(); sessionStorage.setItem("aibridge_token", token); render(); };
  $("#go").onclick = go; $("#tok").onkeydown = e => { if (e.key === "Enter") go(); };
}

function shell(active) {
  const tabs = [["overview","Overview"],["interceptions","Interceptions"],["sessions","Sessions"],["policy","Policy"],["tools","Tools"],["users","Users"]];
  $("#app").innerHTML = `<header><b>aibridge</b><nav>${tabs.map(([k, t]) =>
      `<a href="#/${k}" class="${k === active ? "on" : ""}">${t}</a>`).join("")}</nav>
    <span class="who">${esc(me.user)} (${esc(me.role)}) · <a href="#" id="out">sign out</a></span></header><main id="main">Loading…</main>`;
  $("#out").onclick = e => { e.preventDefault(); logout(); };
  return $("#main");
}

// A stacked bar chart as SVG: rows [{x, key, value}], one bar per x, one colour per key.
function stackedBars(rows, title, fmt) {
  const xs = [...new Set(rows.map(r => r.x))].sort(), keys = [...new Set(rows.map(r => r.key))];
  const W = 600, H = 220, P = 34, bw = Math.max(6, Math.min(40, (W - 2 * P) / Math.max(xs.length, 1) - 6));
  const totals = xs.map(x => rows.filter(r => r.x === x).reduce((a, r) => a + r.value, 0));
  const max = Math.max(1e-9, ...totals);
  let bars = "";
  xs.forEach((x, i) => {
    let y = H - P;
    const cx = P + i * ((W - 2 * P) / xs.length) + 3;
    keys.forEach((k, j) => {
      const v = rows.filter(r => r.x === x && r.key === k).reduce((a, r) => a + r.value, 0);
      if (!v) return;
      const h = (H - 2 * P) * v / max; y -= h;
      bars += `<rect x="${cx}" y="${y}" width="${bw}" height="${h}" fill="${COLORS[j % COLORS.length]}"><title>${esc(x)} ${esc(k)}: ${fmt(v)}</title></rect>`;
    });
    bars += `<text x="${cx + bw / 2}" y="${H - P + 14}" font-size="10" text-anchor="middle" fill="#6b7385">${esc(String(x).slice(5))}</text>`;
  });
  return `<div class="panel"><h2>${esc(title)}</h2>
    <svg viewBox="0 0 ${W} ${H}" width="100%" role="img" aria-label="${esc(title)}">
      <line x1="${P}" y1="${H - P}" x2="${W - P}" y2="${H - P}" stroke="#e3e6ee"/>
      <text x="${P}" y="${P - 10}" font-size="10" fill="#6b7385">max ${fmt(max)}</text>${bars}</svg>
    <div class="legend">${keys.map((k, j) => `<span><i style="background:${COLORS[j % COLORS.length]}"></i>${esc(k)}</span>`).join("")}</div></div>`;
}

async function downloadCsv(path, params, name) {
  // The token travels in a header, never in a link: fetched, then saved from a blob.
  const q = new URLSearchParams(Object.entries({...params, format: "csv"}).filter(([, v]) => v !== "" && v != null));
  const r = await fetch(API + path + "?" + q, {headers: {Authorization: "Bearer " + token}});
  if (!r.ok) { alert("download failed: " + r.statusText); return; }
  const a = document.createElement("a");
  a.href = URL.createObjectURL(await r.blob()); a.download = name; a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

function isoDay(offsetDays = 0) { return new Date(Date.now() + offsetDays * 86400000).toISOString().slice(0, 10); }

async function overview(main) {
  const stack = sessionStorage.getItem("stack") || "model";
  const lead = sessionStorage.getItem("lead") || "user";  // who called, or whom it was for (service accounts)
  const bucket = sessionStorage.getItem("bucket") || "day";
  const from = sessionStorage.getItem("from") || isoDay(-30);
  const to = sessionStorage.getItem("to") || "";  // empty: up to now
  // `until` is exclusive: the day after the last day chosen.
  const until = to ? new Date(Date.parse(to) + 86400000).toISOString().slice(0, 10) : "";
  const range = {since: from, until};
  const [users, models, groups, clients, providers, days, ts, budgets] = await Promise.all([
    api("usage", {group_by: lead, ...range}), api("usage", {group_by: "model", ...range}),
    api("usage", {group_by: "group", ...range}), api("usage", {group_by: "client", ...range}),
    api("usage", {group_by: "provider", ...range}), api("usage", {group_by: "day", ...range}),
    api("usage/timeseries", {stack, bucket, ...range}), api("budgets")]);
  const tot = users.data.reduce((a, d) => ({i: a.i + d.interceptions, inp: a.inp + d.input_tokens + d.cache_read_input_tokens + d.cache_write_input_tokens,
                                           out: a.out + d.output_tokens, c: a.c + d.cost_usd}), {i: 0, inp: 0, out: 0, c: 0});
  const table = (rows, key) => `<table><tr><th>${key}</th><th class="n">calls</th><th class="n">input</th><th class="n">output</th><th class="n">cache read</th><th class="n">cost</th></tr>
    ${rows.map(d => `<tr data-key="${esc(d[key])}"><td>${esc(d[key])}</td><td class="n">${num(d.interceptions)}</td><td class="n">${num(d.input_tokens)}</td>
      <td class="n">${num(d.output_tokens)}</td><td class="n">${num(d.cache_read_input_tokens)}</td><td class="n cost">${usd(d)}</td></tr>`).join("")}</table>`;
  const csvButton = (id) => `<button class="csv" data-csv="${id}" title="download as CSV">CSV</button>`;
  const amount = (limit, v) => limit.startsWith("usd") ? "$" + Number(v ?? 0).toFixed(2) : num(Math.round(v ?? 0));
  const share = u => `<span class="bar"><span style="width:${Math.min(100, Math.round(100 * u.share))}%" class="${u.share >= 1 ? "over" : u.share >= 0.85 ? "near" : ""}"></span></span> ${Math.round(100 * u.share)} %`;
  const budgetUsers = budgets.users.length ? `<table id="budget-users"><tr><th>user</th><th>limit</th><th>from</th><th class="n">used</th><th class="n">limit</th><th>use</th><th class="n">forecast</th></tr>
    ${budgets.users.map(u => `<tr data-key="${esc(u.user)}:${esc(u.limit)}"><td>${esc(u.user)}</td><td>${esc(u.limit)}</td><td class="muted">${esc(u.from)}</td>
      <td class="n">${amount(u.limit, u.used)}</td><td class="n">${amount(u.limit, u.value)}</td><td>${share(u)}</td><td class="n">${amount(u.limit, u.forecast)}</td></tr>`).join("")}</table>`
    : `<p class="muted">No budgets apply (budgets: in the config).</p>`;
  const budgetGroups = budgets.groups.length ? `<table id="budget-groups"><tr><th>group</th><th>limit</th><th class="n">per member</th><th class="n">members</th><th class="n">used</th><th class="n">forecast</th><th class="n">near</th><th class="n">at limit</th></tr>
    ${budgets.groups.map(g => `<tr data-key="${esc(g.group)}:${esc(g.limit)}"><td>${esc(g.group)}</td><td>${esc(g.limit)}</td><td class="n">${amount(g.limit, g.value_per_member)}</td>
      <td class="n">${num(g.members)}</td><td class="n">${amount(g.limit, g.used)}</td><td class="n">${amount(g.limit, g.forecast)}</td><td class="n">${num(g.near)}</td><td class="n">${num(g.at_limit)}</td></tr>`).join("")}</table>` : "";
  const unpriced = models.data.filter(d => d.unpriced_models && d.unpriced_models.length).map(d => d.model);
  const warning = unpriced.length ? `<div class="panel warn" id="unpriced-warning" role="alert"><strong>Unpriced models:</strong>
      ${unpriced.map(m => `<code>${esc(m)}</code>`).join(", ")} — their calls are not in the spend shown. Set a price with
      <code>aibridge prices set MODEL --input … --output …</code> (docs/prices.md).</div>` : "";
  const per = {day: "day", week: "week", month: "month"}[bucket];
  main.innerHTML = warning + `<div class="filters" id="range">From <input type="date" id="from" value="${esc(from)}"> to <input type="date" id="to" value="${esc(to)}">
      per <select id="bucket">${["day", "week", "month"].map(b => `<option ${b === bucket ? "selected" : ""}>${b}</option>`).join("")}</select>
      Stack charts by <select id="stack">${["model","client","user","person","provider","group"].map(s => `<option ${s === stack ? "selected" : ""}>${s}</option>`).join("")}</select>
      <span class="muted">prices of ${esc(users.prices_taken || "n/a")}; unpriced models are marked, never counted as $0</span></div>
    <div class="cards">
      <div class="card"><div class="k">Spend in range</div><div class="v" id="total-cost">$${tot.c.toFixed(2)}</div></div>
      <div class="card"><div class="k">Interceptions</div><div class="v">${num(tot.i)}</div></div>
      <div class="card"><div class="k">Input tokens</div><div class="v">${num(tot.inp)}</div></div>
      <div class="card"><div class="k">Output tokens</div><div class="v">${num(tot.out)}</div></div>
      <div class="card"><div class="k">Active users, last day</div><div class="v">${num(days.data.at(-1)?.active_users)}</div></div></div>
    <div class="grid2">${stackedBars(ts.data.map(d => ({x: d.day, key: d[stack] ?? "?", value: d.input_tokens + d.output_tokens + d.cache_read_input_tokens + d.cache_write_input_tokens})), `Tokens per ${per} by ` + stack, num)}
      ${stackedBars(ts.data.map(d => ({x: d.day, key: d[stack] ?? "?", value: d.cost_usd})), `Cost per ${per} by ` + stack, v => "$" + v.toFixed(2))}</div>
    <div class="grid2">${stackedBars(days.data.map(d => ({x: d.day, key: "active users", value: d.active_users})), "Adoption: active users per day", num)}
      <div class="panel"><h2>Top users <select id="lead">${[["user", "by caller"], ["person", "by person acted for"]].map(([v, t]) =>
        `<option value="${v}" ${v === lead ? "selected" : ""}>${t}</option>`).join("")}</select> ${csvButton("lead")}</h2>
        <div id="leaderboard">${table(users.data, lead)}</div></div></div>
    <div class="grid2"><div class="panel"><h2>Spend by model ${csvButton("model")}</h2><div id="by-model">${table(models.data, "model")}</div></div>
      <div class="panel"><h2>Spend by group ${csvButton("group")}</h2><div id="by-group">${table(groups.data, "group")}</div>
        <p class="muted">A person in two groups counts in both.</p></div></div>
    <div class="grid2"><div class="panel"><h2>Spend by client ${csvButton("client")}</h2><div id="by-client">${table(clients.data, "client")}</div></div>
      <div class="panel"><h2>Spend by provider ${csvButton("provider")}</h2><div id="by-provider">${table(providers.data, "provider")}</div></div></div>
    <div class="panel" id="budgets"><h2>Budget use (current day, ISO week, month; forecast to the period's end) ${csvButton("budgets")}</h2>
      ${budgetUsers}${budgetGroups}</div>`;
  const keep = (key, value) => { sessionStorage.setItem(key, value); render(); };
  $("#stack").onchange = e => keep("stack", e.target.value);
  $("#lead").onchange = e => keep("lead", e.target.value);
  $("#bucket").onchange = e => keep("bucket", e.target.value);
  $("#from").onchange = e => keep("from", e.target.value || isoDay(-30));
  $("#to").onchange = e => keep("to", e.target.value);
  main.querySelectorAll("button.csv").forEach(b => b.onclick = () => {
    const what = b.dataset.csv;
    if (what === "budgets") return downloadCsv("budgets", {}, "aibridge-budgets.csv");
    const by = what === "lead" ? lead : what;
    return downloadCsv("usage", {group_by: by, ...range}, `aibridge-usage-by-${by}.csv`);
  });
}

function interceptionRows(rows) {
  return `<table id="interceptions"><tr><th>started</th><th>user</th><th>client</th><th>model</th><th>status</th>
    <th class="n">input</th><th class="n">output</th><th class="n">tools</th><th class="n">cost</th></tr>
    ${rows.map(i => `<tr class="click" data-id="${i.id}"><td>${when(i.started_at)}</td><td>${esc(i.user)}${i.on_behalf_of ? ` <span class="muted">for ${esc(i.on_behalf_of)}</span>` : ""}</td><td>${esc(i.client)}</td>
      <td>${esc(i.model)}</td><td class="${i.status === "failed" ? "failed" : ""}">${esc(i.status)}</td><td class="n">${num(i.input_tokens)}</td>
      <td class="n">${num(i.output_tokens)}</td><td class="n">${num(i.tool_calls)}</td><td class="n">${usd(i)}</td></tr>`).join("")}</table>`;
}
function wireRows(el) { el.querySelectorAll("tr.click[data-id]").forEach(tr => tr.onclick = () => go("#/interceptions/" + tr.dataset.id)); }

async function interceptions(main) {
  const f = JSON.parse(sessionStorage.getItem("filters") || "{}");
  const [clients, models] = await Promise.all([api("clients"), api("models")]);
  const opt = (list, v) => `<option value="">any</option>` + list.data.map(c => `<option ${c.value === v ? "selected" : ""}>${esc(c.value)}</option>`).join("");
  main.innerHTML = `<div class="filters">
      <input id="f-initiator" placeholder="user" value="${esc(f.initiator || "")}">
      <input id="f-on_behalf_of" placeholder="on behalf of" value="${esc(f.on_behalf_of || "")}">
      <input id="f-provider" placeholder="provider" value="${esc(f.provider || "")}">
      <select id="f-model">${opt(models, f.model)}</select><select id="f-client">${opt(clients, f.client)}</select>
      <input id="f-started_after" placeholder="since (7d or 2026-01-01)" value="${esc(f.started_after || "")}">
      <button id="apply">Filter</button></div><div id="rows">Loading…</div><button id="more" hidden>More</button>`;
  let cursor = null, all = [];
  const load = async () => {
    const page = await api("interceptions", {...f, limit: 50, cursor});
    all = all.concat(page.data); cursor = page.next_cursor;
    $("#rows").innerHTML = interceptionRows(all); wireRows($("#rows")); $("#more").hidden = !cursor;
  };
  $("#apply").onclick = () => {
    for (const k of ["initiator","on_behalf_of","provider","model","client","started_after"]) f[k] = $("#f-" + k).value.trim();
    sessionStorage.setItem("filters", JSON.stringify(f)); render();
  };
  $("#more").onclick = load;
  await load();
}

async function detail(main, id) {
  const d = await api("interceptions/" + encodeURIComponent(id));
  const usage = d.token_usages.map(u => `<tr><td>${esc(u.provider_response_id)}</td><td class="n">${num(u.input_tokens)}</td><td class="n">${num(u.output_tokens)}</td>
      <td class="n">${num(u.cache_read_input_tokens)}</td><td class="n">${num(u.cache_write_input_tokens)}</td></tr>`).join("");
  main.innerHTML = `<p><a href="#/interceptions">← interceptions</a>${d.session ? ` · <a href="#/sessions/${encodeURIComponent(d.session)}">session</a>` : ""}</p>
    <div class="panel"><h2>${esc(d.model)} · ${esc(d.user)} · ${esc(d.client)} · <span class="${d.status === "failed" ? "failed" : ""}">${esc(d.status)}</span></h2>
      <p class="muted">${when(d.started_at)} → ${when(d.ended_at)} · ${esc(d.provider_name)} (${esc(d.api)}${d.stream ? ", streaming" : ""}) ·
        ${esc(d.credential_kind)} ${esc(d.credential_hint)} · cost <span id="detail-cost">${usd(d)}</span>${d.error ? ` · <span class="failed">${esc(d.error)}</span>` : ""}</p></div>
    <div class="panel"><h2>Prompt${d.purpose && d.purpose !== "chat" ? ` <span class="muted">(the client's own call: ${esc(d.purpose)})</span>` : ""}</h2>${d.prompts.map(p =>
      `<pre class="prompt">${esc(p.typed ?? p.prompt)}</pre>${p.typed != null && p.typed !== p.prompt
        ? `<details><summary class="muted">as sent</summary><pre class="raw-prompt">${esc(p.prompt)}</pre></details>` : ""}`).join("") || '<p class="muted">none (tool results only)</p>'}</div>
    <div class="panel"><h2>Tool calls</h2><table id="tools"><tr><th>tool</th><th>injected</th><th>input</th><th>error</th></tr>
      ${d.tool_usages.map(t => `<tr><td class="tool">${esc(t.tool)}</td><td>${t.injected ? "yes (" + esc(t.server_url) + ")" : "no"}</td>
        <td><pre>${esc(t.input)}</pre></td><td class="failed">${esc(t.invocation_error)}</td></tr>`).join("")}</table></div>
    <div class="panel"><h2>Policy decisions</h2>${d.policy_decisions && d.policy_decisions.length
      ? decisionRows(d.policy_decisions, false) : '<p class="muted">none</p>'}</div>
    <div class="panel"><h2>Thoughts</h2>${d.thoughts.map(t => `<p class="muted">${esc(t.source)}</p><pre>${esc(t.content)}</pre>`).join("") || '<p class="muted">none</p>'}</div>
    <div class="panel"><h2>Token usage</h2><table><tr><th>response</th><th class="n">input</th><th class="n">output</th><th class="n">cache read</th><th class="n">cache write</th></tr>${usage}</table></div>`;
}

// Policy decisions: enforced ones as recorded, monitored ones (enforced false) marked as such.
function decisionRows(rows, withCall = true) {
  return `<table class="decisions"><tr><th>when</th>${withCall ? "<th>user</th>" : ""}<th>rule</th><th>action</th><th>mode</th><th>hook</th>
      <th>tool</th><th>detectors</th><th>message</th>${withCall ? "<th>call</th>" : ""}</tr>
    ${rows.map(x => `<tr data-decision="${esc(x.id)}"><td>${when(x.created_at)}</td>${withCall ? `<td>${esc(x.user)}</td>` : ""}
      <td class="rule">${esc(x.rule)}</td><td class="action ${x.action === "deny" && x.enforced ? "failed" : ""}">${esc(x.action)}</td>
      <td class="mode">${x.enforced ? "enforced" : '<span class="muted">monitor</span>'}</td><td>${esc(x.hook)}</td>
      <td>${esc(x.tool)}</td><td class="detectors">${(x.detectors || []).map(esc).join(", ")}</td><td class="message">${esc(x.message)}</td>
      ${withCall ? `<td>${x.interception_id ? `<a href="#/interceptions/${encodeURIComponent(x.interception_id)}">${esc(String(x.interception_id).slice(0, 8))}</a>` : ""}</td>` : ""}</tr>`).join("")}</table>`;
}

async function policyView(main) {
  const f = JSON.parse(sessionStorage.getItem("policy_filters") || '{"since":"7d"}');
  const [summary, recent] = await Promise.all([api("policy/decisions/summary", f), api("policy/decisions", {...f, limit: 200})]);
  const actions = [...new Set(summary.by_user.flatMap(u => Object.keys(u.actions)))].sort();
  main.innerHTML = `<div class="filters">
      <input id="p-since" placeholder="since (7d or 2026-01-01)" value="${esc(f.since || "")}">
      <input id="p-rule" placeholder="rule" value="${esc(f.rule || "")}">
      <input id="p-action" placeholder="action" value="${esc(f.action || "")}">
      ${me.role === "admin" ? `<input id="p-user" placeholder="user" value="${esc(f.user || "")}">` : ""}
      <button id="p-apply">Filter</button></div>
    <div class="grid2"><div class="panel"><h2>Decisions per rule and action</h2><table id="policy-summary">
        <tr><th>rule</th><th>action</th><th class="n">decisions</th><th class="n">enforced</th><th class="n">monitor</th><th class="n">users</th><th>latest</th></tr>
        ${summary.data.map(r => `<tr data-rule="${esc(r.rule)}" data-action="${esc(r.action)}"><td>${esc(r.rule)}</td><td>${esc(r.action)}</td>
          <td class="n">${num(r.decisions)}</td><td class="n">${num(r.enforced)}</td><td class="n">${num(r.monitored)}</td>
          <td class="n">${num(r.users)}</td><td>${when(r.last_at)}</td></tr>`).join("")}</table>
        ${summary.data.length ? "" : '<p class="muted">no decisions</p>'}</div>
      <div class="panel"><h2>Decisions per user</h2><table id="policy-users">
        <tr><th>user</th><th class="n">decisions</th><th class="n">enforced</th>${actions.map(a => `<th class="n">${esc(a)}</th>`).join("")}</tr>
        ${summary.by_user.map(u => `<tr data-user="${esc(u.user)}"><td>${esc(u.user)}</td><td class="n">${num(u.decisions)}</td><td class="n">${num(u.enforced)}</td>
          ${actions.map(a => `<td class="n">${num(u.actions[a])}</td>`).join("")}</tr>`).join("")}</table></div></div>
    <div class="panel"><h2>Recent decisions</h2><div id="recent-decisions">${recent.data.length ? decisionRows(recent.data) : '<p class="muted">none</p>'}</div></div>`;
  $("#p-apply").onclick = () => {
    for (const k of ["since", "rule", "action", "user"]) { const el = $("#p-" + k); if (el) f[k] = el.value.trim(); }
    sessionStorage.setItem("policy_filters", JSON.stringify(f)); render();
  };
}

// MCP gateway calls (/aibridge/mcp): what agents called, through which server, how it went.
function callRows(rows) {
  return `<table class="calls"><tr><th>when</th><th>user</th><th>client</th><th>server</th><th>tool</th><th>outcome</th>
      <th class="n">ms</th><th class="n">bytes</th><th>error</th></tr>
    ${rows.map(c => `<tr data-call="${esc(c.id)}"><td>${when(c.created_at)}</td><td>${esc(c.user)}</td>
      <td>${esc(c.client)}${c.client_version ? ' <span class="muted">' + esc(c.client_version) + "</span>" : ""}</td>
      <td>${esc(c.server)}</td><td class="tool">${esc(c.tool)}${c.method !== "tools/call" ? ' <span class="muted">' + esc(c.method) + "</span>" : ""}</td>
      <td class="outcome ${c.is_error ? "failed" : ""}">${esc(c.outcome)}</td><td class="n">${num(c.duration_ms)}</td>
      <td class="n">${num(c.result_bytes)}</td><td class="error">${esc(c.error)}</td></tr>`).join("")}</table>`;
}

async function toolsView(main) {
  const f = JSON.parse(sessionStorage.getItem("tools_filters") || '{"since":"7d"}');
  const [servers, summary, recent] = await Promise.all([api("mcp/servers"), api("mcp/calls/summary", f),
                                                        api("mcp/calls", {...f, limit: 200})]);
  const state = s => s.available === true ? "available" : s.available === false ? "unavailable" : "not listed yet";
  main.innerHTML = `<div class="filters">
      <input id="t-since" placeholder="since (7d or 2026-01-01)" value="${esc(f.since || "")}">
      <input id="t-server" placeholder="server" value="${esc(f.server || "")}">
      <input id="t-tool" placeholder="tool" value="${esc(f.tool || "")}">
      ${me.role === "admin" ? `<input id="t-user" placeholder="user" value="${esc(f.user || "")}">` : ""}
      <label><input id="t-errors" type="checkbox" ${f.errors ? "checked" : ""}> failures only</label>
      <button id="t-apply">Filter</button></div>
    <div class="panel"><h2>MCP servers</h2><table id="mcp-servers">
      <tr><th>server</th><th>state</th><th class="n">tools</th><th class="n">resources</th><th class="n">prompts</th><th>why</th></tr>
      ${servers.data.map(s => `<tr data-server="${esc(s.server)}"><td>${esc(s.server)}${s.per_user_token ? ' <span class="muted">per-user token</span>' : ""}${s.transport && s.transport !== "auto" ? ` <span class="muted">${esc(s.transport)}</span>` : ""}${s.oauth ? ` <span class="muted">OAuth: ${me.role === "admin" ? `${num(s.signed_in)} signed in` : s.signed_in ? "signed in" : "sign-in needed"}</span> <button class="signin" data-server="${esc(s.server)}">Sign in</button>` : ""}</td>
        <td class="state ${s.available === false ? "failed" : ""}">${state(s)}</td><td class="n">${num(s.tools)}</td>
        <td class="n">${num(s.resources)}</td><td class="n">${num(s.prompts)}</td><td class="error">${esc(s.error)}</td></tr>`).join("")}</table>
      ${servers.data.length ? "" : '<p class="muted">no MCP servers configured (mcp_servers)</p>'}
      ${servers.data.some(s => s.oauth) ? `<p class="muted">Sign in: opens the server's sign-in page; the gateway keeps the tokens.
        ${me.role === "admin" ? 'For user <input id="t-signin-user" placeholder="user (default: you)">' : ""}</p><div class="err" id="t-signin-msg"></div>` : ""}</div>
    <div class="grid2"><div class="panel"><h2>Calls per server and tool</h2><table id="mcp-tools">
        <tr><th>server</th><th>tool</th><th class="n">calls</th><th class="n">failures</th><th class="n">users</th><th class="n">avg ms</th><th class="n">slowest ms</th><th>latest</th></tr>
        ${summary.data.map(t => `<tr data-tool="${esc(t.server)}/${esc(t.tool)}"><td>${esc(t.server)}</td><td>${esc(t.tool)}</td>
          <td class="n">${num(t.calls)}</td><td class="n ${t.errors ? "failed" : ""}">${num(t.errors)}</td><td class="n">${num(t.users)}</td>
          <td class="n">${num(t.avg_ms)}</td><td class="n">${num(t.max_ms)}</td><td>${when(t.last_at)}</td></tr>`).join("")}</table>
        ${summary.data.length ? "" : '<p class="muted">no calls</p>'}</div>
      <div class="panel"><h2>Calls per user</h2><table id="mcp-users">
        <tr><th>user</th><th class="n">calls</th><th class="n">failures</th><th class="n">tools</th><th>latest</th></tr>
        ${summary.by_user.map(u => `<tr data-user="${esc(u.user)}"><td>${esc(u.user)}</td><td class="n">${num(u.calls)}</td>
          <td class="n">${num(u.errors)}</td><td class="n">${num(u.tools)}</td><td>${when(u.last_at)}</td></tr>`).join("")}</table></div></div>
    <div class="panel"><h2>Slowest calls</h2><div id="mcp-slowest">${summary.slowest.length ? callRows(summary.slowest) : '<p class="muted">none</p>'}</div></div>
    <div class="panel"><h2>Recent calls</h2><div id="mcp-recent">${recent.data.length ? callRows(recent.data) : '<p class="muted">none</p>'}</div></div>`;
  for (const b of main.querySelectorAll("button.signin")) b.onclick = async () => {
    const user = ($("#t-signin-user")?.value || "").trim();
    try {
      const login = await apiPost("mcp/oauth/login", {server: b.dataset.server, ...(user ? {user} : {})});
      $("#t-signin-msg").textContent = `signing ${login.user} in to ${login.server}: finish in the window that opened`;
      window.open(login.url, "_blank", "noopener");
    } catch (e) { $("#t-signin-msg").textContent = e.message; }
  };
  $("#t-apply").onclick = () => {
    for (const k of ["since", "server", "tool", "user"]) { const el = $("#t-" + k); if (el) f[k] = el.value.trim(); }
    f.errors = $("#t-errors").checked ? "true" : "";
    sessionStorage.setItem("tools_filters", JSON.stringify(f)); render();
  };
}

async function usersView(main) {
  const [users, groups] = await Promise.all([api("users"), api("groups")]);
  main.innerHTML = `<div class="grid2"><div class="panel"><h2>Users</h2><table id="users">
      <tr><th>user</th><th>role</th><th>groups</th><th class="n">active tokens</th><th>since</th></tr>
      ${users.data.map(u => `<tr data-user="${esc(u.name)}"><td>${esc(u.name)}${u.service_account ? ' <span class="muted">service account</span>' : ""}</td>
        <td>${esc(u.role)}</td><td class="groups">${u.groups.map(esc).join(", ")}</td><td class="n">${num(u.active_tokens)}</td>
        <td>${when(u.created_at)}</td></tr>`).join("")}</table></div>
    <div class="panel"><h2>Groups</h2><table id="groups"><tr><th>group</th><th class="n">users</th><th>members</th></tr>
      ${groups.data.map(g => `<tr data-group="${esc(g.group)}"><td>${esc(g.group)}</td><td class="n">${num(g.users)}</td>
        <td class="members">${g.members.map(esc).join(", ")}</td></tr>`).join("")}</table>
      ${groups.data.length ? "" : '<p class="muted">no groups (aibridge users groups set NAME a,b)</p>'}</div></div>`;
}

// One session as people read it: the person's turns (as typed), then its threads (a call and the calls answering
// its tool calls) with their calls; the client's own calls (titles, routers, memory: `purpose`) marked apart.
function sessionThreads(d) {
  const call = c => `<tr class="click${c.kind === "auxiliary" ? " aux" : ""}" data-id="${c.id}" data-kind="${c.kind}"><td>${when(c.started_at)}</td>
      <td>${esc(c.kind === "auxiliary" ? c.purpose : c.kind)}</td><td>${esc(c.model)}</td><td class="${c.status === "failed" ? "failed" : ""}">${esc(c.status)}</td>
      <td class="n">${num(c.input_tokens)}</td><td class="n">${num(c.output_tokens)}</td><td class="n">${num(c.tool_calls)}</td></tr>`;
  return `<table id="interceptions"><tr><th>started</th><th>call</th><th>model</th><th>status</th><th class="n">input</th><th class="n">output</th><th class="n">tools</th></tr>
    ${d.threads.map(t => `<tr class="thread" data-root="${t.root}" data-kind="${t.kind}"><td colspan="7"><b>${t.kind === "auxiliary"
        ? `client's own call: ${esc(t.purpose)}` : (t.prompt != null ? "turn: " + esc(t.prompt.slice(0, 200)) : "thread")}</b>
        <span class="muted">${t.calls.length} call${t.calls.length === 1 ? "" : "s"}</span></td></tr>${t.calls.map(call).join("")}`).join("")}</table>`;
}

async function sessionsView(main, session) {
  if (session) {
    const d = await api("sessions/" + encodeURIComponent(session));
    main.innerHTML = `<p><a href="#/sessions">← sessions</a></p><div class="panel"><h2>Session ${esc(session)}</h2>
      <p class="muted">${esc(d.user)} · ${esc(d.client)} · ${when(d.first_at)} → ${when(d.last_at)} · ${d.interceptions} calls ·
        <span id="human-turns">${d.human_turns}</span> human turns · <span id="auxiliary-calls">${d.auxiliary}</span> calls of the client's own · ${usd(d)}</p></div>
      <div class="panel"><h2>Turns</h2><ol id="turns">${d.turns.map(t => `<li data-id="${t.id}"><pre class="prompt">${esc(t.prompt)}</pre></li>`).join("")}</ol>
        ${d.turns.length ? "" : '<p class="muted">none</p>'}</div>
      <div class="panel"><h2>Threads</h2>${sessionThreads(d)}</div>`;
    wireRows(main);
    return;
  }
  const s = await api("sessions", {limit: 200});
  main.innerHTML = `<table id="sessions"><tr><th>last activity</th><th>user</th><th>client</th><th>session</th><th class="n">calls</th><th class="n">human turns</th>
      <th class="n">client's own</th><th class="n">tool calls</th><th class="n">input</th><th class="n">output</th><th class="n">cost</th></tr>
    ${s.data.map(x => `<tr class="click" data-session="${esc(x.session)}"><td>${when(x.last_at)}</td><td>${esc(x.user)}</td><td>${esc(x.client)}</td>
      <td class="muted">${esc(x.session.slice(0, 36))}</td><td class="n">${x.interceptions}</td><td class="n turns">${x.human_turns}</td><td class="n">${x.auxiliary}</td><td class="n">${x.tool_calls}</td>
      <td class="n">${num(x.input_tokens)}</td><td class="n">${num(x.output_tokens)}</td><td class="n">${usd(x)}</td></tr>`).join("")}</table>`;
  main.querySelectorAll("tr.click").forEach(tr => tr.onclick = () => go("#/sessions/" + encodeURIComponent(tr.dataset.session)));
}

// body[data-ready] is "1" once a view has its data (tests and scripts wait on it). It is cleared the moment a
// navigation starts, not when the browser later fires hashchange, so nobody reads the previous view as the next.
function go(hash) { if (hash !== location.hash) { document.body.dataset.ready = ""; location.hash = hash; } }
document.addEventListener("click", e => {
  const a = e.target.closest && e.target.closest('a[href^="#"]');
  if (a && a.getAttribute("href") !== location.hash) document.body.dataset.ready = "";
}, true);
async function render() {
  document.body.dataset.ready = "";
  if (!token) return loginView();
  try { me = me || await api("me"); } catch (e) { return loginView(e.message); }
  let view, arg;
  try {
    [, view, arg] = (location.hash || "#/overview").split("/").map(decodeURIComponent);
  } catch (e) {
    shell("").innerHTML = `<p class="err">This address is malformed (${esc(e.message)}). <a href="#/overview">Go to the overview</a>.</p>`;
    document.body.dataset.ready = "1";
    return;
  }
  const main = shell(view || "overview");
  try {
    if (view === "interceptions" && arg) await detail(main, arg);
    else if (view === "interceptions") await interceptions(main);
    else if (view === "sessions") await sessionsView(main, arg);
    else if (view === "policy") await policyView(main);
    else if (view === "tools") await toolsView(main);
    else if (view === "users") await usersView(main);
    else if (!view || view === "overview") await overview(main);
    else throw new Error(`There is no page "${view}". Go to the overview.`);
    document.body.dataset.ready = "1";
  } catch (e) { main.innerHTML = `<p class="err">${esc(e.message)}</p>`; document.body.dataset.ready = "1"; }
}
window.addEventListener("hashchange", render);
render();
