//! Crisis escalation (docs/safety.md): what Haven does once the detector
//! (`haven-safety`) flags a client message.
//!
//! - [`Escalation::screen`] classifies a client message (the rules and the
//!   on-device model, with the client's latest earlier messages) and turns
//!   the verdict into a [`RiskFlag`] stored with the message, including the
//!   crisis message with this deployment's resources. It needs no language
//!   model, so it works when the provider is down or slow.
//! - [`SafetyScript`] replaces the companion at `high` and `imminent`: fixed,
//!   reviewed texts instead of free-form generation, until a therapist joins.
//! - [`report`] counts flags and referrals for reporting.

use futures_util::stream::{self, BoxStream};
use haven_protocol::api::{self, LevelCounts};
use haven_protocol::{RiskLevel, Sender};
use haven_responder::{ReplyRequest, Responder, ResponderError};
use haven_safety::{Assessment, Classifier, Earlier};
use haven_store::{RiskFlag, Store, StoreError};
use time::OffsetDateTime;

use crate::config::SafetyArgs;

/// The safety script, said in this order (then again from the start) while
/// a session at `high` or `imminent` has no therapist. Each text stays with
/// the person, points to the crisis resources and asks whether they are safe.
pub const SAFETY_SCRIPT: [&str; 4] = [
    "I'm really glad you told me. I'm an automated companion, and right now what matters most is that you're safe. Are you safe right now?",
    "You don't have to go through this alone. The crisis line shown above is free, confidential and open any time: please reach out to them now. Is there someone near you who could be with you?",
    "I'm still here with you. A therapist has been alerted to this chat and can join. If you are in immediate danger, please call your emergency number now. Are you somewhere safe?",
    "Thank you for staying with me. If you can, put some distance between yourself and anything you could use to hurt yourself, and contact the crisis line or someone you trust. Are you safe right now?",
];

/// Screens client messages and builds their flags with the deployment's
/// resources.
#[derive(Debug, Clone)]
pub struct Escalation {
    classifier: Classifier,
    crisis_line: String,
    text_line: Option<String>,
    emergency: String,
    directory: String,
    links: Vec<CrisisLink>,
}

/// A way to reach help, as the client's crisis card offers it: a `tel:` or
/// `sms:` link a phone can act on, or the help-line directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrisisLink {
    pub label: String,
    pub href: String,
    /// What the link reaches, for its styling and tests: `emergency`,
    /// `crisis-line`, `text-line` or `directory`.
    pub kind: &'static str,
}

/// The number to dial in a resource as people write it: its leading digits
/// (with a leading `+`), spaces and dashes dropped. `988 (Lifeline)` gives
/// `988`, `0800 111 0 111 (TelefonSeelsorge)` gives `08001110111`; text that
/// does not start with a number gives none.
fn dialable(text: &str) -> Option<String> {
    let text = text.trim_start();
    let lead = text.strip_prefix('+').map_or("", |_| "+");
    let digits: String = text[lead.len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, ' ' | '-'))
        .filter(char::is_ascii_digit)
        .collect();
    (digits.len() >= 2).then(|| format!("{lead}{digits}"))
}

/// The `sms:` link of a text line: `text HOME to 741741` gives
/// `sms:741741?body=HOME`; a line that starts with a number texts it.
fn sms_link(line: &str) -> Option<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    if let [first, body, to, rest @ ..] = words.as_slice()
        && first.eq_ignore_ascii_case("text")
        && to.eq_ignore_ascii_case("to")
    {
        let number = dialable(&rest.join(" "))?;
        let body: String = body.chars().filter(char::is_ascii_alphanumeric).collect();
        return Some(format!("sms:{number}?body={body}"));
    }
    dialable(line).map(|number| format!("sms:{number}"))
}

impl Escalation {
    pub fn new(args: &SafetyArgs, classifier: Classifier) -> Self {
        let configured = |value: &Option<String>| {
            value.as_deref().map(str::trim).filter(|value| !value.is_empty()).map(str::to_owned)
        };
        let directory = args.crisis_resources_url.trim().to_owned();
        let mut links = Vec::new();
        let emergency = configured(&args.emergency_number);
        if let Some((text, number)) = emergency.as_ref().and_then(|text| Some((text, dialable(text)?))) {
            let label = format!("Call {text} (emergency)");
            links.push(CrisisLink { label, href: format!("tel:{number}"), kind: "emergency" });
        }
        let line = configured(&args.crisis_line);
        if let Some((text, number)) = line.as_ref().and_then(|text| Some((text, dialable(text)?))) {
            let label = format!("Call {text}");
            links.push(CrisisLink { label, href: format!("tel:{number}"), kind: "crisis-line" });
        }
        let text_line = configured(&args.crisis_text_line);
        if let Some((text, href)) = text_line.as_ref().and_then(|text| Some((text, sms_link(text)?))) {
            let mut chars = text.chars();
            let label =
                chars.next().map(|first| first.to_uppercase().chain(chars).collect()).unwrap_or_default();
            links.push(CrisisLink { label, href, kind: "text-line" });
        }
        if !directory.is_empty() {
            let label = "Find a helpline near you".to_owned();
            links.push(CrisisLink { label, href: directory.clone(), kind: "directory" });
        }
        Self {
            classifier,
            links,
            crisis_line: configured(&args.crisis_line)
                .unwrap_or_else(|| "a crisis line in your country".to_owned()),
            text_line: configured(&args.crisis_text_line),
            emergency: configured(&args.emergency_number).unwrap_or_else(|| {
                "your local emergency number (for example 112 in the EU, 911 in the US and Canada, 999 in the UK)"
                    .to_owned()
            }),
            directory,
        }
    }

