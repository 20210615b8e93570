#include "runtime/serve/web_page.h"

namespace kiln::serve {
namespace {

// Kept as plain HTML so it reads (and diffs) like a web page. Every text the server or the user supplies is placed with
// textContent, never parsed as HTML. The SSE reader is a small class on window.kilnChat so a test can feed it frames.
constexpr std::string_view kPage = R"KILN_PAGE(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>kiln chat</title>
<style>
  :root { color-scheme: light dark; --fg: #1d1d1f; --bg: #fbfbf8; --muted: #5f6368; --line: #d0d0c8;
          --user: #e8eefc; --bot: #f1f1ec; --accent: #8a3b12; --error: #a4161a; }
  @media (prefers-color-scheme: dark) {
    :root { --fg: #ececec; --bg: #1b1b1d; --muted: #a8a8ad; --line: #3a3a3f; --user: #263452; --bot: #2a2a2e;
            --accent: #f0a066; --error: #ff8a8a; }
  }
  * { box-sizing: border-box; }
  body { margin: 0; font: 16px/1.5 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
  .page { max-width: 52rem; margin: 0 auto; padding: 1rem; display: flex; flex-direction: column; min-height: 100vh; }
  header { display: flex; flex-wrap: wrap; gap: .5rem 1rem; align-items: baseline; border-bottom: 1px solid var(--line);
           padding-bottom: .5rem; }
  h1 { font-size: 1.25rem; margin: 0; color: var(--accent); }
  #model { color: var(--muted); }
  details { margin-left: auto; }
  .settings { display: grid; grid-template-columns: auto 12rem; gap: .4rem .6rem; margin-top: .5rem; }
  #log { flex: 1; list-style: none; margin: 1rem 0; padding: 0; }
  .msg { margin: 0 0 .75rem; padding: .6rem .8rem; border-radius: .5rem; }
  .msg.user { background: var(--user); margin-left: 15%; }
  .msg.assistant { background: var(--bot); margin-right: 15%; }
  .who { font-size: .8rem; font-weight: 600; color: var(--muted); }
  .text { white-space: pre-wrap; overflow-wrap: anywhere; margin: 0; font: inherit; }
  .msg.error .text { color: var(--error); }
  #status { min-height: 1.5em; color: var(--muted); }
  #status[data-state="error"] { color: var(--error); }
  form { display: flex; gap: .5rem; align-items: flex-end; }
  textarea { flex: 1; min-height: 3.2rem; resize: vertical; font: inherit; padding: .5rem; }
  input, textarea, button { color: inherit; background: var(--bg); border: 1px solid var(--line); border-radius: .3rem; }
  input { font: inherit; padding: .2rem .4rem; }
  button { font: inherit; padding: .5rem 1rem; cursor: pointer; }
  button:disabled { opacity: .5; cursor: default; }
  :focus-visible { outline: 2px solid var(--accent); outline-offset: 2px; }
  .hint { font-size: .8rem; color: var(--muted); }
</style>
</head>
<body>
<div class="page">
  <header>
    <h1>kiln chat</h1>
    <span id="model">model: …</span>
    <details>
      <summary>Settings</summary>
      <div class="settings">
        <label for="key">API key</label>
        <input id="key" type="password" autocomplete="off" placeholder="none">
        <label for="temperature">Temperature</label>
        <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.7">
        <label for="max-tokens">Max tokens</label>
        <input id="max-tokens" type="number" min="1" step="1" value="512">
      </div>
      <p class="hint">The key stays in this page (it is not stored) and is sent only to this server.</p>
    </details>
  </header>
  <main>
    <ol id="log" aria-label="Conversation"></ol>
  </main>
  <p id="status" role="status" aria-live="polite" data-state="idle"></p>
  <form id="form">
    <textarea id="prompt" placeholder="Message (Enter sends, Shift+Enter for a new line)" aria-label="Message"
              required></textarea>
    <button id="send" type="submit">Send</button>
    <button id="stop" type="button" disabled>Stop</button>
    <button id="clear" type="button" title="Forget the conversation">New chat</button>
  </form>
</div>
<script>
"use strict";

// Reads a text/event-stream incrementally. Frames end with a blank line; a frame's "data:" lines carry the payload,
// and a comment line ": queue {json}" is kiln's queue-position report for a request still waiting.
class SseReader {
  constructor() { this.buffer = ""; }
  // Takes the next piece of decoded text; returns the events it completes, in order:
  // {type: "data", data: string} or {type: "queue", position: number, eta_seconds: number}.
  feed(text) {
    this.buffer += text.replace(/\r\n?/g, "\n");
    const events = [];
    let end;
    while ((end = this.buffer.indexOf("\n\n")) >= 0) {
      const frame = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 2);
      const data = [];
      for (const line of frame.split("\n")) {
        if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        } else if (line.startsWith(": queue ")) {
          try {
            const q = JSON.parse(line.slice(8));
            events.push({type: "queue", position: q.position, eta_seconds: q.eta_seconds});
          } catch (e) { /* a malformed report is only a missed progress update */ }
        }
      }
      if (data.length) events.push({type: "data", data: data.join("\n")});
    }
    return events;
  }
}

function queueText(position, etaSeconds) {
  const eta = Number.isFinite(etaSeconds) ? Math.max(0, Math.round(etaSeconds)) : "?";
  return `queued: position ${position}, ~${eta} s`;
}

const el = (id) => document.getElementById(id);
const history = [];  // finished turns, {role, content}, sent with every request
let controller = null;
let modelName = "";

function setStatus(state, text) {
  el("status").dataset.state = state;
  el("status").textContent = text;
}

function setBusy(busy) {
  el("send").disabled = busy;
  el("clear").disabled = busy;
  el("stop").disabled = !busy;
}

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = el("key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("pre");
  body.className = "text";
  body.textContent = text;
  li.append(who, body);
  el("log").append(li);
  li.scrollIntoView({block: "end"});
  return body;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (e) { /* not the JSON error envelope */ }
  return `HTTP ${response.status}`;
}

async function loadModel() {
  try {
    const response = await fetch("v1/models", {headers: headers()});
    if (!response.ok) {
      el("model").textContent = response.status === 401 ? "model: enter the API key (Settings)" : "model: ?";
      return;
    }
    const body = await response.json();
    modelName = body.data && body.data.length ? body.data[0].id : "";
    el("model").textContent = "model: " + modelName;
  } catch (e) {
    el("model").textContent = "model: server unreachable";
  }
}

function numberField(id, fallback) {
  const v = Number(el(id).value);
  return el(id).value !== "" && Number.isFinite(v) ? v : fallback;
}

async function send(text) {
  const turn = {role: "user", content: text};
  addMessage("user", text);
  const answerEl = addMessage("assistant", "");
  let answer = "";
  let finish = "";
  controller = new AbortController();
  setBusy(true);
  setStatus("waiting", "waiting for the server…");
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model: modelName, messages: history.concat([turn]), stream: true,
        temperature: numberField("temperature", 0.7), max_tokens: Math.round(numberField("max-tokens", 512)),
      }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const sse = new SseReader();
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      for (const event of sse.feed(decoder.decode(value, {stream: true}))) {
        if (event.type === "queue") {
          if (!answer) setStatus("queued", queueText(event.position, event.eta_seconds));
          continue;
        }
        if (event.data === "[DONE]") continue;
        const chunk = JSON.parse(event.data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          answer += delta;
          answerEl.textContent = answer;
          if (el("status").dataset.state !== "streaming") setStatus("streaming", "answering…");
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    history.push(turn, {role: "assistant", content: answer});
    setStatus("done", finish === "length" ? "done (reached max tokens)" : "done");
  } catch (e) {
    if (e.name === "AbortError") {
      // Keep what was shown, so the next turn's history matches the screen.
      history.push(turn, {role: "assistant", content: answer});
      setStatus("stopped", "stopped");
    } else {
      answerEl.parentElement.classList.add("error");
      answerEl.textContent = answer ? answer + "\n[" + e.message + "]" : e.message;
      setStatus("error", "error: " + e.message);
    }
  } finally {
    controller = null;
    setBusy(false);
    el("prompt").focus();
  }
}

el("form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = el("prompt").value.trim();
  if (!text || controller) return;
  el("prompt").value = "";
  send(text);
});
el("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    el("form").requestSubmit();
  }
});
el("stop").addEventListener("click", () => { if (controller) controller.abort(); });
el("clear").addEventListener("click", () => {
  history.length = 0;
  el("log").replaceChildren();
  setStatus("idle", "");
  el("prompt").focus();
});
el("key").addEventListener("change", loadModel);

window.kilnChat = {SseReader, queueText, history};
loadModel();
el("prompt").focus();
</script>
</body>
</html>
)KILN_PAGE";

}  // namespace

std::string_view web_chat_page() { return kPage; }

}  // namespace kiln::serve
