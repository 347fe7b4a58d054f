// The chat page's logic: keep the conversation, send all of it each turn to
// /v1/chat/completions with stream: true, and append tokens as the server-sent events arrive.
// The one idea: `history` is the conversation the server sees; the bubbles on screen are drawn
// from the same turns, so a stopped answer stays in both (the next turn continues from it).
"use strict";

const $ = (id) => document.getElementById(id);
const el = {
  messages: $("messages"),
  error: $("error"),
  composer: $("composer"),
  message: $("message"),
  send: $("send"),
  stop: $("stop"),
  newChat: $("new-chat"),
  model: $("model"),
  status: $("status"),
  system: $("system"),
  temperature: $("temperature"),
  topP: $("top-p"),
  maxTokens: $("max-tokens"),
  seed: $("seed"),
  apiKey: $("api-key"),
};

let history = []; // [{role: "user" | "assistant", content}], the system prompt is added per request
let controller = null; // AbortController of the generation in flight, null when idle

// --- small helpers

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = el.apiKey.value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// A number input's value, or undefined when empty (the server's default then applies).
function numberOf(input) {
  return input.value.trim() === "" ? undefined : Number(input.value);
}

function showError(text) {
  el.error.textContent = text;
  el.error.hidden = false;
}

function clearError() {
  el.error.textContent = "";
  el.error.hidden = true;
}

function setStatus(text) {
  el.status.textContent = text;
}

// The `error.message` of an OpenAI-style error body, else the raw text, else the HTTP status.
async function errorMessage(res) {
  const text = await res.text().catch(() => "");
  let message = text.trim();
  try {
    const body = JSON.parse(text);
    message = body?.error?.message ?? body?.detail ?? message;
    if (typeof message !== "string") message = JSON.stringify(message);
  } catch (_) {
    // not JSON: keep the text
  }
  return `${message || res.statusText || "request failed"} (HTTP ${res.status})`;
}

function setGenerating(on) {
  el.send.disabled = on;
  el.stop.disabled = !on;
  el.messages.setAttribute("aria-busy", on ? "true" : "false");
  setStatus(on ? "generating…" : "");
}

// Follow the newest text only when the reader is already at the bottom.
function scrollToEnd(force) {
  const m = el.messages;
  const nearEnd = m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  if (force || nearEnd) m.scrollTop = m.scrollHeight;
}

function addBubble(role, content) {
  const wrap = document.createElement("div");
  wrap.className = `msg ${role}`;
  const who = document.createElement("div");
  who.className = "role";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "content";
  body.textContent = content; // text, never HTML: model output is untrusted
  const meta = document.createElement("div");
  meta.className = "meta";
  wrap.append(who, body, meta);
  el.messages.append(wrap);
  scrollToEnd(true);
  return { wrap, body, meta };
}

// --- models

async function loadModels(reportErrors) {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (!res.ok) {
      if (reportErrors) showError(await errorMessage(res));
      return;
    }
    const ids = ((await res.json()).data || []).map((m) => m.id);
    const keep = el.model.value;
    el.model.replaceChildren(
      ...ids.map((id) => {
        const opt = document.createElement("option");
        opt.value = opt.textContent = id;
        return opt;
      }),
    );
    if (ids.includes(keep)) el.model.value = keep;
    if (reportErrors) clearError();
  } catch (err) {
    if (reportErrors) showError(`Network error: ${err.message}`);
  }
}

// --- server-sent events

// Calls onData(payload) for each event's data; events end at a blank line, and several
// `data:` lines of one event are joined with newlines (the SSE spec).
async function readEvents(body, onData) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  const dispatch = () => {
    if (data.length) onData(data.join("\n"));
    data = [];
  };
  const handleLine = (line) => {
    if (line === "") dispatch();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    // other fields (event:, id:, retry:) and comments (":") are not used by this server
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop(); // the last piece may be a line cut in half
    lines.forEach(handleLine);
  }
  buffer += decoder.decode();
  if (buffer) handleLine(buffer);
  dispatch();
}

// --- one turn

async function send() {
  const text = el.message.value;
  if (controller || text.trim() === "") return;
  controller = new AbortController();
  setGenerating(true);
  clearError();
  if (!el.model.value) await loadModels(false); // the list may have failed for want of a key

  history.push({ role: "user", content: text });
  const userBubble = addBubble("user", text);
  el.message.value = "";
  const reply = addBubble("assistant", "");
  reply.wrap.dataset.state = "streaming";

  const messages = [...history];
  const system = el.system.value.trim();
  if (system) messages.unshift({ role: "system", content: system });
  const request = {
    messages,
    stream: true,
    temperature: numberOf(el.temperature),
    top_p: numberOf(el.topP),
    max_tokens: numberOf(el.maxTokens),
    seed: numberOf(el.seed),
  };
  if (el.model.value) request.model = el.model.value;

  let content = "";
  let finish = null;
  let started = false; // true once the server accepted the request
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(request),
      signal: controller.signal,
    });
    if (!res.ok) throw new Error(await errorMessage(res));
    started = true;
    const append = (piece) => {
      content += piece;
      reply.body.textContent = content;
      scrollToEnd(false);
    };
    if ((res.headers.get("content-type") || "").includes("application/json")) {
      // a server that answers without streaming: take the whole message at once
      const body = await res.json();
      append(body.choices?.[0]?.message?.content ?? "");
      finish = body.choices?.[0]?.finish_reason ?? null;
    } else {
      await readEvents(res.body, (data) => {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "generation failed");
        const choice = chunk.choices?.[0];
        if (choice?.delta?.content) append(choice.delta.content);
        if (choice?.finish_reason) finish = choice.finish_reason;
      });
    }
    reply.wrap.dataset.state = "done";
    if (finish === "length") reply.meta.textContent = "stopped at the length limit";
  } catch (err) {
    if (err.name === "AbortError") {
      reply.wrap.dataset.state = "stopped";
      reply.meta.textContent = "stopped";
    } else if (!started) {
      // the server refused the turn: take it back, so fixing the settings and pressing
      // Enter again resends the same message
      history.pop();
      userBubble.wrap.remove();
      reply.wrap.remove();
      if (el.message.value === "") el.message.value = text;
      showError(err instanceof TypeError ? `Network error: ${err.message}` : err.message);
    } else {
      reply.wrap.dataset.state = "error";
      reply.meta.textContent = "interrupted";
      showError(err instanceof TypeError ? `Network error: ${err.message}` : err.message);
    }
  } finally {
    // a partial answer (stopped or interrupted) stays part of the conversation
    if (started && content) history.push({ role: "assistant", content });
    controller.abort(); // closes a stream left open by an error event; a no-op once it ended
    controller = null;
    setGenerating(false);
    el.message.focus();
  }
}

function stop() {
  if (controller) controller.abort();
}

function newChat() {
  stop();
  history = [];
  el.messages.replaceChildren();
  clearError();
  el.message.focus();
}

// --- wiring

el.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
el.message.addEventListener("keydown", (e) => {
  // isComposing: Enter that confirms an IME candidate (Chinese, Japanese) must not send
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  } else if (e.key === "Escape") {
    stop();
  }
});
el.stop.addEventListener("click", stop);
el.newChat.addEventListener("click", newChat);
el.apiKey.addEventListener("change", () => loadModels(true));

setGenerating(false);
loadModels(false);
el.message.focus();
