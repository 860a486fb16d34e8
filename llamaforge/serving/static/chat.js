// The chat page: streams answers from /v1/chat/completions (server-sent events), renders them as
// markdown with markdown.js (DOM nodes only, never HTML strings), keeps conversations in this
// browser's localStorage (a list of past ones at the side), regenerates and edits, shows tokens/s,
// and asks for the API key when the server answers 401. User messages are shown as plain text.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), promptBox = $("prompt"), sendBtn = $("send"), stopBtn = $("stop"), statusLine = $("status");
const STORE = "llamaforge.chats.v1", CURRENT = "llamaforge.current", SETTINGS = "llamaforge.settings.v1", KEY = "llamaforge.api-key";
let conv = null;        // the open conversation: {id, title, updated, messages: [{role, content, stats?}]}
let modelName = null;
let controller = null;  // AbortController of the answer being streamed

// ---- storage: every conversation in localStorage; a write re-reads the list so other tabs' changes stay ----

function readAll() {
  let list;
  try { list = JSON.parse(localStorage.getItem(STORE) || "[]"); } catch (e) { list = null; }
  if (!Array.isArray(list)) { console.warn("llamaforge: the stored conversations are not readable; starting a new list"); return []; }
  return list.filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages) &&
    c.messages.every((m) => m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string"));
}

function writeAll(list) {
  try {
    localStorage.setItem(STORE, JSON.stringify(list));
  } catch (e) {
    statusLine.textContent = `cannot save conversations in this browser (${e.name}): delete some old ones`;
  }
  renderList(list);
}

// Write a conversation back (dropped while it is empty); one no longer open is written only if still stored (not deleted).
function persist(c = conv) {
  if (!c) return;
  const list = readAll(), stored = list.some((x) => x.id === c.id);
  if (c !== conv && !stored) return;
  c.updated = Date.now();
  const first = c.messages.find((m) => m.role === "user");
  c.title = first ? first.content.trim().split("\n")[0].slice(0, 60) : "New chat";
  const rest = list.filter((x) => x.id !== c.id);
  if (c.messages.length) rest.push(c);
  writeAll(rest);
  if (c === conv) localStorage.setItem(CURRENT, c.id);
}

function renderList(list = readAll()) {
  const ul = $("chat-list");
  ul.replaceChildren();
  for (const c of list.sort((a, b) => (b.updated || 0) - (a.updated || 0))) {
    const li = document.createElement("li");
    if (conv && c.id === conv.id) li.className = "current";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = c.title || "New chat";
    open.title = new Date(c.updated || 0).toLocaleString();
    open.addEventListener("click", () => openChat(c.id));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "×";
    del.title = "delete this conversation";
    del.setAttribute("aria-label", "delete " + (c.title || "conversation"));
    del.addEventListener("click", () => deleteChat(c.id));
    li.append(open, del);
    ul.appendChild(li);
  }
}

function newConversation() {
  return { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 8), title: "New chat", updated: Date.now(), messages: [] };
}

function openChat(id) {
  if (controller) controller.abort();
  conv = readAll().find((c) => c.id === id) || newConversation();
  if (conv.messages.length) localStorage.setItem(CURRENT, conv.id); else localStorage.removeItem(CURRENT);
  renderConversation();
  renderList();
  statusLine.textContent = "";
  document.body.classList.remove("show-chats");
  promptBox.focus();
}

function deleteChat(id) {
  writeAll(readAll().filter((c) => c.id !== id));
  if (conv && conv.id === id) openChat(null);
}

// ---- settings and the API key ----

function loadSettings() {
  let s = {};
  try { s = JSON.parse(localStorage.getItem(SETTINGS) || "{}") || {}; } catch (e) { /* defaults */ }
  for (const id of ["system", "temperature", "max-tokens"]) if (typeof s[id] === "string") $(id).value = s[id];
  $("api-key").value = apiKey();
}

function saveSettings() {
  const s = {};
  for (const id of ["system", "temperature", "max-tokens"]) s[id] = $(id).value;
  localStorage.setItem(SETTINGS, JSON.stringify(s));
}

function apiKey() { return sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || ""; }

