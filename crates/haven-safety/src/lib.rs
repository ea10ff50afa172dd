//! Haven's crisis detector.
//!
//! Every client message goes through a [`Classifier`] before any responder
//! sees it: the rules and a small learned model, side by side, and the
//! higher level wins. The verdict is deterministic and explainable: each
//! [`RuleHit`] names the rule that fired and the words it fired on, and the
//! [`ModelVerdict`] gives the model's version, level and score.
//!
//! The model ([`model`]) is shipped in the binary, trained offline by
//! `scripts/safety-model/train.sh`; `--safety-model PATH` loads another.
//! [`Classifier::classify_in_context`] also reads the client's latest
//! earlier messages, so that "tonight" after earlier ideation escalates.
//!
//! The rules are data, in `rules/rules.toml`, compiled into the binary; that
//! file documents its own format and the clinical choices behind it. A
//! message is classified in three steps:
//!
//! 1. [`normalise`] it (case, accents, apostrophes, leetspeak, spelled-out
//!    words);
//! 2. one `RegexSet` pass over the normalised text tells which rules match
//!    at all — for most messages none do, and classification ends here;
//! 3. only for those rules, locate the words, apply the suppressions (idioms,
//!    negation, fiction or professional framing, past history), and keep the
//!    highest level left.
//!
//! `data/labelled.jsonl` is the labelled set the rules are scored against in
//! this crate's tests; it and `data/train/` train the model; `data/unseen/`
//! holds the rounds written for evaluation only.

#![forbid(unsafe_code)]

pub mod model;
mod normalise;
mod rules;

#[cfg(test)]
mod labelled_tests;
#[cfg(test)]
mod model_tests;

use std::borrow::Cow;
use std::sync::{LazyLock, OnceLock};

use haven_protocol::RiskLevel;
use regex::RegexSet;
use serde::Serialize;

use model::{Model, ModelError, ModelVerdict, Reading};
pub use normalise::normalise;
use rules::{Compiled, RulesError, Scope};

/// The built-in rules, as shipped.
const RULES: &str = include_str!("../rules/rules.toml");

/// The version of the built-in rules: the `version` line of `rules.toml`.
pub const VERSION: &str = version_line(RULES);

/// The version of the built-in rules, as reported in every [`Assessment`].
pub fn rules_version() -> &'static str {
    VERSION
}

/// One rule that fired, and on which words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RuleHit {
    /// The rule's stable id, e.g. `en.intent.kill_self`.
    pub id: String,
    /// The rule's level, or lower if a suppression capped it (past history).
    pub level: RiskLevel,
    /// The words of the (normalised) message the rule matched.
    pub matched: String,
}

/// The detector's verdict on one message: `{"level", "rules", "version",
/// "model"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Assessment {
    /// The higher of the rules' level (the highest among `rules`) and the
    /// model's; `none` when neither found anything.
    pub level: RiskLevel,
    /// Every rule that fired, highest level first, then in file order.
    pub rules: Vec<RuleHit>,
    /// The version of the rules that produced this verdict.
    pub version: &'static str,
    /// The model's verdict; absent only from the rules alone
    /// ([`Detector::classify`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelVerdict>,
}

impl Assessment {
    /// Joins the model's verdict to the rules': the higher level of the two.
    fn add_model(&mut self, verdict: ModelVerdict) {
        self.level = self.level.max(verdict.level);
        self.model = Some(verdict);
    }

    /// The ids stored with a flag: every rule that fired, then [`MODEL_RULE`]
    /// when the model's level is the verdict's and higher than every rule's.
    pub fn rule_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.rules.iter().map(|hit| hit.id.clone()).collect();
        let rules_level = self.rules.iter().map(|hit| hit.level).max().unwrap_or(RiskLevel::None);
        if self.model.as_ref().is_some_and(|model| model.level == self.level && model.level > rules_level) {
            ids.push(MODEL_RULE.to_owned());
        }
        ids
    }

    /// The versions that produced this verdict, as stored with a flag:
    /// `RULES+model.MODEL`.
    pub fn detector_version(&self) -> String {
        match &self.model {
            Some(model) => format!("{}+model.{}", self.version, model.version),
            None => self.version.to_owned(),
        }
    }
}

