// The therapist's appointments list, kept live by server-sent events.
//
// Rows are updated in place, keyed by session, so a refresh never moves
// keyboard focus or replaces the link someone is about to press.

const body = document.querySelector("#appointments tbody");
const status = document.getElementById("appointments-status");
let appointments = [];

const COLUMNS = ["Session", "Status", "Mode", "Waiting", "Last activity"];

function ago(iso) {
  if (!iso) return "—";
  const minutes = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 60_000));
  if (minutes < 1) return "just now";
  if (minutes < 60) return `${minutes} min`;
  const hours = Math.floor(minutes / 60);
  return `${hours} h ${minutes % 60} min`;
}

function newRow(sessionId) {
  const tr = document.createElement("tr");
  tr.dataset.sessionId = sessionId;
  for (const label of COLUMNS) {
    const td = document.createElement("td");
    td.dataset.label = label;
    tr.append(td);
  }
  const action = document.createElement("td");
  const link = document.createElement("a");
  link.className = "button button--primary";
  link.href = `/chat/${encodeURIComponent(sessionId)}?therapist=true`;
  action.append(link);
  tr.append(action);
  return tr;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function fill(tr, appointment) {
  const short = appointment.session_id.slice(-6);
  const mine = appointment.status === "assigned";
  tr.dataset.chatMode = appointment.chat_mode;
  const values = [
    `#${short}`,
    mine ? "Yours" : "Waiting",
    appointment.chat_mode === "THERAPIST_JOINED" ? "Therapist joined" : "Companion",
    ago(appointment.created_at),
    ago(appointment.last_message_at),
  ];
  values.forEach((value, index) => setText(tr.cells[index], value));
  const link = tr.querySelector("a");
  setText(link, mine ? "Open chat" : "Join Chat");
  link.setAttribute("aria-label", `${link.textContent}, session ${short}`);
}

function render() {
  const rows = new Map([...body.rows].map((tr) => [tr.dataset.sessionId, tr]));
  appointments.forEach((appointment, index) => {
    const tr = rows.get(appointment.session_id) ?? newRow(appointment.session_id);
    rows.delete(appointment.session_id);
    fill(tr, appointment);
    if (body.rows[index] !== tr) body.insertBefore(tr, body.rows[index] ?? null);
  });
  for (const gone of rows.values()) gone.remove();
  setText(
    status,
    appointments.length
      ? `${appointments.length} appointment${appointments.length === 1 ? "" : "s"}`
      : "No open sessions right now.",
  );
}

async function refresh() {
  try {
    const response = await fetch("/api/appointments", { credentials: "same-origin" });
    if (response.status === 401) {
      window.location.assign("/therapist/login");
      return;
    }
    if (!response.ok) throw new Error(`status ${response.status}`);
    appointments = await response.json();
    render();
  } catch {
    status.textContent = "Could not load appointments; retrying.";
  }
}

let pending = null;
function refreshSoon() {
  if (pending) return;
  pending = window.setTimeout(() => {
    pending = null;
    refresh();
  }, 250);
}

const events = new EventSource("/api/appointments/events");
events.addEventListener("changed", refreshSoon);
// After a reconnect, events may have been missed.
events.addEventListener("open", refreshSoon);
window.setInterval(render, 30_000);
refresh();
