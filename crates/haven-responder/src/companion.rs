//! The built-in offline companion: deterministic, supportive, reflective
//! replies in the style of a scripted wellbeing bot. It acknowledges, reflects
//! and asks an open question; it says it is automated whenever asked and never
//! claims to be a person or a clinician. Asked to check in on safety, it
//! first asks whether the client is safe right now.

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::{self, BoxStream};
use haven_protocol::Sender;

use crate::{ReplyRequest, Responder, ResponderError};

/// The built-in companion.
#[derive(Debug, Clone, Default)]
pub struct Companion {
    /// How long the companion "thinks" before replying. Zero by default; a
    /// delay makes the takeover race observable in tests and demos.
    think_time: Duration,
}

impl Companion {
    /// How a reply opens when the request asks to check in on safety.
    pub const SAFETY_CHECK_IN: &str = "I want to check in with you first: are you safe right now?";

    pub fn new(think_time: Duration) -> Self {
        Self { think_time }
    }

    /// The reply to the newest client message, given the whole request.
    pub fn compose(request: &ReplyRequest) -> String {
        let reply = Self::reflect(request);
        if request.check_in_on_safety { format!("{} {reply}", Self::SAFETY_CHECK_IN) } else { reply }
    }

    /// The usual reply: an acknowledgement, a reflection, an open question.
    fn reflect(request: &ReplyRequest) -> String {
        let text = request.last_user_message().unwrap_or_default();
        let normalised = normalise(text);
        let user_turns = request.history.iter().filter(|turn| turn.sender == Sender::User).count();

        if asks_identity(&normalised) {
            return IDENTITY.to_owned();
        }
        if is_greeting(&normalised) {
            return GREETING.to_owned();
        }
        if contains_any(&normalised, &["thank you", "thanks", "thx"]) {
            return "You're welcome. I'm glad you're here. Is there anything else on your mind?".to_owned();
        }
        if let Some(feeling) = feeling(&normalised) {
            return format!(
                "It sounds like you're feeling {feeling}. That's a lot to carry, and it makes sense to want to \
                 talk about it. What has been making you feel this way?"
            );
        }
        if let Some(reflection) = reflect_statement(&normalised) {
            return format!("You said {reflection}. Can you tell me more about what that's like for you?");
        }
        if normalised.trim_end().ends_with('?') {
            return "That's an important question. I'm an automated companion, so I can't give professional \
                    advice, but I'm here to listen. What are your own thoughts about it?"
                .to_owned();
        }
        OPEN_PROMPTS[user_turns % OPEN_PROMPTS.len()].to_owned()
    }
}

impl Responder for Companion {
    fn name(&self) -> &'static str {
        "companion"
    }

    fn reply(&self, request: ReplyRequest) -> BoxStream<'static, Result<String, ResponderError>> {
        let think_time = self.think_time;
        stream::once(async move {
            if !think_time.is_zero() {
                tokio::time::sleep(think_time).await;
            }
            Ok(Companion::compose(&request))
        })
        .boxed()
    }
}

const IDENTITY: &str = "I'm Haven's automated companion — a computer program, not a person and not a \
     clinician. I can listen and help you put things into words while you wait; a human therapist can join \
     this chat. What would you like to talk about?";

const GREETING: &str = "Hello, I'm Haven's automated companion. I'm here to listen while you wait for a \
     therapist. How are you feeling right now?";

const OPEN_PROMPTS: [&str; 4] = [
    "Thank you for sharing that with me. How has this been affecting you?",
    "I hear you. What feels most important to you about this right now?",
    "That sounds meaningful. How do you feel when you think about it?",
    "I appreciate you telling me. What would help you most at the moment?",
];

/// Feeling words and the way the companion names them back.
const FEELINGS: [(&[&str], &str); 7] = [
    (&["anxious", "anxiety", "worried", "nervous", "panic", "on edge"], "anxious"),
    (&["sad", "depressed", "down", "unhappy", "crying", "miserable", "low"], "low"),
    (&["stressed", "overwhelmed", "pressure", "too much"], "overwhelmed"),
    (&["lonely", "alone", "isolated", "no one to talk"], "lonely"),
    (&["angry", "furious", "frustrated", "annoyed", "mad at"], "frustrated"),
    (&["tired", "exhausted", "can't sleep", "cant sleep", "drained"], "exhausted"),
    (&["scared", "afraid", "frightened", "terrified"], "scared"),
];

fn normalise(text: &str) -> String {
    text.to_lowercase().replace(['’', '‘'], "'")
}

fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\'')).filter(|word| !word.is_empty())
}