/// Classifies one client message with the built-in rules and model.
pub fn classify(text: &str) -> Assessment {
    Classifier::builtin().classify(text)
}

/// How many of the client's earlier messages
/// [`Classifier::classify_in_context`] reads.
pub const WINDOW: usize = 3;

/// The longest part of each earlier message that the window keeps, in
/// bytes (its end: the most recent words).
const WINDOW_BYTES: usize = 1_000;

/// The id stored with a flag whose level the model set, above the rules'.
pub const MODEL_RULE: &str = "model";

/// The rule id of a level raised by the conversation, not the message alone.
pub const CONTEXT_RULE: &str = "context.window";

/// The rules and the model together.
#[derive(Debug, Clone, Copy)]
pub struct Classifier {
    rules: &'static Detector,
    model: &'static Model,
}

impl Classifier {
    /// The built-in rules and model. Cannot fail in a shipped build:
    /// `the_shipped_model_is_the_recorded_one` in the tests loads this very
    /// file.
    pub fn builtin() -> Classifier {
        Classifier::try_builtin().unwrap_or_else(|e| panic!("the built-in {e}"))
    }

    /// The built-in rules and model, or why the model cannot be used.
    pub fn try_builtin() -> Result<Classifier, ModelError> {
        Ok(Classifier::with_model(Model::builtin()?))
    }

    /// The built-in rules with another model (`--safety-model`).
    pub fn with_model(model: &'static Model) -> Classifier {
        Classifier { rules: Detector::builtin(), model }
    }

    /// The built-in rules with the model in `path`, or the built-in model.
    /// The loaded model lives as long as the process.
    pub fn load(path: Option<&std::path::Path>) -> Result<Classifier, ModelError> {
        match path {
            Some(path) => Ok(Classifier::with_model(Box::leak(Box::new(Model::load(path)?)))),
            None => Classifier::try_builtin(),
        }
    }

    /// `RULES+model.MODEL`, as stored with every flag.
    pub fn version(&self) -> String {
        format!("{}+model.{}", self.rules.version(), self.model.version())
    }

    /// Classifies one message on its own.
    pub fn classify(&self, text: &str) -> Assessment {
        let normalised = normalise(text);
        self.assess(&normalised, &self.model.read(&normalised))
    }

    /// The rules' verdict and the model's on one normalised message.
    fn assess(&self, normalised: &str, reading: &Reading) -> Assessment {
        let mut assessment = self.rules.assess_normalised(normalised);
        assessment.add_model(self.model.assess_readings(&[reading]));
        assessment
    }

