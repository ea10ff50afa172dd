//! What a language model is shown: the system prompt (with the safety
//! check-in when asked for) and the session's recent turns, within a
//! character budget; and the fixed prompt of the risk assessment.

use haven_protocol::{MessageKind, Sender};

use crate::Turn;

/// The system prompt shipped with Haven (`prompts/companion.md`).
pub const DEFAULT_SYSTEM_PROMPT: &str = include_str!("../prompts/companion.md");

/// Appended to the system prompt when a reply must check in on the client's
/// safety (`prompts/safety_check_in.md`). Fixed, so an operator's own system
/// prompt cannot leave it out.
pub const SAFETY_CHECK_IN_PROMPT: &str = include_str!("../prompts/safety_check_in.md");

/// The whole system prompt of the risk assessment
/// (`prompts/risk_assessment.md`): the model names one level and nothing else.
pub const RISK_ASSESSMENT_PROMPT: &str = include_str!("../prompts/risk_assessment.md");

/// The system prompt for one reply: the configured `base`, followed by
/// [`SAFETY_CHECK_IN_PROMPT`] when the reply must check in on safety.
pub fn system_prompt(base: &str, check_in_on_safety: bool) -> String {
    if !check_in_on_safety {
        return base.to_owned();
    }
    format!("{}\n\n{SAFETY_CHECK_IN_PROMPT}", base.trim_end())
}

/// Who says a line, as a chat model understands it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    /// The client, and notes about the conversation.
    User,
    /// The companion itself.
    Assistant,
}

/// One message of the model's conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptLine {
    pub speaker: Speaker,
    pub text: String,
}

/// Marks a therapist's words, which are never the companion's own.
const THERAPIST_PREFIX: &str = "[The therapist, a human clinician, wrote:]";
/// Put after a therapist's last words when the client speaks again, so the
/// model knows the human part of the conversation ended.
pub const HAND_BACK_MARKER: &str =
    "[The therapist has left the chat. You are the automated companion again.]";

