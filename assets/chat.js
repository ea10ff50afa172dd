// The chat page: one WebSocket per tab, replayed from the last seq seen.
//
// A companion reply streams in as `ai_delta` frames into a provisional
// bubble keyed by its reply_id; the committed `message` with that reply_id
// replaces it, `ai_cancelled` or the therapist's join message removes it.
//
// Every message carries a seq; the page renders seqs in order and drops any
// it has already shown, so a reconnect (which asks for `since` = last seq)
// shows no gap and nothing twice. The tab's own messages show at once as
// pending, keyed by their client_id, and are confirmed by the server's ack
// and message frame; un-acked ones are re-sent after a reconnect with the
// same client_id, which the server de-duplicates.
//
// Therapists also get `risk` frames when the crisis detector flags this
// chat or another session they can see: a banner and a chime.
//
// A therapist can hand the chat back to the companion. Their sockets then
// close with 1000 `handed back`, and the page does not reconnect by itself:
// connecting is what joins, so it offers "Join again" instead. The client
// is asked whether to continue with the companion, which stays silent (the
// `mode` frame says `companion_paused`) until the client says yes.

import { LEVEL_LABELS, chime, soundButton } from "/assets/alert.js";
import { LOGIN_ENDED, showLoginEnded } from "/assets/session.js";

const root = document.getElementById("chat");
const sessionId = root.dataset.sessionId;
const therapistView = root.dataset.view === "therapist";
const ownSender = therapistView ? "therapist" : "user";

const list = document.getElementById("messages");
const announcer = document.getElementById("announcer");
const connection = document.getElementById("connection");
const banner = document.getElementById("mode-banner");
const form = document.getElementById("composer");
const input = document.getElementById("message-input");
const composerError = document.getElementById("composer-error");
const therapistIcon = document.getElementById("therapist-icon");
const riskBanner = document.getElementById("risk-banner");
const soundToggle = document.getElementById("alert-sound");
// The client's crisis card: shown at the first crisis message, then
// re-openable from the header for the rest of the chat.
const crisisCard = document.getElementById("crisis-card");
const crisisOpen = document.getElementById("crisis-open");
const favicon = document.getElementById("favicon");
// The client's question after a hand-back.
const resumeCard = document.getElementById("resume-card");
const resumeButton = document.getElementById("resume-companion");
// The therapist's hand-back form, and what the page shows after it.
const handBackOpen = document.getElementById("hand-back-open");
const handBackForm = document.getElementById("hand-back");
const handBackNote = document.getElementById("hand-back-note");
const handedBack = document.getElementById("handed-back");
const joinAgain = document.getElementById("join-again");
const pageTitle = document.title;
soundButton(soundToggle);

const MAX_CHARS = 4000;
const state = {
  lastSeq: 0,
  socket: null,
  attempts: 0,
  stopped: false,
  /** client_id → { element, content, acked } */
  pending: new Map(),
  /** reply_id → the bubble of a reply still being generated */
  streaming: new Map(),
  /** The client said yes to the companion; sent (again) on each connect
   * until a `mode` frame without `companion_paused` or `not_paused`. */
  resumeWanted: false,
  /** The therapist handed the chat back: no socket until "Join again". */
  handedBack: false,
  /** The pending reconnect after a lost connection. */
  reconnectTimer: null,
};

const LABELS = {
  user: therapistView ? root.dataset.clientName : "You",
  therapist: "Therapist",
  ai: "Automated companion",
  system: "",
};