    /// Classifies a client message together with the client's `earlier`
    /// messages in the session, oldest first (the last [`WINDOW`] count).
    ///
    /// The conversation, the earlier messages and this one a line each, is
    /// classified too, and the message's level is raised to the
    /// conversation's when the conversation with it scores higher than both
    /// the message alone and the conversation without it: the message added
    /// the risk ("tonight" after ideation), rather than repeating an
    /// earlier flag. Such a raise is reported as a [`CONTEXT_RULE`] hit
    /// first in `rules`. Each message is normalised and read by the model
    /// once, however many windows it is part of ([`Earlier`]): what this
    /// call reads of `message` is kept in it, for the windows of the
    /// messages after it.
    pub fn classify_in_context(&self, message: &Earlier, earlier: &[&Earlier]) -> Assessment {
        let whole = message.whole(self.model);
        let (normalised, reading) = (&whole.normalised, &whole.reading);
        let earlier = &earlier[earlier.len().saturating_sub(WINDOW)..];
        let mut own = self.rules.assess_normalised(normalised);
        if earlier.is_empty() || own.level == RiskLevel::Imminent {
            own.add_model(self.model.assess_readings(&[reading]));
            return own;
        }
        let kept: Vec<Cow<'_, Kept>> = earlier.iter().map(|message| message.kept(self.model)).collect();
        let mut conversation: Vec<&Reading> = kept.iter().map(|kept| &kept.reading).collect();
        conversation.push(reading);
        // The message alone and the conversation with it: one pass of the
        // model's hidden layer for both.
        let [alone, with_model] = self.model.assess_each([&[reading], &conversation]);
        own.add_model(alone);
        if own.level == RiskLevel::Imminent {
            return own;
        }
        let mut window = String::new();
        for kept in &kept {
            window.push_str(&kept.normalised);
            window.push('\n');
        }
        let before_len = window.len();
        window.push_str(normalised);
        let with = self.rules.assess_normalised(&window).level.max(with_model.level);
        // The conversation without the message matters only when the one
        // with it would raise the message's level. It raises it only when
        // something said is a signal apart from this conjunction (the
        // message, or the earlier ones together, at `concern` or above):
        // words that are nothing alone and nothing before ("one", "two",
        // "three") are not made risk by their order.
        let before = if with > own.level {
            let readings = &conversation[..kept.len()];
            let model = self.model.assess_readings(readings).level;
            self.rules.assess_normalised(&window[..before_len]).level.max(model)
        } else {
            RiskLevel::Imminent
        };
        if with > own.level && with > before && own.level.max(before) >= RiskLevel::Concern {
            own.level = with;
            own.rules.insert(0, RuleHit { id: CONTEXT_RULE.to_owned(), level: with, matched: String::new() });
        }
        own
    }
}

/// A client's earlier message, as a session keeps it for the window of
/// [`Classifier::classify_in_context`]: its text and, from the first
/// window that needs it on, its last [`WINDOW_BYTES`] bytes normalised and
/// what the model read of them, so that each message is read once however
/// many windows it is part of.
#[derive(Debug)]
pub struct Earlier {
    text: String,
    kept: OnceLock<Kept>,
}

/// What a window keeps of an earlier message.
#[derive(Debug, Clone)]
struct Kept {
    normalised: String,
    reading: Reading,
}

impl Earlier {
    pub fn new(text: String) -> Earlier {
        Earlier { text, kept: OnceLock::new() }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// The whole message normalised, and what `model` reads of it: kept for
    /// the windows after it when they keep all of it (at most
    /// [`WINDOW_BYTES`]), else read for this once.
    fn whole(&self, model: &Model) -> Cow<'_, Kept> {
        if self.text.len() <= WINDOW_BYTES {
            return self.kept(model);
        }
        let normalised = normalise(&self.text);
        Cow::Owned(Kept { reading: model.read(&normalised), normalised })
    }

    /// What the window reads of the message with `model`: kept the first
    /// time, read again only for another model than the one that read it
    /// first.
    fn kept(&self, model: &Model) -> Cow<'_, Kept> {
        let read = || {
            let mut start = self.text.len().saturating_sub(WINDOW_BYTES);
            while !self.text.is_char_boundary(start) {
                start += 1;
            }
            let normalised = normalise(&self.text[start..]);
            let reading = model.read(&normalised);
            Kept { normalised, reading }
        };
        match self.kept.get_or_init(read) {
            kept if kept.reading.is_by(model) => Cow::Borrowed(kept),
            _ => Cow::Owned(read()),
        }
    }
}

/// A compiled set of rules.
#[derive(Debug)]
pub struct Detector {
    compiled: Compiled,
    /// Every rule's pattern, then every `near` pattern: one pass tells which
    /// rules can fire.
    rule_set: RegexSet,
    /// Every suppression's pattern; scanned only when some rule matched.
    suppression_set: RegexSet,
}

