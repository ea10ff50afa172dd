// "Chat Now": create a session (the response sets the HttpOnly client
// cookie), then open its chat page.
// "Your chats": their start times in the reader's own time zone.
for (const time of document.querySelectorAll("#your-chats time")) {
  time.textContent = new Date(time.dateTime).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

const button = document.getElementById("chat-now");
const status = document.getElementById("chat-now-status");

button.addEventListener("click", async () => {
  button.disabled = true;
  status.textContent = "Starting your chat…";
  try {
    const response = await fetch("/api/sessions", { method: "POST", credentials: "same-origin" });
    if (!response.ok) throw new Error(`status ${response.status}`);
    const session = await response.json();
    window.location.assign(`/chat/${encodeURIComponent(session.session_id)}`);
  } catch {
    status.textContent = "We could not start a chat just now. Please try again in a moment.";
    button.disabled = false;
  }
});
