// The therapist's risk alert sound: a short two-tone chime made with Web
// Audio (no file to load). Browsers may refuse sound until the page has been
// clicked; then `soundButton` offers to turn it on. The outcome is kept in
// `document.body.dataset.alertSound` ("played" or "blocked") and the number
// of chimes in `data-alert-count` (`data-waiting-count` for the sound of a
// client who starts waiting), so the behaviour can be checked.

let context = null;

function audio() {
  if (!context && window.AudioContext) context = new AudioContext();
  return context;
}

function tone(ctx, frequency, start, length) {
  const oscillator = ctx.createOscillator();
  const gain = ctx.createGain();
  oscillator.frequency.value = frequency;
  gain.gain.setValueAtTime(0.0001, start);
  gain.gain.exponentialRampToValueAtTime(0.3, start + 0.02);
  gain.gain.exponentialRampToValueAtTime(0.0001, start + length);
  oscillator.connect(gain).connect(ctx.destination);
  oscillator.start(start);
  oscillator.stop(start + length);
}

/// Plays the chime, or shows `button` so the therapist can allow sound.
export function chime(button) {
  return play(button, "alertCount", (ctx, now) => {
    tone(ctx, 880, now, 0.25);
    tone(ctx, 660, now + 0.3, 0.35);
  });
}

/// The softer sound of a client who starts waiting (opt-in on the
/// dashboard), counted in `data-waiting-count`.
export function ping(button) {
  return play(button, "waitingCount", (ctx, now) => tone(ctx, 523, now, 0.3));
}

async function play(button, counter, tones) {
  const ctx = audio();
  if (!ctx) return;
  try {
    if (ctx.state !== "running") await ctx.resume();
  } catch {
    // Refused without a user gesture: handled below.
  }
  const body = document.body.dataset;
  if (ctx.state !== "running") {
    body.alertSound = "blocked";
    if (button) button.hidden = false;
    return;
  }
  tones(ctx, ctx.currentTime);
  body.alertSound = "played";
  body[counter] = String(Number(body[counter] ?? 0) + 1);
}

/// Wires the "Turn on alert sound" button: a click unlocks the audio.
export function soundButton(button) {
  if (!button) return;
  button.addEventListener("click", async () => {
    await audio()?.resume();
    button.hidden = true;
  });
}

export const LEVEL_LABELS = { concern: "Concern", high: "High risk", imminent: "Imminent risk" };
