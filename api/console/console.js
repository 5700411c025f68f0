// The kernel-bridge web console. Plain DOM, no framework; the editor is CodeMirror 6 from
// editor.js (bundled by `make console`). The key lives in sessionStorage: this tab only.
"use strict";

const KEY = "kernel-bridge-key";
const SAMPLES = {
  python: "print(6*7)\n",
  javascript: "console.log(6 * 7);\n",
  c: "#include <stdio.h>\n\nint main(void) {\n    int a, b;\n    if (scanf(\"%d %d\", &a, &b) != 2) return 1;\n    printf(\"%d\\n\", a * b);\n    return 0;\n}\n",
  cpp: "#include <iostream>\n\nint main() {\n    int a, b;\n    std::cin >> a >> b;\n    std::cout << a * b << std::endl;\n}\n",
  go: "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(6 * 7)\n}\n",
  rust: "fn main() {\n    println!(\"{}\", 6 * 7);\n}\n",
  java: "public class Main {\n    public static void main(String[] args) {\n        System.out.println(6 * 7);\n    }\n}\n",
  ruby: "puts 6 * 7\n",
  bash: "echo $((6 * 7))\n",
};

const $ = (sel) => document.querySelector(sel);
let editor = null;
let refreshTimer = null;

function key() { return sessionStorage.getItem(KEY) || ""; }

async function api(path, options = {}) {
  const headers = { "X-API-Key": key(), ...(options.headers || {}) };
  const r = await fetch(path, { ...options, headers });
  if (r.status === 401) { signOut("Your key was refused."); throw new Error("unauthorized"); }
  return r;
}

async function json(path) {
  const r = await api(path);
  if (!r.ok) throw new Error(`${path}: ${r.status}`);
  return r.json();
}

