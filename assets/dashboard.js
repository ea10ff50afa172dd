// The therapist's appointments list, kept live by server-sent events.

const body = document.querySelector("#appointments tbody");
const status = document.getElementById("appointments-status");
let appointments = [];

function ago(iso) {
  if (!iso) return "—";
  const minutes = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 60_000));
  if (minutes < 1) return "just now";
  if (minutes < 60) return `${minutes} min`;
  const hours = Math.floor(minutes / 60);
  return `${hours} h ${minutes % 60} min`;
}

function cell(label, text) {
  const td = document.createElement("td");
  td.dataset.label = label;
  td.textContent = text;
  return td;
}

function row(appointment) {
  const tr = document.createElement("tr");
  tr.dataset.sessionId = appointment.session_id;
  tr.dataset.chatMode = appointment.chat_mode;
  const short = appointment.session_id.slice(-6);
  const mine = appointment.status === "assigned";
  tr.append(
    cell("Session", `#${short}`),
    cell("Status", mine ? "Yours" : "Waiting"),
    cell("Mode", appointment.chat_mode === "THERAPIST_JOINED" ? "Therapist joined" : "Companion"),
    cell("Waiting", ago(appointment.created_at)),
    cell("Last activity", ago(appointment.last_message_at)),
  );
  const action = document.createElement("td");
  const link = document.createElement("a");
  link.className = "button button--primary";
  link.href = `/chat/${encodeURIComponent(appointment.session_id)}?therapist=true`;
  link.textContent = mine ? "Open chat" : "Join Chat";
  link.setAttribute("aria-label", `${link.textContent}, session ${short}`);
  action.append(link);
  tr.append(action);
  return tr;
}

function render() {
  body.replaceChildren(...appointments.map(row));
  status.textContent = appointments.length
    ? `${appointments.length} appointment${appointments.length === 1 ? "" : "s"}`
    : "No open sessions right now.";
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