function uuid() {
  if (window.crypto.randomUUID) return window.crypto.randomUUID();
  const bytes = window.crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function setConnection(kind, text) {
  connection.dataset.state = kind;
  connection.textContent = text;
}

function buildMessage(sender, content) {
  const item = document.createElement("li");
  item.className = `msg msg--${sender}`;
  item.dataset.sender = sender;
  if (LABELS[sender]) {
    const label = document.createElement("span");
    label.className = "msg__label";
    if (sender === "therapist") label.append(therapistIcon.content.cloneNode(true));
    label.append(LABELS[sender]);
    item.append(label);
  }
  const body = document.createElement("span");
  body.className = "msg__body";
  body.textContent = content;
  item.append(body);
  return item;
}

/** Confirmed messages go before the first provisional one (pending or
 * streaming), so the list stays in seq order. */
function placeConfirmed(element) {
  const firstProvisional = [...list.querySelectorAll(".msg--pending, .msg--streaming")].find((item) => item !== element);
  list.insertBefore(element, firstProvisional ?? null);
}

function dropStreaming(replyId) {
  state.streaming.get(replyId)?.remove();
  state.streaming.delete(replyId);
  showActivity();
}

// "… is typing" for the other side of the chat, and "The companion is
// writing…" while a reply streams. A typing indicator goes after
// TYPING_EXPIRES without a new signal, so it never sticks.
const TYPING_EXPIRES = 5_000;
const activity = document.getElementById("activity");
const typing = { timer: null, shown: false, sentAt: 0 };

function showActivity() {
  let text = "";
  if (typing.shown) {
    text = therapistView ? `${LABELS.user} is typing…` : "The therapist is typing…";
  } else if (state.streaming.size > 0) {
    text = "The companion is writing…";
  }
  if (activity.textContent !== text) activity.textContent = text;
  activity.hidden = text === "";
}

function otherSideTyping(active) {
  window.clearTimeout(typing.timer);
  typing.shown = active;
  if (active) {
    typing.timer = window.setTimeout(() => otherSideTyping(false), TYPING_EXPIRES);
  }
  showActivity();
}

// This side's typing: said at most every two seconds while typing, and
// withdrawn when the box is emptied. Sending a message ends it (the server
// says so to the other side).
function sayTyping(active) {
  if (state.socket?.readyState !== WebSocket.OPEN) return;
  const now = Date.now();
  if (active && now - typing.sentAt < 2_000) return;
  if (!active && typing.sentAt === 0) return;
  typing.sentAt = active ? now : 0;
  state.socket.send(JSON.stringify({ type: "typing", active }));
}

function dropAllStreaming() {
  for (const replyId of [...state.streaming.keys()]) dropStreaming(replyId);
}

function streamDelta(replyId, delta) {
  let element = state.streaming.get(replyId);
  if (!element) {
    element = buildMessage("ai", "");
    element.classList.add("msg--streaming");
    element.dataset.replyId = replyId;
    element.setAttribute("aria-busy", "true");
    // After confirmed messages, before this tab's own pending ones.
    const firstPending = list.querySelector(".msg--pending");
    list.insertBefore(element, firstPending);
    state.streaming.set(replyId, element);
  }
  element.querySelector(".msg__body").textContent += delta;
  showActivity();
  element.scrollIntoView({ block: "nearest" });
}

// A run of private messages (the conversation with the companion that the
// client keeps private) shows as one line in the therapist's view.
function renderPrivate(message) {
  const last = list.querySelector("li[data-seq]:last-of-type");
  const run = last?.classList.contains("msg--private") ? last : null;
  const element = run ?? document.createElement("li");
  const count = Number(element.dataset.count ?? 0) + 1;
  element.className = "msg msg--private";
  element.dataset.count = String(count);
  element.dataset.seq = String(message.seq);
  element.dataset.kind = "private";
  element.textContent = count === 1
    ? "1 earlier message with the companion is private"
    : `${count} earlier messages with the companion are private`;
  if (!run) placeConfirmed(element);
}

function render(message) {
  if (message.seq <= state.lastSeq) return;
  state.lastSeq = message.seq;
  if (message.private) {
    renderPrivate(message);
    return;
  }
  if (message.reply_id) dropStreaming(message.reply_id);
  // Any message that is not chat (the join, the close, crisis resources,
  // an outage notice) ends the companion's turn: no partial reply survives it.
  if (message.kind !== "chat") dropAllStreaming();
  const mine = message.sender === ownSender && message.client_id && state.pending.get(message.client_id);
  let element;
  if (mine) {
    state.pending.delete(message.client_id);
    element = mine.element;
    element.classList.remove("msg--pending");
    element.querySelector(".msg__state")?.remove();
  } else {
    element = buildMessage(message.sender, message.content);
    announce(message);
    noteWhileHidden(message);
  }
  if (message.kind === "crisis") showCrisisCard(message.content);
  stamp(element, message.created_at);
  element.dataset.seq = String(message.seq);
  element.dataset.kind = message.kind;
  element.dataset.clientId = message.client_id ?? "";
  placeConfirmed(element);
  element.scrollIntoView({ block: "nearest" });
  if (message.sender === "user" && !therapistView) askSharing();
  // The open question stays in view below the newest message.
  if (sharingCard && !sharingCard.hidden) sharingCard.scrollIntoView({ block: "nearest" });
}

// While the tab is in the background, what the other person says, and
// the therapist's join, are counted in the title ("(2) Your chat · Haven")
// and badged on the icon, until the tab is seen again.
let unseen = 0;

function noteWhileHidden(message) {
  if (document.visibilityState !== "hidden") return;
  const fromOtherPerson = message.sender === (therapistView ? "user" : "therapist");
  if (!fromOtherPerson && message.kind !== "join") return;
  unseen += 1;
  document.title = `(${unseen}) ${pageTitle}`;
  favicon.href = "/assets/icon-unread.svg";
}

document.addEventListener("visibilitychange", () => {
  if (document.visibilityState !== "visible" || unseen === 0) return;
  unseen = 0;
  document.title = pageTitle;
  favicon.href = "/assets/icon.svg";
});

function showCrisisCard(text) {
  if (!crisisCard) return;
  // The latest crisis message, worded for the latest level.
  document.getElementById("crisis-text").textContent = text;
  crisisCard.hidden = false;
  crisisOpen.hidden = false;
  crisisCard.scrollIntoView({ block: "nearest" });
}

// Every message shows when it was sent: relative ("3 min ago"), kept fresh,
// with the exact local time on hover and on focus.
const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
const exact = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

function sinceText(at) {
  const seconds = Math.round((Date.now() - at) / 1000);
  if (seconds < 45) return "just now";
  const minutes = Math.round(seconds / 60);
  if (minutes < 60) return relative.format(-minutes, "minute");
  const hours = Math.round(minutes / 60);
  if (hours < 24) return relative.format(-hours, "hour");
  return exact.format(at);
}

function stamp(element, createdAt) {
  const at = Date.parse(createdAt);
  if (Number.isNaN(at) || element.querySelector(".msg__time")) return;
  const time = document.createElement("time");
  time.className = "msg__time";
  time.dateTime = createdAt;
  time.tabIndex = 0;
  time.title = exact.format(at);
  time.dataset.exact = exact.format(at);
  time.textContent = sinceText(at);
  element.append(time);
}

window.setInterval(() => {
  for (const time of list.querySelectorAll(".msg__time")) {
    const text = sinceText(Date.parse(time.dateTime));
    if (time.textContent !== text) time.textContent = text;
  }
}, 30_000);

function announce(message) {
  // Announce what arrives live, not a replayed history.
  if (Date.now() - Date.parse(message.created_at) > 60_000) return;
  const who = message.sender === "system" ? "" : `${LABELS[message.sender]}: `;
  announcer.textContent = `${who}${message.content}`;
}

// Whether the other side of the chat has a tab open now (`presence`
// frames), with the therapist's name; unknown until the first frame.
const presence = { here: null, name: "" };
// The joined therapist away (no tab open) for the away time: the client is
// offered the crisis resources and the companion (the server checks the
// time too, and answers `therapist_here` when it is too soon).
const awaySeconds = Number(root.dataset.awaySeconds || "120");
const away = { timer: null, offered: false };
// The question's words after a hand-back, as the page renders them.
const resumeText = document.getElementById("resume-text");
const handedBackText = resumeText?.textContent ?? "";

function showMode(mode, paused) {
  banner.dataset.mode = mode;
  banner.dataset.companionPaused = String(paused);
  banner.dataset.otherHere = presence.here === null ? "" : String(presence.here);
  if (paused) {
    // Only a hand-back pauses the companion: a therapist has joined.
    cannotErase();
    sharingFixed();
    banner.textContent = therapistView
      ? "You handed this chat back. The companion stays silent until the client chooses to continue with it."
      : "The therapist has left the chat. The companion is paused until you say yes.";
  } else if (mode === "THERAPIST_JOINED") {
    cannotErase();
    sharingFixed();
    if (therapistView) {
      const client = LABELS.user;
      banner.textContent = presence.here === false
        ? `You have joined this chat. The automated companion is silent. ${client} has left the chat; what you write waits for them.`
        : `You have joined this chat. The automated companion is silent.${presence.here ? ` ${client} is here.` : ""}`;
    } else if (presence.here === false) {
      banner.textContent = "The therapist has left the chat; they can come back. The companion stays silent meanwhile.";
    } else {
      banner.textContent = presence.here && presence.name
        ? `${presence.name} is here. You are talking with a person from the clinic.`
        : "A therapist has joined. You are now talking with a person from the clinic.";
    }
  } else {
    banner.textContent = therapistView
      ? "The automated companion is answering until you join."
      : "You are talking with Haven's automated companion, a computer program. A therapist from the clinic can join this chat: you will see it here when they do, and then you talk with them directly.";
  }
  watchAway();
}

// While the chat waits for a therapist: who is online, and the client's
// place. No estimated wait: nothing could honestly compute one.
const queueLine = document.getElementById("queue");

function showQueue(frame) {
  if (!queueLine) return;
  const online = frame.therapists_online;
  let text;
  if (online === 0) {
    text = "No therapist is online right now. The companion is here meanwhile, and your chat stays on the clinic's list for when one comes online.";
  } else {
    const therapists = `${online} ${online === 1 ? "therapist is" : "therapists are"} online now.`;
    const place = frame.ahead === 0
      ? "Your chat is next on their list."
      : `${frame.ahead} ${frame.ahead === 1 ? "person is" : "people are"} waiting before you.`;
    text = `${therapists} ${place}`;
  }
  queueLine.textContent = text;
  queueLine.hidden = false;
}

function showRisk(frame) {
  if (!riskBanner) return;
  const label = LEVEL_LABELS[frame.level] ?? frame.level;
  const here = frame.session_id === sessionId;
  riskBanner.dataset.risk = frame.level;
  riskBanner.dataset.sessionId = frame.session_id;
  riskBanner.replaceChildren();
  if (here) {
    riskBanner.textContent = `Safety alert: the crisis detector flagged this chat (${label}). The client has been shown crisis resources.`;
  } else {
    const link = document.createElement("a");
    link.href = "/therapist";
    link.textContent = "open Appointments";
    riskBanner.append(`Safety alert: another session was flagged (${label}) — `, link, ".");
  }
  riskBanner.hidden = false;
  chime(soundToggle);
}

function handle(frame) {
  switch (frame.type) {
    case "message":
      render(frame);
      break;
    case "ack": {
      const entry = state.pending.get(frame.client_id);
      if (entry) {
        entry.acked = true;
        const note = entry.element.querySelector(".msg__state");
        if (note) note.textContent = "Sent";
      }
      break;
    }
    case "queue":
      if (banner.dataset.mode === "BOT_ONLY") showQueue(frame);
      break;
    case "mode": {
      const paused = frame.companion_paused === true;
      // The chat waits no longer once a therapist has taken it.
      if (frame.chat_mode !== "BOT_ONLY" && queueLine) queueLine.hidden = true;
      showMode(frame.chat_mode, paused);
      if (frame.chat_mode === "THERAPIST_JOINED") dropAllStreaming();
      if (!paused && !away.offered) state.resumeWanted = false;
      showResumeQuestion(paused || away.offered);
      break;
    }
    case "ai_delta":
      streamDelta(frame.reply_id, frame.delta);
      break;
    case "ai_cancelled":
      dropStreaming(frame.reply_id);
      break;
    case "risk":
      showRisk(frame);
      break;
    case "sharing":
      sharingChosen(frame.shared);
      break;
    case "typing":
      if (frame.sender !== ownSender) otherSideTyping(frame.active);
      break;
    case "presence":
      if (frame.sender === ownSender) break;
      presence.here = frame.here;
      if (frame.name) presence.name = frame.name;
      showMode(banner.dataset.mode, banner.dataset.companionPaused === "true");
      break;
    case "error": {
      if (frame.code === "not_paused") {
        // Nothing waits for an answer any more (another tab answered, or
        // the chat moved on): the question is gone, not an error to show.
        state.resumeWanted = false;
        showResumeQuestion(false);
        break;
      }
      if (state.resumeWanted && !frame.client_id) {
        // The yes was refused (rate limit, storage): it can be given again.
        state.resumeWanted = false;
        resumeButton?.setAttribute("aria-disabled", "false");
      }
      const entry = frame.client_id && state.pending.get(frame.client_id);
      if (entry) {
        state.pending.delete(frame.client_id);
        entry.element.classList.add("msg--failed");
        const note = entry.element.querySelector(".msg__state");
        if (note) note.textContent = "Not sent";
      }
      composerError.textContent = frame.message;
      break;
    }
    default:
      break;
  }
}

function watchAway() {
  if (therapistView || !resumeCard) return;
  const waiting = banner.dataset.mode === "THERAPIST_JOINED"
    && banner.dataset.companionPaused !== "true" && presence.here === false;
  if (!waiting) {
    window.clearTimeout(away.timer);
    away.timer = null;
    if (away.offered) {
      away.offered = false;
      showResumeQuestion(banner.dataset.companionPaused === "true");
    }
    return;
  }
  if (away.offered || away.timer) return;
  away.timer = window.setTimeout(() => {
    away.timer = null;
    away.offered = true;
    crisisOpen.hidden = false;
    showResumeQuestion(true);
  }, awaySeconds * 1000);
}

// The client's question after a hand-back, shown while the companion is
// paused, or while the therapist is away. It does not take the focus: the
// client may be writing.
function showResumeQuestion(paused) {
  if (!resumeCard) return;
  resumeText.textContent = away.offered
    ? `The therapist has been away from this chat for ${awaySeconds < 60 ? `${awaySeconds} s` : `${Math.round(awaySeconds / 60)} min`}. If you need help right now, "Crisis resources" beside Send shows whom to call. You can also continue with the companion meanwhile; the therapist can join again.`
    : handedBackText;
  if (paused) {
    if (!resumeCard.hidden) return;
    resumeButton.setAttribute("aria-disabled", String(state.resumeWanted));
    resumeCard.hidden = false;
    return;
  }
  if (resumeCard.hidden) return;
  // The button keeps the focus while the answer is on its way (it is
  // aria-disabled, not disabled, for that); the box takes it after.
  const hadFocus = resumeCard.contains(document.activeElement);
  resumeCard.hidden = true;
  if (hadFocus) input.focus();
}

function sendResume() {
  if (state.socket?.readyState === WebSocket.OPEN) {
    state.socket.send(JSON.stringify({ type: "resume_companion" }));
  }
}

resumeButton?.addEventListener("click", () => {
  if (state.resumeWanted) return;
  composerError.textContent = "";
  state.resumeWanted = true;
  resumeButton.setAttribute("aria-disabled", "true");
  // Sent now, or by the next connect if the socket is down.
  sendResume();
});

function disableComposer() {
  input.disabled = true;
  form.querySelector("button[type=submit]").disabled = true;
}

function send(clientId, content) {
  if (state.socket?.readyState === WebSocket.OPEN) {
    state.socket.send(JSON.stringify({ type: "message", content, client_id: clientId }));
  }
}

const REFUSALS = {
  "missing credential": "This chat link is no longer valid in this browser.",
  "invalid or expired credential": "This chat link is no longer valid.",
  "credential is for another session": "This chat link is no longer valid in this browser.",
  "session is assigned to another therapist": "Another therapist has taken this chat.",
  "unknown session": "This chat does not exist.",
  "chat closed": "This chat has been closed.",
  "chat erased": "This chat was deleted.",
  "credential revoked": "Your login has ended.",
  "credential expired or revoked": "Your login has ended.",
};

// A closed chat refuses sockets but keeps its transcript, read over HTTP
// with the same credential (the cookie), then shown read-only.
async function readClosedChat() {
  try {
    for (;;) {
      const response = await fetch(
        `/api/sessions/${encodeURIComponent(sessionId)}/messages?after=${state.lastSeq}&limit=200`,
        { credentials: "same-origin" },
      );
      if (!response.ok) break;
      const page = await response.json();
      if (page.messages.length === 0) break;
      for (const message of page.messages) render(message);
    }
  } finally {
    showClosed();
  }
}

function showClosed() {
  cannotErase();
  banner.dataset.mode = "CLOSED";
  if (queueLine) queueLine.hidden = true;
  banner.textContent = therapistView
    ? "This chat is closed. Its transcript stays here."
    : "This chat has ended. Its transcript and the crisis resources stay here.";
  if (!therapistView) offerNewChat();
}

// A chat that ended (closed or deleted) offers the client a new one.
function offerNewChat() {
  if (document.getElementById("new-chat")) return;
  const again = document.createElement("a");
  again.className = "button button--primary";
  again.id = "new-chat";
  again.href = "/";
  again.textContent = "Start a new chat";
  form.querySelector(".composer__actions").append(again);
}

function connect() {
  const scheme = window.location.protocol === "https:" ? "wss" : "ws";
  const params = new URLSearchParams({ since: String(state.lastSeq), role: ownSender });
  const socket = new WebSocket(`${scheme}://${window.location.host}/api/chat/ws/${encodeURIComponent(sessionId)}?${params}`);
  state.socket = socket;
  setConnection("connecting", state.attempts ? "Reconnecting…" : "Connecting…");

  socket.addEventListener("open", () => {
    state.attempts = 0;
    // Deltas are not replayed: a reply still generating arrives whole.
    dropAllStreaming();
    setConnection("open", "Connected");
    for (const [clientId, entry] of state.pending) {
      if (!entry.acked) send(clientId, entry.content);
    }
    if (state.resumeWanted) sendResume();
  });
  socket.addEventListener("message", (event) => handle(JSON.parse(event.data)));
  socket.addEventListener("close", (event) => {
    if (state.socket !== socket) return;
    state.socket = null;
    if (event.code === 1008) {
      state.stopped = true;
      setConnection("closed", REFUSALS[event.reason] ?? "This chat is not available.");
      // Nothing can be written any more: no editable box.
      disableComposer();
      form.classList.add("composer--closed");
      closeHandBack();
      if (handBackOpen) handBackOpen.hidden = true;
      if (handedBack) handedBack.hidden = true;
      if (event.reason === "chat closed") readClosedChat();
      if (event.reason === "chat erased") showErased();
      if (therapistView && event.reason.startsWith("credential")) showLoginEnded(LOGIN_ENDED);
      return;
    }
    if (event.code === 1000 && event.reason === "handed back") {
      // Every tab of the therapist hears it. Reconnecting would join again,
      // so that waits for "Join again".
      showHandedBack(false);
      return;
    }
    const delay = Math.min(15_000, 500 * 2 ** state.attempts) * (0.5 + Math.random() / 2);
    state.attempts += 1;
    setConnection("connecting", `Connection lost. Reconnecting in ${Math.ceil(delay / 1000)} s…`);
    state.reconnectTimer = window.setTimeout(connect, delay);
  });
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const content = input.value;
  composerError.textContent = "";
  if (!content.trim()) {
    composerError.textContent = "Write a message first.";
    return;
  }
  if ([...content].length > MAX_CHARS) {
    composerError.textContent = `Messages can be up to ${MAX_CHARS} characters.`;
    return;
  }
  if (state.stopped) return;
  const clientId = uuid();
  const element = buildMessage(ownSender, content);
  element.classList.add("msg--pending");
  element.dataset.clientId = clientId;
  const note = document.createElement("span");
  note.className = "msg__state";
  note.textContent = "Sending…";
  element.append(note);
  list.append(element);
  element.scrollIntoView({ block: "nearest" });
  state.pending.set(clientId, { element, content, acked: false });
  send(clientId, content);
  typing.sentAt = 0;
  input.value = "";
  input.focus();
});

