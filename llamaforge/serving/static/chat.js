// The chat page: keeps the conversation in memory, streams answers from /v1/chat/completions
// (server-sent events), and writes every message with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), promptBox = $("prompt"), sendBtn = $("send"), stopBtn = $("stop"), statusLine = $("status");
let history = [];       // [{role, content}] as sent to the API
let modelName = null;
let controller = null;  // AbortController of the answer being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

async function errorText(res) {
  try { return (await res.json()).error.message; } catch (e) { return res.status + " " + res.statusText; }
}

async function loadModel() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (!res.ok) { $("model").textContent = "(" + (await errorText(res)) + ")"; return; }
    const body = await res.json();
    modelName = body.data[0].id;
    $("model").textContent = modelName;
  } catch (e) {
    $("model").textContent = "(server unreachable)";
  }
}

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
  const body = { model: modelName, messages, stream: true, temperature: Number($("temperature").value) || 0 };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

async function send(text) {
  if (!modelName) await loadModel();
  history.push({ role: "user", content: text });
  const userBubble = addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  busy(true);
  statusLine.textContent = "";
  controller = new AbortController();
  let answer = "", finish = null;
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...history] : history;
  const started = performance.now();
  let tokens = 0;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify(request(messages)),
    });
    if (!res.ok) throw new Error(await errorText(res));
    await readEvents(res, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) {
        answer += choice.delta.content;
        bubble.textContent = answer;   // text only: the model's output is never parsed as HTML
        tokens += 1;
        log.scrollTop = log.scrollHeight;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    const secs = (performance.now() - started) / 1000;
    statusLine.textContent = `${tokens} pieces in ${secs.toFixed(1)} s` + (finish === "length" ? " (stopped at max tokens)" : "");
  } catch (e) {
    if (e.name === "AbortError") {
      statusLine.textContent = "stopped";
    } else {
      addMessage("error", "Error: " + e.message);
    }
  } finally {
    bubble.classList.remove("streaming");
    if (answer) {
      history.push({ role: "assistant", content: answer });
    } else {  // nothing came back: forget the question, give it back to edit or resend
      bubble.remove();
      userBubble.remove();
      history.pop();
      if (!promptBox.value) promptBox.value = text;
    }
    controller = null;
    busy(false);
    promptBox.focus();
  }
}

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
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  log.replaceChildren();
  statusLine.textContent = "";
});
$("api-key").addEventListener("change", loadModel);
loadModel();