function fmtBytes(n) {
  if (!n) return "0";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fmtAge(s) {
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function fill(tbody, rows, columns, empty) {
  tbody.replaceChildren();
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = cell(empty, "empty");
    td.colSpan = columns;
    tr.append(td);
    tbody.append(tr);
    return false;
  }
  return true;
}

async function refreshSessions() {
  const { sessions } = await json("/console/api/sessions");
  const tbody = $("#sessions tbody");
  if (!fill(tbody, sessions, 8, "No live sessions.")) return;
  for (const s of sessions) {
    const tr = document.createElement("tr");
    tr.dataset.id = s.id;
    tr.dataset.name = s.name;
    const destroy = document.createElement("button");
    destroy.type = "button";
    destroy.className = "destroy";
    destroy.textContent = "Destroy";
    destroy.addEventListener("click", async () => {
      destroy.disabled = true;
      await api(`/console/api/sessions/${encodeURIComponent(s.id)}`, { method: "DELETE" });
      refreshAll();
    });
    const actions = document.createElement("td");
    actions.append(destroy);
    tr.append(cell(s.name), cell(s.dialect), cell(s.language), cell(s.state),
      cell(fmtBytes(s.mem_bytes)), cell(`${(s.cpu_ms / 1000).toFixed(2)} s`),
      cell(fmtAge(s.age_s)), actions);
    tbody.append(tr);
  }
}

async function refreshExecutions() {
  const { executions } = await json("/console/api/executions");
  const tbody = $("#executions tbody");
  if (!fill(tbody, executions, 5, "No executions yet.")) return;
  for (const e of executions) {
    const tr = document.createElement("tr");
    tr.append(cell(new Date(e.created_at).toLocaleTimeString()), cell(e.language),
      cell(e.status), cell(e.exit_code ?? ""),
      cell(e.execution_time != null ? `${e.execution_time.toFixed(3)} s` : ""));
    tbody.append(tr);
  }
}

async function refreshJobs() {
  const { sessions } = await json("/api/v1/sessions?size=20");
  const tbody = $("#jobs tbody");
  if (!fill(tbody, sessions, 4, "No job sessions.")) return;
  for (const j of sessions) {
    const tr = document.createElement("tr");
    tr.append(cell(j.id.slice(0, 8)), cell(j.mode), cell(j.state),
      cell(j.started_at ? new Date(j.started_at).toLocaleTimeString() : ""));
    tbody.append(tr);
  }
}

function refreshAll() {
  return Promise.allSettled([refreshSessions(), refreshExecutions(), refreshJobs()]);
}

function appendOutput(stream, text) {
  const span = document.createElement("span");
  span.className = stream;
  span.textContent = text;
  $("#output").append(span);
  $("#output").scrollTop = $("#output").scrollHeight;
}

function setStatus(text, cls) {
  const el = $("#status");
  el.textContent = text;
  el.className = `badge ${cls || ""}`;
}

async function run() {
  const button = $("#run");
  if (button.disabled) return;
  button.disabled = true;
  $("#output").replaceChildren();
  $("#exit-code").hidden = true;
  $("#elapsed").textContent = "";
  setStatus("running");
  const body = {
    language: $("#language").value,
    code: editor.getValue(),
    stdin: $("#stdin").value,
    timeout: Number($("#timeout").value) || 30,
  };
  if ($("#persist").checked) body.session_id = `console-${body.language}`;
  const started = performance.now();
  try {
    const r = await api("/console/api/execute", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({ message: r.statusText }));
      appendOutput("stderr", `${err.message || err.msg || r.status}\n`);
      setStatus(`refused (${r.status})`, "bad");
      return;
    }
    // NDJSON: {"stdout": …} / {"stderr": …} while it runs, then {"exit_code": …}.
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        if (!line.trim()) continue;
        const msg = JSON.parse(line);
        if (msg.stdout !== undefined) appendOutput("stdout", msg.stdout);
        if (msg.stderr !== undefined) appendOutput("stderr", msg.stderr);
        if (msg.exit_code !== undefined) {
          const code = $("#exit-code");
          code.textContent = `exit ${msg.exit_code}`;
          code.className = `badge ${msg.exit_code === 0 ? "ok" : "bad"}`;
          code.hidden = false;
          setStatus("done", msg.exit_code === 0 ? "ok" : "bad");
        }
      }
    }
  } catch (e) {
    if (e.message !== "unauthorized") { appendOutput("stderr", `${e}\n`); setStatus("error", "bad"); }
  } finally {
    $("#elapsed").textContent = `${((performance.now() - started) / 1000).toFixed(2)} s`;
    button.disabled = false;
    refreshAll();
  }
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  clearInterval(refreshTimer);
  $("#app").hidden = true;
  $("#who").hidden = true;
  $("#signin-panel").hidden = false;
  $("#signin-error").textContent = message || "";
}

async function signIn() {
  let me;
  try {
    me = await json("/console/api/whoami");
  } catch (e) {
    if (e.message !== "unauthorized") $("#signin-error").textContent = String(e);
    return;
  }
  $("#access-key").textContent = me.access_key;
  $("#who").hidden = false;
  $("#signin-panel").hidden = true;
  $("#app").hidden = false;
  const select = $("#language");
  select.replaceChildren(...me.languages.map((l) => new Option(l, l)));
  if (!editor) {
    editor = KBEditor.create($("#editor"), { doc: SAMPLES.python, language: "python", onRun: run });
  }
  select.value = "python";
  await refreshAll();
  refreshTimer = setInterval(refreshAll, 5000);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#signin").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("#key").value.trim());
    $("#key").value = "";
    signIn();
  });
  $("#signout").addEventListener("click", () => signOut());
  $("#refresh").addEventListener("click", refreshAll);
  $("#run").addEventListener("click", run);
  $("#language").addEventListener("change", () => {
    const lang = $("#language").value;
    editor.setLanguage(lang);
    editor.setValue(SAMPLES[lang] || "");
  });
  if (key()) signIn();
});