input.addEventListener("input", () => sayTyping(input.value.trim() !== ""));

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    form.requestSubmit();
  }
});

crisisOpen?.addEventListener("click", () => {
  crisisCard.hidden = false;
  crisisCard.focus();
});
document.getElementById("crisis-hide")?.addEventListener("click", () => {
  crisisCard.hidden = true;
  crisisOpen.focus();
});

// The therapist's view can end the chat.
document.getElementById("close-chat")?.addEventListener("click", async (event) => {
  if (!window.confirm("Close this chat? The client will no longer be able to write in it.")) return;
  const button = event.currentTarget;
  button.disabled = true;
  const response = await fetch(`/api/sessions/${encodeURIComponent(sessionId)}/close`, {
    method: "POST",
    credentials: "same-origin",
  });
  if (!response.ok) {
    composerError.textContent = "The chat could not be closed. Please try again.";
    button.disabled = false;
  } else if (state.handedBack) {
    // Handed back, so no socket tells this page: show it closed here.
    state.handedBack = false;
    handedBack.hidden = true;
    handBackOpen.hidden = true;
    setConnection("closed", REFUSALS["chat closed"]);
    form.classList.add("composer--closed");
    readClosedChat();
  }
});

// The therapist's view can hand the chat back to the companion, with an
// optional note to the client.
function openHandBack() {
  composerError.textContent = "";
  handBackForm.hidden = false;
  handBackOpen.setAttribute("aria-expanded", "true");
  handBackNote.focus();
}

