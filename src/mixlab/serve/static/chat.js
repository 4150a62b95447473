// The chat page: streams /v1/chat/completions (server-sent events) with return_experts, and colours
// each generated token by the expert it was sent to in the chosen layer. No dependencies, no build.
"use strict";
const $ = (id) => document.getElementById(id);
const PALETTE = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
                 "#d9d9d9", "#bc80bd", "#ccebc5", "#ffed6f"];
const colourOf = (e) => e < PALETTE.length ? PALETTE[e] : `hsl(${(e * 137.5) % 360}, 70%, 80%)`;
// messages: the conversation, {role, content}; a reply also keeps the model that wrote it (a served LoRA
// adapter, chosen under Settings, or the base model `model`), its tokens, [text, experts per layer],
// to be drawn again coloured, and cut: true when it stopped at max tokens, stopped: true when Stop ended it,
// interrupted: why else it ended early (the page was left while it streamed, the stream was cut off;
// true from an older page: the page was left) (streaming: that reply's {history, tokens, model})
let model = null, info = {}, context = Infinity, messages = [], controller = null, streaming = null, leaving = false;

// Kept across a reload: the conversation in sessionStorage, this tab's own (two tabs on one server
// keep two conversations), and the last one saved in localStorage too, which a new tab starts from (a
// closed tab's conversation is not lost); the settings in localStorage (this browser, for this server's
// address); the API key in sessionStorage only (this tab, until it is closed). A stored value that is
// not what this page writes (corrupt, another version) is ignored.
const SETTINGS = ["system", "temperature", "max_tokens", "colour", "layer", "served"];
function stored(key, valid, area = "localStorage") {
  try { const v = JSON.parse(window[area].getItem(key)); return v && v.version === 1 && valid(v) ? v : null; }
  catch (e) { return null; }  // not JSON, or storage disabled
}
function store(key, value, area = "localStorage") {
  try { window[area].setItem(key, JSON.stringify({version: 1, ...value})); return true; }
  catch (e) { return false; }  // storage full or disabled: the page works on without it
}
const isExperts = (ex) => ex === null || Array.isArray(ex) && ex.every((k) => Array.isArray(k) && k.every(Number.isInteger));
const isToken = (t) => Array.isArray(t) && typeof t[0] === "string" && isExperts(t[1]);
const isMessage = (m) => m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string" &&
  (m.model === undefined || typeof m.model === "string") &&
  (m.tokens === undefined || Array.isArray(m.tokens) && m.tokens.every(isToken));
const byModel = (name) => name ? {model: name} : {};  // a reply's field, where its model is known
// without the tokens if they do not fit (the text and its model survive, uncoloured); else not at all
function saveChat(list = messages) {
  for (const area of ["sessionStorage", "localStorage"]) {
    if (store("mixlab.chat", {messages: list}, area) ||
        store("mixlab.chat", {messages: list.map((m) => ({role: m.role, content: m.content, ...byModel(m.model)}))},
              area)) continue;
    try { window[area].removeItem("mixlab.chat"); } catch (e) { /* storage disabled */ }  // not an older conversation
  }
}
function saveSettings() {
  const s = {};
  for (const id of SETTINGS) s[id] = $(id).type === "checkbox" ? $(id).checked : $(id).value;
  store("mixlab.settings", s);
}
function restore() {
  // (the model chosen came later: settings an older page stored have none)
  const s = stored("mixlab.settings", (v) => SETTINGS.every((id) =>
    typeof v[id] === (id === "colour" ? "boolean" : "string") || id === "served" && v[id] === undefined));
  if (s) {
    for (const id of ["system", "temperature", "max_tokens"]) $(id).value = s[id];
    $("colour").checked = s.colour;
    $("layer").add(new Option(`layer ${s.layer}`, s.layer));  // chosen again once the model's layers are listed
    if (s.served) $("served").add(new Option(s.served, s.served));  // and once the models served are
  }
  const chat = (v) => Array.isArray(v.messages) && v.messages.every(isMessage);
  const c = stored("mixlab.chat", chat, "sessionStorage") || stored("mixlab.chat", chat);  // this tab's, else the last
  if (c) { messages = c.messages; render(); }
  try { $("api_key").value = sessionStorage.getItem("mixlab.api_key") || ""; } catch (e) { /* storage disabled */ }
}

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// What a failed response says: OpenAI's error body, else its status line (a proxy's HTML page, a
// plain-text 500); a 401 means the page has no key, or the wrong one.
async function failure(r) {
  if (r.status === 401) return $("api_key").value.trim() ? "the server refused this API key: check it under Settings"
                                                          : "the server needs its API key: enter it under Settings";
  try { const j = await r.json(); if (j.error && j.error.message) return j.error.message; } catch (e) { /* not JSON */ }
  return `${r.status} ${r.statusText}`.trim();
}

