// The therapist's appointments list, kept live by server-sent events.
//
// Rows are updated in place, keyed by session, so a refresh never moves
// keyboard focus or replaces the link someone is about to press.
//
// Sessions flagged by the crisis detector come first, then those waiting
// for a therapist (the server sorts them), are marked in colour and words, are listed in an alert banner, and
// chime once per new flag until a therapist acknowledges them.

import { LEVEL_LABELS, chime, ping, soundButton } from "/assets/alert.js";
import { LOGIN_ENDED, showLoginEnded } from "/assets/session.js";

const body = document.querySelector("#appointments tbody");
const status = document.getElementById("appointments-status");
const alertBox = document.getElementById("risk-alert");
const alertList = document.getElementById("risk-alert-list");
const soundToggle = document.getElementById("alert-sound");
const moreButton = document.getElementById("appointments-more");
// Opt-in, remembered in this browser: a sound when a client starts waiting.
const waitingSound = document.getElementById("waiting-sound");
const WAITING_SOUND_KEY = "haven.waitingSound";
waitingSound.checked = localStorage.getItem(WAITING_SOUND_KEY) === "on";
waitingSound.addEventListener("change", () => {
  localStorage.setItem(WAITING_SOUND_KEY, waitingSound.checked ? "on" : "off");
});
// Sessions seen waiting, so only a new one makes the sound; none does on
// the first load.
let waitingSeen = null;
const baseTitle = document.title;
let appointments = [];
// Flags already chimed for: "session@last_flagged_at".
const chimed = new Set();

// The "Client" (index 0) and "Risk" (index 1) cells are built separately.
const COLUMNS = ["Client", "Risk", "Status", "Mode", "Waiting", "Last message"];
const TEXT_COLUMNS = [2, 3, 4, 5];
const SENDERS = { user: "Client", therapist: "You", ai: "Companion", system: "Haven" };

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
  const who = document.createElement("span");
  who.className = "client";
  const unread = document.createElement("span");
  unread.className = "unread";
  tr.cells[0].append(who, unread);
  tr.cells[1].append(riskBadge(), acknowledgeForm(sessionId));
  const action = document.createElement("td");
  const link = document.createElement("a");
  link.className = "button button--primary";
  link.href = `/chat/${encodeURIComponent(sessionId)}?therapist=true`;
  action.append(link);
  tr.append(action);
  return tr;
}

function riskBadge() {
  const badge = document.createElement("span");
  badge.className = "risk";
  return badge;
}

// "Acknowledge" with an optional note, recorded in the audit trail.
function acknowledgeForm(sessionId) {
  const details = document.createElement("details");
  details.className = "acknowledge";
  const summary = document.createElement("summary");
  summary.textContent = "Acknowledge";
  const form = document.createElement("form");
  const id = `note-${sessionId}`;
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = "Note (optional)";
  const note = document.createElement("textarea");
  note.id = id;
  note.rows = 2;
  note.maxLength = 2000;
  const submit = document.createElement("button");
  submit.type = "submit";
  submit.className = "button";
  submit.textContent = "Acknowledge flag";
  const error = document.createElement("p");
  error.className = "form-error";
  error.setAttribute("role", "alert");
  form.append(label, note, submit, error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    submit.disabled = true;
    try {
      const response = await fetch(`/api/sessions/${encodeURIComponent(sessionId)}/risk/acknowledge`, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ note: note.value }),
      });
      if (!response.ok) throw new Error((await response.json()).message);
      note.value = "";
      details.open = false;
      error.textContent = "";
      refresh();
    } catch (failure) {
      error.textContent = `Not acknowledged: ${failure.message}`;
    } finally {
      submit.disabled = false;
    }
  });
  details.append(summary, form);
  return details;
}

function fillRisk(tr, appointment) {
  const level = appointment.risk_level;
  const flagged = level !== "none";
  tr.dataset.risk = level;
  tr.classList.toggle("risk-row", flagged);
  tr.classList.toggle("risk-row--attention", appointment.risk_needs_attention);
  const badge = tr.cells[1].querySelector(".risk");
  badge.className = flagged ? `risk risk--${level}` : "risk";
  const label = flagged
    ? `${LEVEL_LABELS[level] ?? level}${appointment.risk_needs_attention ? "" : " (acknowledged)"}`
    : "—";
  setText(badge, label);
  tr.cells[1].querySelector(".acknowledge").hidden = !appointment.risk_needs_attention;
}

/** A session's client as therapists see it named (as the chat page does):
 * "Client" and the last four hex digits of the session id, after this
 * therapist's private name for the client if they gave one ("Sam (Client
 * 8571)"). */