function closeHandBack({ returnFocus = false } = {}) {
  if (!handBackForm || handBackForm.hidden) return;
  handBackForm.hidden = true;
  handBackOpen.setAttribute("aria-expanded", "false");
  if (returnFocus && !handBackOpen.hidden) handBackOpen.focus();
}

/** The therapist is out of the chat: no socket, no box, and "Join again".
 * `focus` moves the focus there (the tab that handed back). */
function showHandedBack(focus) {
  if (!handedBack) return;
  const wasInForm = handBackForm.contains(document.activeElement);
  // The 204 and the socket's close come in either order: both land here.
  if (state.handedBack) {
    if (focus) joinAgain.focus();
    return;
  }
  if (state.stopped) return;
  state.stopped = true;
  state.handedBack = true;
  // After this tab's own 204 the server's 1000 close may still be on its
  // way, after the hand-back message: let it come, but not as a lost
  // connection. A pending reconnect would join again: cancelled.
  const socket = state.socket;
  state.socket = null;
  if (socket?.readyState === WebSocket.CONNECTING) socket.close();
  window.clearTimeout(state.reconnectTimer);
  closeHandBack();
  handBackOpen.hidden = true;
  disableComposer();
  dropAllStreaming();
  otherSideTyping(false);
  setConnection("handed-back", "Not connected: you handed this chat back.");
  handedBack.hidden = false;
  joinAgain.disabled = false;
  if (focus || wasInForm) joinAgain.focus();
}