async function loadModel() {
  try {
    const r = await fetch("v1/models", {headers: headers()});
    if (!r.ok) throw new Error(await failure(r));
    const j = await r.json(), base = j.data.find((m) => !m.parent) || j.data[0];  // the adapters' parent
    model = base.id; info = base.mixlab || {}; context = base.max_model_len || Infinity;
    $("model").textContent = `${model} · ${info.layers || "?"} layers · ${info.experts || 0} experts, top-${info.experts_per_token || 0}`;
    const sel = $("layer"), keep = sel.value; sel.innerHTML = "";
    for (let i = 0; i < (info.layers || 0); i++) sel.add(new Option(`layer ${i}`, String(i)));
    sel.value = keep; if (sel.selectedIndex < 0) sel.selectedIndex = 0;  // entering the key keeps the chosen layer
    // the models to choose from (--lora-modules), the base first: shown when there are several
    const served = $("served"), chosen = served.value; served.innerHTML = "";
    for (const m of [base, ...j.data.filter((m) => m !== base)])
      served.add(new Option(m.parent ? `${m.id} (LoRA adapter on ${m.parent})` : m.id, m.id));
    served.value = chosen;
    const gone = served.selectedIndex < 0 && chosen;  // one this server no longer serves (or none yet): the base
    if (served.selectedIndex < 0) served.selectedIndex = 0;
    $("served_note").textContent = gone ? `(${chosen} is no longer served: ${model} answers)` : "";
    $("choose_model").hidden = j.data.length < 2;
    $("colour").disabled = !info.experts;
    legend(); repaint();
  } catch (e) { $("model").textContent = e instanceof TypeError ? `cannot reach the server (${e.message})` : e.message; }
}

function legend() {
  const div = $("legend"); div.innerHTML = "";
  for (let e = 0; e < (info.experts || 0); e++) {
    const s = document.createElement("span"); s.textContent = `expert ${e}`; s.style.background = colourOf(e);
    div.appendChild(s);
  }
}

function render() {  // the log, drawn from the conversation
  $("log").innerHTML = "";
  for (const m of messages) {
    const body = addMessage(m.role, m.tokens ? "" : m.content);
    if (m.model) answeredBy(body, m.model);
    for (const [t, ex] of m.tokens || []) addToken(body, t, ex);
    for (const why in NOTES) if (m[why]) note(body, why, m[why]);
  }
}

const NOTES = {trimmed: (n) => `(the ${n === 1 ? "oldest exchange" : n + " oldest exchanges"} left out: the conversation outgrew the model's context)`,
               capped: (n) => `(max tokens ${n} did not fit in the model's context: the reply had what was left of it)`,
               // cut: "context" where max tokens were left out, and the context filled up
               cut: (said) => said === "context" ? "(cut: the model's context is full)" : "(cut at max tokens)", stopped: () => "(stopped)",
               interrupted: (said) => `(interrupted: ${said === true ? "the page was left" : said})`};
