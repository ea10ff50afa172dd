//! Haven's crisis detector. (Skeleton: being written.)

use haven_protocol::RiskLevel;
use serde::Serialize;

/// One rule that fired, and on which words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleHit {
    /// The rule's stable id, e.g. `en.intent.kill_myself`.
    pub id: String,
    pub level: RiskLevel,
    /// The words of the (normalised) message the rule matched.
    pub matched: String,
}

/// The detector's verdict on one message: `{"level", "rules", "version"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Assessment {
    pub level: RiskLevel,
    pub rules: Vec<RuleHit>,
    pub version: &'static str,
}

/// Classifies one client message with the built-in rules.
pub fn classify(_text: &str) -> Assessment {
    Assessment { level: RiskLevel::None, rules: Vec::new(), version: "0" }
}