/** An inline form behind a button: the button toggles it; Cancel and
 * Escape close it and give the focus back to the button. */
function wireInlineForm(button, form, cancel, open, close) {
  button?.addEventListener("click", () => {
    if (form.hidden) open();
    else close({ returnFocus: true });
  });
  cancel?.addEventListener("click", () => close({ returnFocus: true }));
  form?.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.preventDefault();
      close({ returnFocus: true });
    }
  });
}

wireInlineForm(handBackOpen, handBackForm, document.getElementById("hand-back-cancel"), openHandBack, closeHandBack);

const HAND_BACK_ERRORS = {
  400: "The note can be up to 4,000 characters.",
  403: "This chat is not assigned to you.",
  409: "The chat could not be handed back: you are not in it now, or it is closed.",
};

handBackForm?.addEventListener("submit", async (event) => {
  event.preventDefault();
  composerError.textContent = "";
  const submit = document.getElementById("hand-back-submit");
  const note = handBackNote.value.trim();
  if ([...note].length > MAX_CHARS) {
    composerError.textContent = HAND_BACK_ERRORS[400];
    return;
  }
  submit.disabled = true;
  let response = null;
  try {
    response = await fetch(`/api/sessions/${encodeURIComponent(sessionId)}/hand-back`, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(note ? { note } : {}),
    });
  } catch {
    // Offline: said below like any other failure.
  }
  submit.disabled = false;
  if (response?.status === 204) {
    handBackNote.value = "";
    showHandedBack(true);
    return;
  }
  if (response?.status === 401) {
    showLoginEnded(LOGIN_ENDED);
    return;
  }
  composerError.textContent =
    HAND_BACK_ERRORS[response?.status] ?? "The chat could not be handed back. Please try again.";
});