    /// The ways to reach help that the client's crisis card offers, most
    /// urgent first.
    pub fn links(&self) -> &[CrisisLink] {
        &self.links
    }

    /// Whether the deployment configured its own crisis line and emergency number.
    pub fn configured(args: &SafetyArgs) -> bool {
        args.crisis_line.is_some() && args.emergency_number.is_some()
    }

    /// The flag to store with a message the detector assessed, if any.
    pub fn flag(&self, assessment: &Assessment) -> Option<RiskFlag> {
        (assessment.level > RiskLevel::None).then(|| RiskFlag {
            level: assessment.level,
            rules: assessment.rule_ids(),
            detector_version: assessment.detector_version(),
            crisis_message: self.crisis_message(assessment.level),
        })
    }

    /// Screens a client message, read with the client's `earlier` messages
    /// in the session (oldest first); what the detector read of it is kept
    /// in `message` for the windows after it.
    pub fn screen(&self, message: &Earlier, earlier: &[&Earlier]) -> (Assessment, Option<RiskFlag>) {
        let assessment = self.classifier.classify_in_context(message, earlier);
        let flag = self.flag(&assessment);
        (assessment, flag)
    }

    /// The verdict on one text alone (`POST /api/safety/classify`).
    pub fn classify(&self, text: &str) -> Assessment {
        self.classifier.classify(text)
    }

    /// The detector's version: `RULES+model.MODEL`.
    pub fn detector_version(&self) -> String {
        self.classifier.version()
    }

    /// The `system` message with crisis resources for a level.
    pub fn crisis_message(&self, level: RiskLevel) -> String {
        let Self { crisis_line, text_line, emergency, directory, .. } = self;
        let text = text_line.as_ref().map(|line| format!(" You can also {line}.")).unwrap_or_default();
        match level {
            RiskLevel::None | RiskLevel::Concern => format!(
                "It sounds like things are really hard right now, and you don't have to carry this alone. \
                 If you ever feel unsafe, you can reach {crisis_line} at any time, day or night.{text} \
                 In an emergency, call {emergency}. Crisis lines near you: {directory}. \
                 A therapist can also join this chat."
            ),
            RiskLevel::High | RiskLevel::Imminent => format!(
                "Your safety matters most right now. If you are in danger or might act on these thoughts, \
                 please call {emergency} now, or reach {crisis_line}: free, confidential and open any \
                 time.{text} Crisis lines near you: {directory}. This chat has been flagged so a therapist \
                 sees it first."
            ),
        }
    }

    /// The flag for a level raised by the model's second opinion.
    pub fn second_opinion(&self, level: RiskLevel) -> RiskFlag {
        RiskFlag {
            level,
            rules: vec![SECOND_OPINION_RULE.to_owned()],
            detector_version: self.classifier.version(),
            crisis_message: self.crisis_message(level),
        }
    }
}

/// What the language model's second opinion reads: the message, after the
/// client's earlier messages in the detector's window when there are any
/// (the format `prompts/risk_assessment.md` describes).
pub fn second_opinion_text(earlier: &[&Earlier], text: &str) -> String {
    if earlier.is_empty() {
        return text.to_owned();
    }
    let mut out = String::from("Earlier messages from this client, oldest first:\n");
    for message in earlier {
        out.push_str("- ");
        out.push_str(message.text());
        out.push('\n');
    }
    out.push_str("\nThe message to assess:\n");
    out.push_str(text);
    out
}

/// The rule id recorded when the model's second opinion raised a level.
pub const SECOND_OPINION_RULE: &str = "llm.second_opinion";

/// The companion at `high` and `imminent`: the next text of [`SAFETY_SCRIPT`].
pub struct SafetyScript;

impl SafetyScript {
    /// The next text: the one after the last script text in the history.
    pub fn next(request: &ReplyRequest) -> &'static str {
        let said = request
            .history
            .iter()
            .rev()
            .filter(|turn| turn.sender == Sender::Ai)
            .find_map(|turn| SAFETY_SCRIPT.iter().position(|text| *text == turn.content));
        SAFETY_SCRIPT[said.map_or(0, |index| (index + 1) % SAFETY_SCRIPT.len())]
    }
}