fn contains_any(text: &str, needles: &[&str]) -> bool {
    needles.iter().any(|needle| {
        if needle.contains(' ') { text.contains(needle) } else { words(text).any(|word| word == *needle) }
    })
}

fn asks_identity(text: &str) -> bool {
    const ASKS: [&str; 8] = [
        "are you a",
        "are you an",
        "are you real",
        "are you human",
        "who are you",
        "what are you",
        "am i talking to",
        "am i chatting with",
    ];
    ASKS.iter().any(|ask| text.contains(ask))
}

fn is_greeting(text: &str) -> bool {
    const GREETINGS: [&str; 6] = ["hello", "hi", "hey", "hiya", "morning", "evening"];
    let mut all = words(text);
    let first = all.next();
    let short = all.count() < 4;
    short && first.is_some_and(|word| GREETINGS.contains(&word) || word == "good")
}

fn feeling(text: &str) -> Option<&'static str> {
    FEELINGS.iter().find(|(cues, _)| contains_any(text, cues)).map(|(_, name)| *name)
}

/// "I feel that my work is pointless." → "you feel that your work is pointless"
fn reflect_statement(text: &str) -> Option<String> {
    const OPENERS: [&str; 5] = ["i feel ", "i think ", "i am ", "i'm ", "im "];
    let start = OPENERS.iter().filter_map(|opener| text.find(opener).map(|at| (at, *opener))).min()?;
    let clause = &text[start.0..];
    let clause = clause.split(['.', '!', '?', ',', ';', '\n']).next().unwrap_or(clause);
    let reflected: Vec<&str> = words(clause)
        .take(12)
        .map(|word| match word {
            "i" | "im" | "i'm" => "you",
            "am" => "are",
            "my" => "your",
            "me" | "myself" => "you",
            "mine" => "yours",
            other => other,
        })
        .collect();
    // "i'm"/"im" become "you" and need the verb back.
    let mut sentence = reflected.join(" ");
    if start.1 == "i'm " || start.1 == "im " {
        sentence = sentence.replacen("you", "you are", 1);
    }
    (reflected.len() >= 2).then_some(sentence)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Turn;

    fn reply_to(text: &str) -> String {
        Companion::compose(&ReplyRequest {
            history: vec![Turn {
                sender: Sender::User,
                kind: haven_protocol::MessageKind::Chat,
                content: text.into(),
            }],
            ..ReplyRequest::default()
        })
    }

    #[test]
    fn greets_and_asks_an_open_question() {
        let reply = reply_to("hello");
        assert!(reply.contains("automated companion"), "{reply}");
        assert!(reply.ends_with('?'));
    }

    #[test]
    fn says_it_is_automated_when_asked() {
        for ask in ["Are you a real person?", "are you human", "Who are you?", "am i talking to a bot"] {
            let reply = reply_to(ask);
            assert!(reply.contains("not a person"), "{ask}: {reply}");
            assert!(reply.contains("not a") && reply.contains("clinician"), "{ask}: {reply}");
        }
    }

    #[test]
    fn reflects_feelings() {
        assert!(reply_to("I've been so anxious about work").contains("feeling anxious"));
        assert!(reply_to("everything is too much lately").contains("feeling overwhelmed"));
    }

    #[test]
    fn reflects_statements_with_swapped_pronouns() {
        let reply = reply_to("I think my job is pointless.");
        assert!(reply.contains("you think your job is pointless"), "{reply}");
    }

    #[test]
    fn checks_in_on_safety_first_when_asked_then_reflects() {
        let request = ReplyRequest {
            history: vec![Turn {
                sender: Sender::User,
                kind: haven_protocol::MessageKind::Chat,
                content: "I feel so low lately".into(),
            }],
            check_in_on_safety: true,
        };
        let reply = Companion::compose(&request);
        let usual = reply_to("I feel so low lately");
        assert_eq!(reply, format!("{} {usual}", Companion::SAFETY_CHECK_IN));
        assert!(!usual.contains("are you safe"), "{usual}");
        assert_eq!(reply, Companion::compose(&request), "deterministic");
    }

    #[test]
    fn is_deterministic() {
        assert_eq!(reply_to("the weather turned"), reply_to("the weather turned"));
    }

    #[test]
    fn never_claims_to_be_human_or_a_clinician() {
        let every = [IDENTITY, GREETING].into_iter().chain(OPEN_PROMPTS);
        for reply in every {
            let lower = reply.to_lowercase();
            assert!(!lower.contains("i am a therapist") && !lower.contains("i'm a therapist"), "{reply}");
            assert!(!lower.contains("i am human") && !lower.contains("i'm human"), "{reply}");
        }
    }
}