// The therapist's private name for the client (docs/protocol.md, "GET
// /api/sessions/{session_id}/label"): loaded when the page opens, shown in
// the title beside the usual name, and changed with "Rename". Only the
// therapist's page has any of it; the client's never sees it.
const MAX_LABEL_CHARS = 60;
const chatTitle = document.getElementById("chat-title");
const renameOpen = document.getElementById("rename-open");
const renameForm = document.getElementById("rename");
const renameInput = document.getElementById("rename-input");
const labelUrl = `/api/sessions/${encodeURIComponent(sessionId)}/label`;
const clientLabel = {
  text: null,
  /** Saved on this page: a late answer to the first load is then stale. */
  saved: false,
};

function showClientLabel(text) {
  clientLabel.text = text || null;
  const name = root.dataset.clientName;
  const title = clientLabel.text ? `Chat with ${clientLabel.text} (${name})` : `Chat with ${name}`;
  if (chatTitle.textContent !== title) chatTitle.textContent = title;
  // The client's messages, typing and presence go by the same name.
  LABELS.user = clientLabel.text ?? name;
  for (const label of list.querySelectorAll(".msg--user .msg__label")) label.textContent = LABELS.user;
  showMode(banner.dataset.mode, banner.dataset.companionPaused === "true");
}

async function loadClientLabel() {
  try {
    const response = await fetch(labelUrl, { credentials: "same-origin" });
    // A login that ended or a chat that is not this therapist's: the
    // socket says so; the title keeps the usual name.
    if (!response.ok) return;
    const answer = await response.json();
    if (!clientLabel.saved) showClientLabel(answer.label);
  } catch {
    // Offline: the usual name stays.
  }
}