function clientName(appointment) {
  const short = `Client ${appointment.session_id.slice(-4)}`;
  return appointment.client_label ? `${appointment.client_label} (${short})` : short;
}

/** "5 min · Client: the start of it…": when, who, and what, except the
 * companion's words, which are read in the chat. */
function preview(appointment) {
  const last = appointment.last_message;
  if (!last) return "—";
  const who = SENDERS[last.sender] ?? last.sender;
  const what = last.private
    ? `${who} wrote (private to the client)`
    : last.text === null ? `${who} wrote (open the chat to read)` : `${who}: ${last.text}`;
  return `${ago(last.created_at)} · ${what}`;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function fill(tr, appointment) {
  const name = clientName(appointment);
  const mine = appointment.status === "assigned";
  tr.dataset.chatMode = appointment.chat_mode;
  const joined = appointment.chat_mode === "THERAPIST_JOINED";
  tr.dataset.clientOnline = String(appointment.client_online);
  setText(tr.cells[0].querySelector(".client"), `${name} · ${appointment.client_online ? "online now" : "offline"}`);
  const unread = appointment.unread;
  setText(tr.cells[0].querySelector(".unread"), unread ? `${unread} new` : "");
  tr.dataset.unread = String(unread);
  const values = [
    mine ? "Yours" : "Waiting",
    joined ? "Therapist joined" : !mine ? "Companion"
      : appointment.companion_paused ? "Handed back; the client has not answered" : "Handed back to the companion",
    // Waiting counts only until a therapist first joins.
    mine ? "—" : ago(appointment.created_at),
    preview(appointment),
  ];
  values.forEach((value, index) => setText(tr.cells[TEXT_COLUMNS[index]], value));
  fillRisk(tr, appointment);
  const link = tr.querySelector("a");
  setText(link, !mine ? "Join Chat" : joined ? "Open chat" : "Join again");
  const news = unread ? `, ${unread} new message${unread === 1 ? "" : "s"}` : "";
  link.setAttribute("aria-label", `${link.textContent}, ${name}${news}`);
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
  renderAlerts();
  setText(
    status,
    appointments.length
      ? `${appointments.length} appointment${appointments.length === 1 ? "" : "s"}`
      : "No open sessions right now.",
  );
}

function renderAlerts() {
  const attention = appointments.filter((appointment) => appointment.risk_needs_attention);
  alertBox.hidden = attention.length === 0;
  const waiting = appointments.filter((appointment) => appointment.status === "open").length;
  const parts = [
    attention.length ? `(${attention.length}) Safety alert` : null,
    waiting ? `${waiting} waiting` : null,
    baseTitle,
  ];
  document.title = parts.filter(Boolean).join(" · ");
  const items = attention.map((appointment) => {
    const li = document.createElement("li");
    li.dataset.sessionId = appointment.session_id;
    li.dataset.risk = appointment.risk_level;
    const link = document.createElement("a");
    link.href = `/chat/${encodeURIComponent(appointment.session_id)}?therapist=true`;
    link.textContent = `${LEVEL_LABELS[appointment.risk_level]}: ${clientName(appointment)}`;
    li.append(link);
    return li;
  });
  alertList.replaceChildren(...items);
  const fresh = attention.filter((appointment) => {
    const key = `${appointment.session_id}@${appointment.risk_last_flagged_at}`;
    if (chimed.has(key)) return false;
    chimed.add(key);
    return true;
  });
  if (fresh.length) chime(soundToggle);
  noteNewWaiting();
}

function noteNewWaiting() {
  const waiting = appointments.filter((appointment) => appointment.status === "open");
  const fresh = waitingSeen ? waiting.filter((appointment) => !waitingSeen.has(appointment.session_id)) : [];
  waitingSeen = new Set([...(waitingSeen ?? []), ...waiting.map((appointment) => appointment.session_id)]);
  if (fresh.length && waitingSound.checked) ping(soundToggle);
}

// The list comes in pages (the longest waiting first, then the therapist's
// own by newest activity); "Show more" asks for one more page, and every
// refresh reloads as many pages as are shown.
let pages = 1;

function nextPage(link) {
  const match = /<([^>]+)>\s*;\s*rel="next"/.exec(link ?? "");
  return match ? match[1] : null;
}

async function load() {
  try {
    const rows = [];
    let url = "/api/appointments";
    let next = null;
    for (let page = 0; url && page < pages; page += 1) {
      const response = await fetch(url, { credentials: "same-origin" });
      if (response.status === 401) {
        events.close();
        status.textContent = "";
        showLoginEnded(LOGIN_ENDED);
        return;
      }
      if (!response.ok) throw new Error(`status ${response.status}`);
      rows.push(...(await response.json()));
      next = nextPage(response.headers.get("Link"));
      url = next;
    }
    appointments = rows;
    moreButton.hidden = !next;
    render();
  } catch {
    status.textContent = "Could not load appointments; retrying.";
  }
}

// Refreshes are coalesced: at most one in flight and one queued behind it,
// however many `changed` and `risk` events arrive meanwhile.
let inFlight = null;
let queued = false;
function refresh() {
  if (inFlight) {
    queued = true;
    return;
  }
  inFlight = load().finally(() => {
    inFlight = null;
    if (queued) {
      queued = false;
      refresh();
    }
  });
}

let pending = null;
function refreshSoon() {
  if (pending) return;
  pending = window.setTimeout(() => {
    pending = null;
    refresh();
  }, 250);
}

moreButton.addEventListener("click", () => {
  pages += 1;
  refresh();
});

const events = new EventSource("/api/appointments/events");
// The stream ends when the login does; the reload then finds out.
events.addEventListener("error", () => {
  if (events.readyState === EventSource.CLOSED) refresh();
});
events.addEventListener("changed", refreshSoon);
// A flag is shown at once, not after the usual short delay.
events.addEventListener("risk", refresh);
soundButton(soundToggle);
// After a reconnect, events may have been missed.
events.addEventListener("open", refreshSoon);
window.setInterval(render, 30_000);
refresh();

// The "Closed" tab: this therapist's closed chats, read when the tab is
// shown, the most recently closed first; each opens its transcript.
const tabs = [...document.querySelectorAll('.tabs [role="tab"]')];
const closedBody = document.querySelector("#closed tbody");
const closedStatus = document.getElementById("closed-status");
const closedMore = document.getElementById("closed-more");
let closedNext = null;

function when(iso) {
  return new Date(iso).toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
}

function closedRow(chat) {
  const tr = document.createElement("tr");
  tr.dataset.sessionId = chat.session_id;
  const name = clientName(chat);
  const flagged = chat.risk_level !== "none";
  const cells = [
    ["Client", name],
    ["Risk", flagged ? LEVEL_LABELS[chat.risk_level] ?? chat.risk_level : "—"],
    ["Started", when(chat.created_at)],
    ["Closed", when(chat.closed_at)],
    ["Messages", String(chat.messages)],
  ];
  for (const [label, text] of cells) {
    const td = document.createElement("td");
    td.dataset.label = label;
    td.textContent = text;
    tr.append(td);
  }
  const action = document.createElement("td");
  const link = document.createElement("a");
  link.className = "button";
  link.href = `/chat/${encodeURIComponent(chat.session_id)}?therapist=true`;
  link.textContent = "Read transcript";
  link.setAttribute("aria-label", `Read transcript, ${name}`);
  action.append(link);
  tr.append(action);
  return tr;
}

async function loadClosed(url, append) {
  try {
    const response = await fetch(url, { credentials: "same-origin" });
    if (response.status === 401) {
      showLoginEnded(LOGIN_ENDED);
      return;
    }
    if (!response.ok) throw new Error(`status ${response.status}`);
    const rows = (await response.json()).map(closedRow);
    if (append) closedBody.append(...rows);
    else closedBody.replaceChildren(...rows);
    closedNext = nextPage(response.headers.get("Link"));
    closedMore.hidden = !closedNext;
    const count = closedBody.rows.length;
    closedStatus.textContent = count
      ? `${count}${closedNext ? "+" : ""} closed chat${count === 1 ? "" : "s"}`
      : "You have no closed chats.";
  } catch {
    closedStatus.textContent = "Could not load closed chats.";
  }
}

function selectTab(tab, { focus = false } = {}) {
  for (const other of tabs) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    document.getElementById(other.getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) tab.focus();
  if (tab.id === "tab-closed") {
    closedStatus.textContent = "Loading…";
    loadClosed("/api/appointments/closed", false);
  }
}

tabs.forEach((tab, index) => {
  tab.addEventListener("click", () => selectTab(tab));
  // Arrow keys move between tabs, as in every tab list.
  tab.addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (!step) return;
    event.preventDefault();
    selectTab(tabs[(index + step + tabs.length) % tabs.length], { focus: true });
  });
});
closedMore.addEventListener("click", () => {
  if (closedNext) loadClosed(closedNext, true);
});