/// The newest turns that fit in `budget_chars`, oldest first, as model lines.
///
/// - Client messages are the user's; companion messages the assistant's.
/// - A therapist's messages are quoted as user-side notes. The client's
///   next message after them, or after a hand-back, starts with
///   [`HAND_BACK_MARKER`].
/// - System messages (join notices, outage notices) are left out.
/// - Consecutive lines of one speaker are merged: some providers require
///   turns to alternate.
/// - The newest turn is always kept, cut to the budget if it alone is longer.
pub fn conversation(history: &[Turn], budget_chars: usize) -> Vec<PromptLine> {
    let mut lines: Vec<PromptLine> = Vec::new();
    let mut therapist_spoke = false;
    for turn in history {
        let (speaker, text) = match turn.sender {
            Sender::System => {
                therapist_spoke |= turn.kind == MessageKind::Handback;
                continue;
            }
            Sender::Ai => (Speaker::Assistant, turn.content.clone()),
            Sender::Therapist => {
                therapist_spoke = true;
                (Speaker::User, format!("{THERAPIST_PREFIX} {}", turn.content))
            }
            Sender::User if therapist_spoke => {
                therapist_spoke = false;
                (Speaker::User, format!("{HAND_BACK_MARKER}\n{}", turn.content))
            }
            Sender::User => (Speaker::User, turn.content.clone()),
        };
        lines.push(PromptLine { speaker, text });
    }

    // Keep the newest lines within the budget.
    let mut kept = Vec::new();
    let mut used = 0;
    for line in lines.into_iter().rev() {
        let size = line.text.chars().count();
        if kept.is_empty() && size > budget_chars {
            let start = size - budget_chars;
            kept.push(PromptLine { speaker: line.speaker, text: line.text.chars().skip(start).collect() });
            break;
        }
        if used + size > budget_chars {
            break;
        }
        used += size;
        kept.push(line);
    }
    kept.reverse();
    // A conversation the model can answer starts with the user.
    while kept.first().is_some_and(|line| line.speaker == Speaker::Assistant) {
        kept.remove(0);
    }

    let mut merged: Vec<PromptLine> = Vec::new();
    for line in kept {
        match merged.last_mut() {
            Some(last) if last.speaker == line.speaker => {
                last.text.push_str("\n\n");
                last.text.push_str(&line.text);
            }
            _ => merged.push(line),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use haven_protocol::RiskLevel;

    use super::*;

    fn turn(sender: Sender, content: &str) -> Turn {
        Turn { sender, kind: MessageKind::Chat, content: content.into() }
    }

    #[test]
    fn a_hand_back_marks_the_clients_next_message_even_when_the_therapist_said_nothing() {
        let hand_back = Turn { kind: MessageKind::Handback, ..turn(Sender::System, "handed back") };
        let history =
            [turn(Sender::User, "hi"), turn(Sender::Ai, "hello"), hand_back, turn(Sender::User, "ok")];
        let lines = conversation(&history, 1_000);
        assert_eq!(lines.last().map(|line| line.text.clone()), Some(format!("{HAND_BACK_MARKER}\nok")));
        assert!(!lines[0].text.contains(HAND_BACK_MARKER));
    }

    #[test]
    fn maps_senders_and_drops_system_lines() {
        let history = [
            turn(Sender::User, "hi"),
            turn(Sender::Ai, "hello"),
            turn(Sender::System, "notice"),
            turn(Sender::User, "again"),
        ];
        let lines = conversation(&history, 1_000);
        let shape: Vec<_> = lines.iter().map(|line| (line.speaker, line.text.as_str())).collect();
        assert_eq!(
            shape,
            vec![(Speaker::User, "hi"), (Speaker::Assistant, "hello"), (Speaker::User, "again")]
        );
    }

    #[test]
    fn therapist_words_are_quoted_and_followed_by_a_hand_back_marker() {
        let history =
            [turn(Sender::User, "hi"), turn(Sender::Therapist, "I'm Tess"), turn(Sender::User, "bye Tess")];
        let lines = conversation(&history, 1_000);
        assert_eq!(lines.len(), 1, "merged into one user line");
        let text = &lines[0].text;
        assert!(text.contains("[The therapist, a human clinician, wrote:] I'm Tess"), "{text}");
        let marker = text.find(HAND_BACK_MARKER).expect("marker");
        assert!(marker < text.find("bye Tess").unwrap());
    }

    #[test]
    fn keeps_the_newest_turns_within_the_budget() {
        let history = [
            turn(Sender::User, "aaaaaaaaaa"),
            turn(Sender::Ai, "bbbbbbbbbb"),
            turn(Sender::User, "cccccccccc"),
        ];
        let lines = conversation(&history, 15);
        assert_eq!(lines, vec![PromptLine { speaker: Speaker::User, text: "cccccccccc".into() }]);
        let cut = conversation(&[turn(Sender::User, "0123456789")], 4);
        assert_eq!(cut[0].text, "6789");
    }

    #[test]
    fn the_safety_check_in_is_appended_only_when_asked_for() {
        assert_eq!(system_prompt("Be kind.", false), "Be kind.");
        let prompt = system_prompt("Be kind.\n", true);
        assert!(prompt.starts_with("Be kind.\n\n"), "{prompt}");
        assert!(prompt.ends_with(SAFETY_CHECK_IN_PROMPT));
        assert!(SAFETY_CHECK_IN_PROMPT.contains("safe right now"));
        assert!(SAFETY_CHECK_IN_PROMPT.contains("crisis line"));
    }

    #[test]
    fn the_risk_assessment_prompt_names_every_level() {
        for level in RiskLevel::ALL {
            assert!(RISK_ASSESSMENT_PROMPT.contains(&format!("- {}:", level.as_str())), "{level:?}");
        }
    }

    #[test]
    fn the_shipped_prompt_says_it_is_automated_and_not_a_clinician() {
        assert!(DEFAULT_SYSTEM_PROMPT.contains("automated companion"));
        assert!(DEFAULT_SYSTEM_PROMPT.contains("not a clinician"));
    }
}