function openRename() {
  composerError.textContent = "";
  renameInput.value = clientLabel.text ?? "";
  renameForm.hidden = false;
  renameOpen.setAttribute("aria-expanded", "true");
  renameInput.focus();
  renameInput.select();
}

function closeRename({ returnFocus = false } = {}) {
  if (!renameForm || renameForm.hidden) return;
  renameForm.hidden = true;
  renameOpen.setAttribute("aria-expanded", "false");
  if (returnFocus) renameOpen.focus();
}

wireInlineForm(renameOpen, renameForm, document.getElementById("rename-cancel"), openRename, closeRename);

const RENAME_ERRORS = {
  400: `The name can be up to ${MAX_LABEL_CHARS} characters.`,
  403: "This chat is not assigned to you, so you cannot name its client.",
};

renameForm?.addEventListener("submit", async (event) => {
  event.preventDefault();
  composerError.textContent = "";
  // On one line, as the server keeps it; blank forgets the name.
  const text = renameInput.value.trim().split(/\s+/).join(" ");
  if ([...text].length > MAX_LABEL_CHARS) {
    composerError.textContent = RENAME_ERRORS[400];
    renameInput.focus();
    return;
  }
  const save = document.getElementById("rename-save");
  save.disabled = true;
  let response = null;
  let answer = null;
  try {
    response = await fetch(labelUrl, {
      method: "PUT",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ label: text || null }),
    });
    if (response.ok) answer = await response.json();
  } catch {
    // Offline: said below like any other failure.
  }
  save.disabled = false;
  if (answer) {
    clientLabel.saved = true;
    showClientLabel(answer.label);
    announcer.textContent = answer.label
      ? `Saved. This page now calls the client ${answer.label}.`
      : "Private name removed.";
    closeRename({ returnFocus: true });
    return;
  }
  if (response?.status === 401) {
    showLoginEnded(LOGIN_ENDED);
    return;
  }
  composerError.textContent = RENAME_ERRORS[response?.status] ?? "The name could not be saved. Please try again.";
  renameInput.focus();
});

// Joining again is connecting again: the server makes it a new join.
joinAgain?.addEventListener("click", () => {
  joinAgain.disabled = true;
  handedBack.hidden = true;
  handBackOpen.hidden = false;
  composerError.textContent = "";
  state.handedBack = false;
  state.stopped = false;
  state.attempts = 0;
  input.disabled = false;
  form.querySelector("button[type=submit]").disabled = false;
  connect();
  input.focus();
});

// The client's choice for the conversation with the companion
// (docs/privacy.md): asked at their first message, changeable until a
// therapist joins, private until they say yes.
const sharing = { value: root.dataset.sharing, joined: root.dataset.joined === "true" };
const sharingCard = document.getElementById("sharing-card");
const sharingStatus = document.getElementById("sharing-status");
const sharingChange = document.getElementById("sharing-change");

function showSharingStatus() {
  if (!sharingStatus) return;
  const text = document.getElementById("sharing-status-text");
  if (sharing.joined) {
    text.textContent = sharing.value === "shared"
      ? "The therapist can read your conversation with the companion."
      : "Your conversation with the companion before the therapist joined stays private.";
  } else {
    text.textContent = sharing.value === "shared"
      ? "The therapist who joins will be able to read your conversation with the companion."
      : "Your conversation with the companion stays private from the therapist who joins.";
  }
  sharingStatus.hidden = sharing.value === "" && !sharing.joined;
  sharingChange.hidden = sharing.joined;
}

function askSharing() {
  if (!sharingCard || sharing.value !== "" || sharing.joined || !sharingCard.hidden) return;
  sharingCard.hidden = false;
  sharingCard.scrollIntoView({ block: "nearest" });
  announcer.textContent = "A question for you below the conversation: should the therapist see it?";
}