static BUILTIN: LazyLock<Detector> = LazyLock::new(|| {
    // Cannot fail in a shipped build: `builtin_rules_compile` in the tests
    // compiles this very file.
    Detector::from_rules(RULES).unwrap_or_else(|e| panic!("the built-in rules/rules.toml is broken: {e}"))
});

impl Detector {
    /// The detector with the built-in rules, compiled on first use (about
    /// 0.1 s in a release build, which is why `serve` calls this at startup).
    pub fn builtin() -> &'static Detector {
        &BUILTIN
    }

    /// Compiles a rules file in the format of `rules/rules.toml`.
    pub(crate) fn from_rules(source: &'static str) -> Result<Detector, RulesError> {
        let compiled = rules::compile(source)?;
        let set = |patterns: &[String]| {
            regex::RegexSetBuilder::new(patterns)
                .size_limit(64 << 20)
                .dfa_size_limit(16 << 20)
                .build()
                .map_err(|e| RulesError(format!("the patterns do not compile together: {e}")))
        };
        let rule_set = set(&compiled.set_patterns)?;
        let suppression_set = set(&compiled.suppression_patterns)?;
        Ok(Detector { compiled, rule_set, suppression_set })
    }

    /// The version of this detector's rules.
    pub fn version(&self) -> &'static str {
        self.compiled.version
    }

    /// Classifies one message with the rules alone.
    pub fn classify(&self, text: &str) -> Assessment {
        self.assess_normalised(&normalise(text))
    }

    fn assess_normalised(&self, text: &str) -> Assessment {
        let mut rules = self.hits(text);
        rules.sort_by_key(|hit| std::cmp::Reverse(hit.level));
        let level = rules.first().map_or(RiskLevel::None, |hit| hit.level);
        Assessment { level, rules, version: self.compiled.version, model: None }
    }

    fn hits(&self, text: &str) -> Vec<RuleHit> {
        let matched = self.rule_set.matches(text);
        if !matched.matched_any() {
            return Vec::new();
        }
        let mut suppressions = SuppressionMatches::new(self, text);
        let mut hits = Vec::new();
        for (index, rule) in self.compiled.rules.iter().enumerate() {
            let near_matched = self.compiled.near_slot[index].is_none_or(|slot| matched.matched(slot));
            if !matched.matched(index) || !near_matched {
                continue;
            }
            let mut best: Option<(RiskLevel, Span)> = None;
            for span in candidate_spans(rule, text) {
                let Some(level) = suppressions.level_after(rule, span) else { continue };
                if best.is_none_or(|(best_level, _)| level > best_level) {
                    best = Some((level, span));
                }
                if level == rule.level {
                    break;
                }
            }
            if let Some((level, span)) = best {
                hits.push(RuleHit { id: rule.id.clone(), level, matched: text[span.0..span.1].to_owned() });
            }
        }
        hits
    }
}

/// A byte range of the normalised text.
type Span = (usize, usize);

/// Where `rule` fires in `text`: each match of its pattern, or for a `near`
/// rule each pair of matches close enough, as one span covering both.
fn candidate_spans(rule: &rules::Rule, text: &str) -> Vec<Span> {
    let main = find_spans(&rule.regex, text);
    let Some((near, within)) = &rule.near else { return main };
    let near = find_spans(near, text);
    let mut out = Vec::new();
    for &(start, end) in &main {
        for &(near_start, near_end) in &near {
            let gap = near_start.saturating_sub(end).max(start.saturating_sub(near_end));
            if gap <= *within {
                out.push((start.min(near_start), end.max(near_end)));
            }
        }
    }
    out
}

/// Every match of `regex` in `text`, trimmed.
fn find_spans(regex: &regex::Regex, text: &str) -> Vec<Span> {
    regex.find_iter(text).map(|m| trim_span(text, (m.start(), m.end()))).collect()
}