function setApiKey(key, remember) {  // this tab only, unless asked to remember it in this browser
  sessionStorage.setItem(KEY, key);
  if (remember) localStorage.setItem(KEY, key); else localStorage.removeItem(KEY);
  $("api-key").value = key;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

class KeyNeeded extends Error {}

function askForKey() {
  $("key-message").textContent = apiKey()
    ? "The server did not accept this API key. Enter the right one."
    : "This server needs an API key: the one it was started with (--api-key or LLAMAFORGE_API_KEY).";
  $("key-prompt").hidden = false;
  $("key-input").value = "";
  $("key-input").focus();
}

async function call(path, options = {}) {
  const res = await fetch(path, { ...options, headers: headers() });
  if (res.status === 401) { askForKey(); throw new KeyNeeded("API key needed"); }
  return res;
}

async function errorText(res) {
  try { return (await res.json()).error.message; } catch (e) { return res.status + " " + res.statusText; }
}

async function loadModel() {
  try {
    const res = await call("/v1/models");
    if (!res.ok) { $("model").textContent = "(" + (await errorText(res)) + ")"; return false; }
    const body = await res.json();
    modelName = body.data[0].id;
    $("model").textContent = modelName;
    $("key-prompt").hidden = true;
    return true;
  } catch (e) {
    $("model").textContent = e instanceof KeyNeeded ? "(API key needed)" : "(server unreachable)";
    return false;
  }
}

// ---- the conversation on the page ----

function button(label, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

function fillBubble(bubble, m) {
  if (m.role === "assistant") bubble.replaceChildren(Markdown.render(m.content));
  else bubble.textContent = m.content;  // the user's own words, as typed
}

function addTurn(k) {
  const m = conv.messages[k];
  const turn = document.createElement("div");
  turn.className = "turn " + m.role;
  const bubble = document.createElement("div");
  bubble.className = "msg " + m.role + (m.role === "assistant" ? " markdown" : "");
  fillBubble(bubble, m);
  const actions = document.createElement("div");
  actions.className = "actions";
  if (m.role === "user") {
    actions.append(button("Edit", "edit this message and answer it again", () => editTurn(k, turn)));
  } else {
    actions.append(button("Copy", "copy this answer as markdown", (ev) => copy(m.content, ev.target)));
    if (k === conv.messages.length - 1) actions.append(button("Regenerate", "answer the last message again", regenerate));
    if (m.stats) { const s = document.createElement("span"); s.className = "stats"; s.textContent = m.stats; actions.append(s); }
  }
  turn.append(bubble, actions);
  log.appendChild(turn);
  return { turn, bubble };
}

function renderConversation() {
  log.replaceChildren();
  if (conv) conv.messages.forEach((_, k) => addTurn(k));
  log.scrollTop = log.scrollHeight;
}

function addError(text) {
  const div = document.createElement("div");
  div.className = "msg error";
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
}

function editTurn(k, turn) {
  if (controller) return;
  const box = document.createElement("textarea");
  box.className = "edit-box";
  box.value = conv.messages[k].content;
  box.rows = Math.min(12, box.value.split("\n").length + 1);
  const bar = document.createElement("div");
  bar.className = "actions";
  const resend = () => {
    const text = box.value.trim();
    if (!text) return;
    conv.messages = conv.messages.slice(0, k);
    conv.messages.push({ role: "user", content: text });
    persist();
    renderConversation();
    answer({ giveBack: text });
  };
  bar.append(button("Send", "replace this message, drop what followed, answer again", resend),
             button("Cancel", "keep the message as it was", renderConversation));
  box.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); resend(); }
    if (ev.key === "Escape") renderConversation();
  });
  turn.replaceChildren(box, bar);
  box.focus();
}

function regenerate() {
  if (controller || !conv || conv.messages[conv.messages.length - 1].role !== "assistant") return;
  const previous = conv.messages.pop();
  renderConversation();
  answer({ previous });
}

async function copy(text, btn) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {  // no clipboard API (a plain-http page off localhost): the old way
    const t = document.createElement("textarea");
    t.value = text;
    document.body.appendChild(t);
    t.select();
    const ok = document.execCommand("copy");
    t.remove();
    if (!ok) { btn.textContent = "Copy failed"; return; }
  }
  const label = btn.textContent;
  btn.textContent = "Copied";
  setTimeout(() => { btn.textContent = label; }, 1500);
}

log.addEventListener("click", (ev) => {  // the Copy button of each code block
  const btn = ev.target.closest(".copy-code");
  if (btn) copy(btn.closest(".code-block").querySelector("pre code").textContent, btn);
});

// ---- streaming an answer ----

function busy(on) {
  sendBtn.disabled = on;
  stopBtn.disabled = !on;
}

// Parse "data: ..." events out of the byte stream; call onData with each JSON payload.
async function readEvents(res, onData) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