// The choice as it stands when this tab connects, or as another tab of
// the chat has just made it.
function sharingChosen(shared) {
  if (!sharingCard || shared === null) return;
  const value = shared ? "shared" : "private";
  if (value === sharing.value) return;
  sharing.value = value;
  sharingCard.hidden = true;
  showSharingStatus();
}

function sharingFixed() {
  if (!sharingCard) return;
  sharing.joined = true;
  sharingCard.hidden = true;
  showSharingStatus();
}

async function chooseSharing(shared) {
  let response;
  try {
    response = await fetch(`/api/sessions/${encodeURIComponent(sessionId)}/companion-sharing`, {
      method: "PUT",
      credentials: "same-origin",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ shared }),
    });
  } catch {
    response = null;
  }
  if (response?.status === 204) {
    sharing.value = shared ? "shared" : "private";
    sharingCard.hidden = true;
    showSharingStatus();
    input.focus();
  } else if (response?.status === 409) {
    sharingFixed();
  } else {
    composerError.textContent = "Your answer could not be saved. Please try again.";
  }
}

document.getElementById("sharing-yes")?.addEventListener("click", () => chooseSharing(true));
document.getElementById("sharing-no")?.addEventListener("click", () => chooseSharing(false));
sharingChange?.addEventListener("click", () => {
  sharingCard.hidden = false;
  sharingCard.focus();
});
showSharingStatus();

// The client's erasure: while no therapist has joined, "Delete this chat"
// asks for confirmation and deletes every message for good. Once a
// therapist has joined (now or before) the page says why it cannot.
const eraseOpen = document.getElementById("erase-open");
const eraseDialog = document.getElementById("erase-dialog");
const eraseError = document.getElementById("erase-error");
const eraseJoined = document.getElementById("erase-joined");

function cannotErase() {
  if (!eraseOpen) return;
  eraseOpen.hidden = true;
  eraseJoined.hidden = false;
}

// The chat is gone: from this tab by its button, or from another tab (its
// socket closes with "chat erased").
function showErased() {
  state.stopped = true;
  window.clearTimeout(state.reconnectTimer);
  state.socket?.close();
  list.replaceChildren();
  document.getElementById("greeting")?.remove();
  if (crisisCard) crisisCard.hidden = true;
  if (queueLine) queueLine.hidden = true;
  if (eraseOpen) eraseOpen.hidden = true;
  disableComposer();
  form.classList.add("composer--closed");
  banner.dataset.mode = "ERASED";
  banner.textContent = "This chat was deleted. Nothing of it is kept.";
  setConnection("closed", "This chat was deleted.");
  offerNewChat();
}

eraseOpen?.addEventListener("click", () => {
  eraseError.textContent = "";
  eraseDialog.showModal();
  document.getElementById("erase-cancel").focus();
});
document.getElementById("erase-cancel")?.addEventListener("click", () => eraseDialog.close());
eraseDialog?.addEventListener("close", () => {
  if (!eraseOpen.hidden) eraseOpen.focus();
  else if (!eraseJoined.hidden) input.focus();
});
document.getElementById("erase-confirm")?.addEventListener("click", async () => {
  const confirm = document.getElementById("erase-confirm");
  confirm.disabled = true;
  let response;
  try {
    response = await fetch(`/api/sessions/${encodeURIComponent(sessionId)}`, {
      method: "DELETE",
      credentials: "same-origin",
    });
  } catch {
    response = null;
  }
  confirm.disabled = false;
  if (response?.status === 204) {
    eraseDialog.close();
    showErased();
    document.getElementById("new-chat").focus();
    return;
  }
  if (response?.status === 409) {
    eraseDialog.close();
    cannotErase();
    return;
  }
  eraseError.textContent = "The chat could not be deleted. Please try again.";
});

// The access log: read when opened, again at every opening.
const accessLog = document.getElementById("access-log");
accessLog?.addEventListener("toggle", async () => {
  if (!accessLog.open) return;
  const status = document.getElementById("access-log-status");
  const table = document.getElementById("access-log-table");
  status.textContent = "Loading…";
  let response;
  try {
    response = await fetch(`/api/sessions/${encodeURIComponent(sessionId)}/access-log`, {
      credentials: "same-origin",
    });
  } catch {
    response = null;
  }
  if (!response?.ok) {
    if (response?.status === 401) showLoginEnded(LOGIN_ENDED);
    status.textContent = "The access log could not be loaded.";
    return;
  }
  const { records } = await response.json();
  const rows = records.map((record) => {
    const row = document.createElement("tr");
    const who = record.therapist ?? record.actor;
    const cells = [
      new Date(record.at).toLocaleString(),
      who,
      record.action.replace("_", " "),
      record.address ?? "",
      record.outcome,
      record.detail ?? "",
    ];
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    return row;
  });
  table.tBodies[0].replaceChildren(...rows);
  table.hidden = rows.length === 0;
  status.textContent = rows.length === 0 ? "Nothing recorded yet." : `${rows.length} records.`;
});

if (therapistView) loadClientLabel();
connect();
// After Chat Now or Join Chat, the next thing to do is to write.
input.focus({ preventScroll: true });