function note(body, why, said) {  // a reply that did not finish, or read less: say so beside it, not in it
  const span = document.createElement("span"); span.className = why === "interrupted" ? "note error" : "note muted";
  span.textContent = NOTES[why](said); body.after(span);
}

function addMessage(role, text) {
  const div = document.createElement("div"); div.className = "msg " + role;
  const who = document.createElement("span"); who.className = "who"; who.textContent = role;
  const body = document.createElement("div"); body.className = "body"; body.textContent = text || "";
  const button = document.createElement("button"); button.type = "button"; button.className = "copy";
  button.textContent = "Copy"; button.title = `Copy this ${role} message`;
  button.addEventListener("click", () => copy(body, button));
  who.append(button); div.append(who, body); $("log").appendChild(div); $("log").scrollTop = $("log").scrollHeight;
  return body;
}

function answeredBy(body, name) {  // a reply's model, beside its role: a conversation may switch between turns
  const who = body.previousElementSibling;
  let by = who.querySelector(".by");
  if (!by) { by = document.createElement("span"); by.className = "by"; who.querySelector(".copy").before(by); }
  by.textContent = name;
}

// The clipboard needs a secure context (https, or this machine's own address): elsewhere the text is
// selected, for Ctrl+C.
async function copy(body, button) {
  try { await navigator.clipboard.writeText(body.textContent); button.textContent = "Copied"; }
  catch (e) { getSelection().selectAllChildren(body); button.textContent = "Selected"; }
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

function paint(span) {
  const layer = Number($("layer").value || 0);
  const ex = span._experts;
  span.style.background = $("colour").checked && ex && ex[layer] ? colourOf(ex[layer][0]) : "";
}
function repaint() {
  $("log").classList.toggle("colour", $("colour").checked);
  document.querySelectorAll(".tok").forEach(paint);
}

function addToken(body, text, experts) {
  const log = $("log"), follow = log.scrollHeight - log.scrollTop - log.clientHeight < 30;  // not scrolled up
  const span = document.createElement("span"); span.className = "tok"; span.textContent = text;
  body.appendChild(span); giveExperts(span, experts);
  if (follow) log.scrollTop = log.scrollHeight;  // a reader who scrolled up to read stays where they are
  return span;
}
function giveExperts(span, experts) {  // a token's experts per layer (or null): its title and colour
  if (experts) {
    span._experts = experts;
    span.title = experts.map((k, l) => `layer ${l}: experts ${k.join(", ")}`).join("\n");
    span.parentElement.tabIndex = 0;  // the reply is reached by Tab: see the arrow keys below
  }
  paint(span);
}

// A settings field's number; left empty it is left out (JSON drops undefined): the server's default
// (temperature 1, max_tokens the rest of the context), not the 0 that Number("") is. What the browser
// cannot read as a number ("1e", "-") is empty to a script too: refused, not sent as the default.
function number(id) {
  if ($(id).validity.badInput) throw new Error(`${$(id).labels[0].textContent.trim()} is not a number: correct it under Settings`);
  return $(id).value.trim() === "" ? undefined : Number($(id).value);
}

function send(text) {
  messages.push({role: "user", content: text});
  answer(messages, addMessage("user", text));
}

function regenerate() {  // the last reply, written again
  if (controller || !messages.length || messages[messages.length - 1].role !== "assistant") return;
  messages.pop(); render();
  answer(messages, $("log").lastElementChild.querySelector(".body"));
}

// The reply to the conversation `history`, which ends with the question `asked` shows; "New chat" during
// the reply starts another conversation, which it must not touch.
async function answer(history, asked) {
  const text = history[history.length - 1].content;
  const body = addMessage("assistant", "");
  const system = $("system").value.trim();
  controller = new AbortController(); buttons();
  let reply = "", answered = false, full = false, ended = false, skip = 0, capped = 0;
  const tokens = [];  // [text, experts] as shown, kept with the reply
  const mine = streaming = {history, tokens, model: null};  // the model that writes it, once asked
  try {
    if (model === null) await loadModel();  // not reached when the page loaded: the model's layers and experts first
    let r, reloaded = false;
    const temperature = number("temperature"), limit = number("max_tokens");
    for (;;) {  // a conversation that outgrew the context: its oldest exchanges left out, as `mixlab chat` does
      const req = {model: $("served").value || model, stream: true, return_experts: !!info.experts,
                   messages: (system ? [{role: "system", content: system}] : []).concat(
                     history.slice(skip).map(({role, content}) => ({role, content}))),
                   temperature, max_tokens: capped ? undefined : limit};
      r = await fetch("v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(req),
                                              signal: controller.signal});
      mine.model = req.model;
      if (r.status === 404 && !reloaded) {  // the server was restarted with another model: take that one, once
        const j = await r.clone().json().catch(() => null);
        if (j && j.error && j.error.code === "model_not_found") { reloaded = true; await loadModel(); continue; }
      }
      if (r.status !== 400) break;
      const j = await r.clone().json().catch(() => null);
      if (!(j && j.error && j.error.code === "context_length_exceeded")) break;
      // Max tokens that no question leaves room for (the default 256 on a model of 256 tokens), or that
      // the question alone does not: the rest of the context instead (the server's default), never more
      // than was asked. Else the oldest exchange goes, which keeps the room asked for the reply.
      const alone = history.length - skip < 3;
      if (!capped && limit > 0 && j.error.param === "max_tokens" && (alone || limit >= context)) { capped = limit; continue; }
      if (alone) break;  // the question alone is left: its error stands
      skip += 2;  // a question and its reply
    }
    answered = true;
    if (!r.ok) throw new Error(await failure(r));
    if (mine.model) answeredBy(body, mine.model);
    if (skip) note(body, "trimmed", skip / 2);
    if (capped) note(body, "capped", capped);
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).trim(); buf = buf.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") { ended = true; continue; }
        const ev = JSON.parse(data);
        if (ev.error) throw new Error(ev.error.message);
        if (ev.model && ev.model !== mine.model) answeredBy(body, mine.model = ev.model);  // the server's word
        for (const ch of ev.choices || []) {
          const t = (ch.delta && ch.delta.content) || "";
          const ex = ch.experts && ch.experts.length ? ch.experts[0].experts : null;
          // Each chunk carries its token's own experts. A token whose text is held back (part of a
          // character) shows in the next one's span, which takes that one's experts.
          if (t) { tokens.push([t, ex]); addToken(body, t, ex); reply += t; }
          if (ch.finish_reason === "length") { note(body, "cut", full = capped ? "context" : true); }
        }
      }
    }
    // a stream cut off (a proxy's timeout) ends without [DONE]: the reply did not finish
    if (!ended) throw new Error("the server closed the stream before the reply ended");
    history.push({role: "assistant", content: reply || " ", ...byModel(mine.model), tokens,
                  ...(full ? {cut: full} : {}), ...(skip ? {trimmed: skip / 2} : {}),
                  ...(capped ? {capped} : {})});
    $("status").textContent = "";
  } catch (e) {
    const lost = answered ? "the connection to the server was lost" : "cannot reach the server";
    const error = leaving ? "the page was left" : e instanceof TypeError ? `${lost} (${e.message})` : e.message;
    // Stop, New chat, the page left, a failure once the reply had begun (a server killed): the reply is
    // kept as far as it went, and said so
    if (leaving || e.name === "AbortError" || tokens.length) {
      const [why, said] = e.name === "AbortError" && !leaving ? ["stopped", true] : ["interrupted", error];
      history.push({role: "assistant", content: reply || " ", ...byModel(mine.model), tokens, [why]: said,
                    ...(skip ? {trimmed: skip / 2} : {}), ...(capped ? {capped} : {})});
      note(body, why, said);
    }
    else {  // the question leaves the conversation (shown struck out) and goes back into the box, to send again
      history.pop(); asked.parentElement.classList.add("unsent");
      if (!$("input").value) $("input").value = text;
      body.parentElement.classList.add("error");
      addToken(body, ` [${error}]`, null);
    }
  } finally { controller = null; streaming = null; buttons(); saveChat(); }
}

