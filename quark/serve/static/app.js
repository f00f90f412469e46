// Quark chat page: keeps the conversation in the browser, streams each reply from /v1/chat/completions (SSE).
"use strict";
const $ = (id) => document.getElementById(id);
const conversation = [];  // [{role, content}] without the system prompt (that is read at send time)
let modelName = null;
let controller = null;

$("api-key").value = sessionStorage.getItem("quark-api-key") || "";
$("api-key").addEventListener("change", () => { sessionStorage.setItem("quark-api-key", $("api-key").value); loadModel(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    modelName = body.data[0].id;
    $("model-name").textContent = modelName + " · " + body.data[0].context_length + "-token context";
    $("status").textContent = "ready";
  } catch (e) {
    $("model-name").textContent = "model unavailable";
    $("status").textContent = String(e.message || e);
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function params() {
  const p = {
    temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top_p").value),
    repetition_penalty: parseFloat($("repetition_penalty").value),
    max_tokens: parseInt($("max_tokens").value, 10),
  };
  if ($("seed").value !== "") p.seed = parseInt($("seed").value, 10);
  if ($("json_mode").checked) p.response_format = { type: "json_object" };
  return p;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("status").textContent = on ? "generating…" : "ready";
}

async function send(text) {
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  const out = div.querySelector(".text");
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(conversation);
  const p = params();
  const body = Object.assign({ model: modelName, messages, stream: true, stream_options: { include_usage: true } }, p);
  controller = new AbortController();
  busy(true);
  let reply = "", finish = null, usage = null;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                    signal: controller.signal });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : r.status + " " + r.statusText);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          for (const c of chunk.choices || []) {
            if (c.delta && c.delta.content) { reply += c.delta.content; out.textContent = reply; }
            if (c.finish_reason) finish = c.finish_reason;
          }
          $("messages").scrollTop = $("messages").scrollHeight;
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else { div.classList.add("error"); out.textContent = reply + (reply ? "\n" : "") + "error: " + (e.message || e); }
  }
  conversation.push({ role: "assistant", content: reply });
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = [finish && "finish: " + finish, usage && usage.completion_tokens + " tokens",
                      `T=${p.temperature} top_p=${p.top_p} rep=${p.repetition_penalty}`].filter(Boolean).join(" · ");
  div.appendChild(meta);
  div.dataset.done = "true";
  controller = null;
  busy(false);
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation.length = 0;
  $("messages").innerHTML = "";
});
loadModel();
