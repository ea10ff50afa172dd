// A therapist page whose login ended (idle, logged out elsewhere, password
// changed, account disabled) says so and offers to log in again, back to
// this same page.

export function showLoginEnded(reason) {
  if (document.getElementById("login-ended")) return;
  const box = document.createElement("div");
  box.className = "login-ended";
  box.id = "login-ended";
  box.setAttribute("role", "alert");
  const text = document.createElement("p");
  text.textContent = `Your login has ended: ${reason}`;
  const here = `${window.location.pathname}${window.location.search}`;
  const again = document.createElement("a");
  again.className = "button button--primary";
  again.id = "log-in-again";
  again.href = `/therapist/login?next=${encodeURIComponent(here)}`;
  again.textContent = "Log in again";
  box.append(text, again);
  document.querySelector("main").prepend(box);
  again.focus();
}

export const LOGIN_ENDED =
  "you logged out in another tab, it expired, or the password was changed.";