impl Responder for SafetyScript {
    fn name(&self) -> &'static str {
        "safety_script"
    }

    fn reply(&self, request: ReplyRequest) -> BoxStream<'static, Result<String, ResponderError>> {
        Box::pin(stream::iter([Ok(Self::next(&request).to_owned())]))
    }
}

/// Counts of flags and referrals over the last `days` days, by the
/// detector of `version`.
pub async fn report(store: &dyn Store, days: u32, version: String) -> Result<api::SafetyReport, StoreError> {
    let since =
        (OffsetDateTime::now_utc() - time::Duration::days(days.into())).replace_time(time::Time::MIDNIGHT);
    let counts = store.safety_report(since).await?;
    let by_level = |rows: Vec<(RiskLevel, i64)>| {
        let mut counts = LevelCounts::default();
        for (level, count) in rows {
            match level {
                RiskLevel::None => continue,
                RiskLevel::Concern => counts.concern += count,
                RiskLevel::High => counts.high += count,
                RiskLevel::Imminent => counts.imminent += count,
            }
            counts.total += count;
        }
        counts
    };
    Ok(api::SafetyReport {
        since,
        referrals: by_level(counts.referrals),
        flags: by_level(counts.flags),
        flagged_sessions: counts.flagged_sessions,
        unacknowledged_sessions: counts.unacknowledged_sessions,
        detector_version: version,
    })
}

/// `haven safety check TEXT`: the detector's verdict as JSON.
pub fn check_cli(text: &str, model: Option<&std::path::Path>) -> anyhow::Result<()> {
    let classifier = Classifier::load(model)?;
    println!("{}", serde_json::to_string(&classifier.classify(text))?);
    Ok(())
}

/// `haven safety report`: the counts as JSON.
pub async fn report_cli(database: &str, days: u32) -> anyhow::Result<()> {
    let store = crate::startup::open_store(database).await?;
    let version = Classifier::try_builtin()?.version();
    println!("{}", serde_json::to_string_pretty(&report(store.as_ref(), days, version).await?)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_responder::Turn;

    fn args(line: Option<&str>, emergency: Option<&str>) -> SafetyArgs {
        SafetyArgs {
            crisis_line: line.map(str::to_owned),
            crisis_text_line: None,
            emergency_number: emergency.map(str::to_owned),
            crisis_resources_url: "https://findahelpline.com".into(),
            safety_second_opinion: true,
            safety_model: None,
        }
    }

    #[test]
    fn crisis_messages_carry_the_configured_resources_or_neutral_defaults() {
        let configured = Escalation::new(&args(Some("988"), Some("911")), Classifier::builtin());
        let high = configured.crisis_message(RiskLevel::High);
        assert!(high.contains("call 911 now") && high.contains("reach 988"), "{high}");
        let default = Escalation::new(&args(None, Some(" ")), Classifier::builtin());
        let concern = default.crisis_message(RiskLevel::Concern);
        assert!(concern.contains("findahelpline.com") && concern.contains("112 in the EU"), "{concern}");
        assert_eq!(concern.matches("findahelpline").count(), 1, "{concern}");
    }

    #[test]
    fn the_card_links_dial_and_text_what_was_configured_and_always_the_directory() {
        let mut configured = args(Some("0800 111 0 111 (TelefonSeelsorge)"), Some("112"));
        configured.crisis_text_line = Some("text SHOUT to 85258".into());
        let links = Escalation::new(&configured, Classifier::builtin()).links().to_vec();
        let hrefs: Vec<&str> = links.iter().map(|link| link.href.as_str()).collect();
        assert_eq!(
            hrefs,
            ["tel:112", "tel:08001110111", "sms:85258?body=SHOUT", "https://findahelpline.com"]
        );
        assert_eq!(links[2].label, "Text SHOUT to 85258");
        assert_eq!(dialable("+44 116 123 (Samaritans)").as_deref(), Some("+44116123"));
        assert_eq!(sms_link("741741").as_deref(), Some("sms:741741"));
        // Words only (nothing to dial), or nothing configured: the directory.
        let neutral = Escalation::new(&args(Some("your local crisis line"), None), Classifier::builtin());
        assert_eq!(neutral.links().iter().map(|link| link.kind).collect::<Vec<_>>(), ["directory"]);
    }

    #[test]
    fn the_script_goes_on_from_its_last_text_and_wraps_around() {
        let turn = |sender, content: &str| Turn {
            sender,
            kind: haven_protocol::MessageKind::Chat,
            content: content.to_owned(),
        };
        let mut request = ReplyRequest { history: vec![turn(Sender::User, "help")], ..Default::default() };
        assert_eq!(SafetyScript::next(&request), SAFETY_SCRIPT[0]);
        request.history.push(turn(Sender::Ai, SAFETY_SCRIPT[0]));
        request.history.push(turn(Sender::User, "no"));
        assert_eq!(SafetyScript::next(&request), SAFETY_SCRIPT[1]);
        request.history.push(turn(Sender::Ai, SAFETY_SCRIPT[3]));
        assert_eq!(SafetyScript::next(&request), SAFETY_SCRIPT[0]);
    }
}