function request(messages) {
  const body = { model: modelName, messages, stream: true, stream_options: { include_usage: true },
                 temperature: Number($("temperature").value) || 0 };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

function speed(tokens, started, first, last) {
  const parts = [`${tokens} token${tokens === 1 ? "" : "s"}`];
  if (tokens > 1 && last > first) parts.push(`${((tokens - 1) / ((last - first) / 1000)).toFixed(1)} tokens/s`);
  if (first) parts.push(`first token ${((first - started) / 1000).toFixed(2)} s`);
  return parts.join(" · ");
}

// Answer the conversation's last (user) message. `giveBack`: the text to return to the prompt box if
// nothing comes back; `previous`: the answer being regenerated, restored if nothing comes back.
async function answer({ giveBack = null, previous = null } = {}) {
  const conversation = conv;
  const system = $("system").value.trim();
  const history = conversation.messages.map(({ role, content }) => ({ role, content }));
  const messages = system ? [{ role: "system", content: system }, ...history] : history;
  const msg = { role: "assistant", content: "" };
  conversation.messages.push(msg);
  const { turn, bubble } = addTurn(conversation.messages.length - 1);
  bubble.classList.add("streaming");
  log.scrollTop = log.scrollHeight;
  busy(true);
  statusLine.textContent = "";
  controller = new AbortController();
  let finish = null, tokens = 0, pieces = 0, first = 0, last = 0, timer = null, saved = 0, every = 50;
  const started = performance.now();
  const show = () => {  // markdown re-renders the whole answer: every 50 ms, or 5 renders' time for a long one
    timer = null;
    const t = performance.now();
    fillBubble(bubble, msg);
    every = Math.max(50, 5 * (performance.now() - t));
    log.scrollTop = log.scrollHeight;
    if (performance.now() - saved > 1000) { saved = performance.now(); persist(conversation); }
  };
  try {
    if (!modelName && !(await loadModel())) throw $("key-prompt").hidden ? new Error("no model: " + $("model").textContent) : new KeyNeeded();
    const res = await call("/v1/chat/completions", { method: "POST", signal: controller.signal, body: JSON.stringify(request(messages)) });
    if (!res.ok) throw new Error(await errorText(res));
    await readEvents(res, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) {
        last = performance.now();
        if (!first) first = last;
        msg.content += choice.delta.content;
        pieces += 1;
        if (!timer) timer = setTimeout(show, every);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    msg.stats = speed(tokens || pieces, started, first, last) + (finish === "length" ? " · stopped at max tokens" : "");
    statusLine.textContent = msg.stats;
  } catch (e) {
    if (e.name === "AbortError") {
      msg.stats = "stopped · " + speed(pieces, started, first, last);
      statusLine.textContent = msg.stats;
    } else if (!(e instanceof KeyNeeded)) {
      addError("Error: " + e.message);
    }
  } finally {
    clearTimeout(timer);
    controller = null;
    busy(false);
    if (!msg.content) {  // nothing came back: the old answer stays, or the question goes back to the prompt box
      conversation.messages.pop();
      if (previous) conversation.messages.push(previous);
      else if (giveBack !== null) {
        conversation.messages.pop();
        if (!promptBox.value) promptBox.value = giveBack;
      }
    }
    persist(conversation);
    if (conv === conversation) {
      const error = log.querySelector(".msg.error:last-child");
      renderConversation();
      if (error) log.appendChild(error);
    } else {
      turn.remove();
    }
    promptBox.focus();
  }
}

function send(text) {
  if (!conv) conv = newConversation();
  conv.messages.push({ role: "user", content: text });
  persist();
  renderConversation();
  answer({ giveBack: text });
}

// ---- wiring ----

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = promptBox.value.trim();
  if (!text || controller) return;
  promptBox.value = "";
  send(text);
});
promptBox.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
stopBtn.addEventListener("click", () => { if (controller) controller.abort(); });
$("new-chat").addEventListener("click", () => openChat(null));
$("toggle-chats").addEventListener("click", (ev) => { ev.stopPropagation(); document.body.classList.toggle("show-chats"); });
$("page").addEventListener("click", () => document.body.classList.remove("show-chats"));  // the list over the page (narrow screens) closes
for (const id of ["system", "temperature", "max-tokens"]) $(id).addEventListener("change", saveSettings);
$("api-key").addEventListener("change", () => { setApiKey($("api-key").value.trim(), !!localStorage.getItem(KEY)); loadModel(); });
$("key-prompt").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  setApiKey(key, $("key-remember").checked);
  if (await loadModel()) promptBox.focus();
});
window.addEventListener("storage", (ev) => { if (ev.key === STORE) renderList(); });  // another tab saved

loadSettings();
openChat(localStorage.getItem(CURRENT));
loadModel();