function buttons() {
  $("log").setAttribute("aria-busy", String(!!controller));  // a screen reader reads the reply once it is whole, not token by token
  $("send").disabled = !!controller; $("stop").disabled = !controller;
  $("regenerate").disabled = !!controller || !messages.length || messages[messages.length - 1].role !== "assistant";
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (text && !controller) { $("input").value = ""; send(text); }
  $("input").focus();  // after a click on Send, for the next message (the button it left is disabled)
});
// On a touch screen Enter is a new line (its keyboard has no Shift+Enter) and the Send button sends
const touch = matchMedia("(pointer: coarse)");
if (touch.matches) $("input").placeholder = "Write a message (Enter: new line; Send sends it)";
$("input").addEventListener("keydown", (ev) => {
  // Enter that ends an input method's composition (Chinese, Japanese, Korean...) is the IME's, not a send
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing && ev.keyCode !== 229
      && (!touch.matches || ev.ctrlKey || ev.metaKey)) {
    ev.preventDefault(); $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); $("input").focus(); });
// Esc stops a reply from wherever the focus is (while an input method composes, Esc is the IME's)
addEventListener("keydown", (ev) => { if (ev.key === "Escape" && controller && !ev.isComposing) $("stop").click(); });
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  messages = []; $("log").innerHTML = ""; buttons(); saveChat(); $("input").focus();
});
$("regenerate").addEventListener("click", () => { regenerate(); $("input").focus(); });
// A token's experts without a mouse (its title shows on hover alone): Tab to a reply, then ←/→ go from
// token to token, and #status, a live region, says the token and its experts
$("log").addEventListener("keydown", (ev) => {
  const body = ev.target.closest(".body"), step = {ArrowLeft: -1, ArrowRight: 1}[ev.key];
  const toks = body && step ? [...body.querySelectorAll(".tok[title]")] : [];
  if (!toks.length) return;
  const at = toks.indexOf(ev.target);
  const next = toks[at < 0 ? (step > 0 ? 0 : toks.length - 1) : Math.min(Math.max(at + step, 0), toks.length - 1)];
  ev.preventDefault(); next.tabIndex = -1; next.focus();
});
$("log").addEventListener("focusin", (ev) => {
  const t = ev.target;
  // the token as a string literal: a new line or a space is seen (a line break inside quotes showed as a space)
  if (t.matches(".tok[title]")) $("status").textContent = `${JSON.stringify(t.textContent)}: ${t.title.replaceAll("\n", "; ")}`;
});
// The page left (a reload, a closed tab) while a reply streams: the conversation is stored with the question
// and the reply as far as it went (both were lost), without touching `messages` (the page may come back).
// The browser may then end the stream with a network error, which must not take the question back (`leaving`).
addEventListener("pageshow", () => { leaving = false; });
addEventListener("pagehide", () => {
  leaving = true;
  if (!streaming || streaming.history !== messages) return;  // none, or "New chat" since
  const {tokens} = streaming, content = tokens.map(([t]) => t).join("") || " ";
  saveChat(messages.concat([{role: "assistant", content, ...byModel(streaming.model), tokens,
                             interrupted: "the page was left"}]));
});
$("served").addEventListener("change", () => { $("served_note").textContent = ""; });
$("colour").addEventListener("change", repaint);
$("layer").addEventListener("change", repaint);
// `change` too: some browsers and automation tools fire only that on a select or a checkbox
for (const id of SETTINGS) for (const kind of ["input", "change"]) $(id).addEventListener(kind, saveSettings);
$("api_key").addEventListener("change", () => {
  try { sessionStorage.setItem("mixlab.api_key", $("api_key").value); } catch (e) { /* storage disabled */ }
  loadModel();
});
restore(); repaint(); buttons(); loadModel();