/// Drops the non-word character the pattern wrapper may have consumed.
fn trim_span(text: &str, (start, mut end): Span) -> Span {
    while end > start && !text.as_bytes()[end - 1].is_ascii_alphanumeric() {
        end -= 1;
    }
    (start, end)
}

/// The sentence around `span`: from after the previous `. ! ? ;` or new line
/// to the next one.
fn sentence_of(text: &str, span: Span) -> Span {
    let is_end = |b: &u8| matches!(b, b'.' | b'!' | b'?' | b';' | b'\n');
    let bytes = text.as_bytes();
    let start = bytes[..span.0].iter().rposition(is_end).map_or(0, |at| at + 1);
    let end = bytes[span.1..].iter().position(is_end).map_or(bytes.len(), |at| span.1 + at);
    (start, end)
}

fn overlaps(a: Span, b: Span) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// The suppressions' matches in one message, found once and only if needed.
struct SuppressionMatches<'a> {
    detector: &'a Detector,
    text: &'a str,
    matched: Option<regex::SetMatches>,
    spans: Vec<Option<Vec<Span>>>,
    unless_spans: Vec<Option<Vec<Span>>>,
}

impl<'a> SuppressionMatches<'a> {
    fn new(detector: &'a Detector, text: &'a str) -> Self {
        let count = detector.compiled.suppressions.len();
        SuppressionMatches {
            detector,
            text,
            matched: None,
            spans: vec![None; count],
            unless_spans: vec![None; count],
        }
    }

    /// The level of `rule`'s hit at `span` once its suppressions have acted:
    /// `None` when one drops it, else the rule's level, lowered by any cap.
    fn level_after(&mut self, rule: &rules::Rule, span: Span) -> Option<RiskLevel> {
        let mut level = rule.level;
        if rule.suppressions.is_empty() {
            return Some(level);
        }
        let text = self.text;
        let matched = self.matched.get_or_insert_with(|| self.detector.suppression_set.matches(text));
        let sentence = sentence_of(text, span);
        for &index in &rule.suppressions {
            if !matched.matched(index) {
                continue;
            }
            let suppression = &self.detector.compiled.suppressions[index];
            let spans = self.spans[index].get_or_insert_with(|| find_spans(&suppression.regex, text));
            let scope = match suppression.scope {
                Scope::Overlap => span,
                Scope::Sentence => sentence,
            };
            if !spans.iter().any(|&s| overlaps(s, scope)) {
                continue;
            }
            if let Some(unless) = &suppression.unless
                && self.unless_spans[index]
                    .get_or_insert_with(|| find_spans(unless, text))
                    .iter()
                    .any(|&s| overlaps(s, sentence))
            {
                continue;
            }
            match suppression.cap {
                None | Some(RiskLevel::None) => return None,
                Some(cap) => level = level.min(cap),
            }
        }
        Some(level)
    }
}

/// Reads `version = "…"` from the rules at compile time, so that
/// [`VERSION`] is a constant (a test checks it equals what the TOML parser
/// reads).
const fn version_line(source: &str) -> &str {
    let bytes = source.as_bytes();
    let key = b"version = \"";
    let mut i = 0;
    while i + key.len() <= bytes.len() {
        let at_line_start = i == 0 || bytes[i - 1] == b'\n';
        let mut k = 0;
        while at_line_start && k < key.len() && bytes[i + k] == key[k] {
            k += 1;
        }
        if k == key.len() {
            let start = i + k;
            let mut end = start;
            while end < bytes.len() && bytes[end] != b'"' && bytes[end] != b'\n' {
                end += 1;
            }
            let (_, rest) = bytes.split_at(start);
            let (value, _) = rest.split_at(end - start);
            return match core::str::from_utf8(value) {
                Ok(value) => value,
                Err(_) => panic!("rules.toml: the version is not UTF-8"),
            };
        }
        i += 1;
    }
    panic!("rules.toml has no `version = \"…\"` line")
}
