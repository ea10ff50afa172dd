//! The rules file (`rules/rules.toml`): its schema, and its compilation into
//! regular expressions.
//!
//! Every pattern is wrapped as `\b(?:pattern)(?:[^a-z0-9]|$)`: it starts at a
//! word boundary and ends at one, so `die` does not fire inside `diet`. The
//! closing character the wrapper may consume is trimmed from the reported
//! span. `{NAME}` inside a pattern is replaced by the `[define]` entry of that
//! name (itself possibly using other definitions), wrapped in `(?:…)`.

use std::collections::BTreeMap;
use std::fmt;

use haven_protocol::RiskLevel;
use regex::{Regex, RegexBuilder};
use serde::Deserialize;

/// Why a rules file was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulesError(pub String);

impl fmt::Display for RulesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid safety rules: {}", self.0)
    }
}

impl std::error::Error for RulesError {}

fn error(message: impl Into<String>) -> RulesError {
    RulesError(message.into())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile<'a> {
    #[serde(borrow)]
    version: &'a str,
    #[serde(default)]
    define: BTreeMap<String, String>,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleEntry>,
    #[serde(default, rename = "suppress")]
    suppressions: Vec<SuppressEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    id: String,
    level: RiskLevel,
    patterns: Vec<String>,
    #[serde(default)]
    near: Vec<String>,
    within: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SuppressEntry {
    id: String,
    applies_to: Vec<String>,
    scope: Scope,
    cap: Option<RiskLevel>,
    patterns: Vec<String>,
    #[serde(default)]
    unless: Vec<String>,
}

/// Where a suppression's words must be, relative to a rule's words, to act
/// on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The two spans share at least one character.
    Overlap,
    /// Both are in the same sentence (split at `. ! ? ;` and new lines).
    Sentence,
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    pub id: String,
    pub level: RiskLevel,
    pub regex: Regex,
    /// When set, the rule fires only where `regex` matches within `within`
    /// characters of this one.
    pub near: Option<(Regex, usize)>,
    /// Indices of the suppressions whose `applies_to` names this rule.
    pub suppressions: Vec<usize>,
}

/// One compiled suppression.
#[derive(Debug)]
pub struct Suppression {
    pub scope: Scope,
    /// `None` drops the rule's hit; a level lowers the hit to at most that.
    pub cap: Option<RiskLevel>,
    pub regex: Regex,
    /// The suppression is void when this matches in the hit's sentence.
    pub unless: Option<Regex>,
}

/// The rules, compiled.
#[derive(Debug)]
pub struct Compiled {
    pub version: &'static str,
    pub rules: Vec<Rule>,
    pub suppressions: Vec<Suppression>,
    /// The patterns a one-pass `RegexSet` scans for: for rule `i`, entry `i`
    /// is its pattern and, if it has one, entry `near_slot[i]` its `near`.
    pub set_patterns: Vec<String>,
    pub near_slot: Vec<Option<usize>>,
    /// The suppressions' patterns, in order, for a second `RegexSet`.
    pub suppression_patterns: Vec<String>,
}

/// Default distance, in characters of normalised text, for `near`.
const DEFAULT_WITHIN: usize = 40;

/// Parses and compiles a rules file.
pub fn compile(source: &'static str) -> Result<Compiled, RulesError> {
    let file: RulesFile<'static> = basic_toml::from_str(source).map_err(|e| error(e.to_string()))?;
    if file.version.trim().is_empty() {
        return Err(error("`version` is empty"));
    }
    let expander = Expander::new(&file.define)?;

    let mut rules = Vec::with_capacity(file.rules.len());
    let mut set_patterns = Vec::with_capacity(file.rules.len());
    let mut near_patterns = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for entry in file.rules {
        check_id(&entry.id)?;
        if !seen.insert(entry.id.clone()) {
            return Err(error(format!("rule id `{}` is used twice", entry.id)));
        }
        if entry.level == RiskLevel::None {
            return Err(error(format!("rule `{}` has level `none`, which can never fire", entry.id)));
        }
        let pattern = expander.alternatives(&entry.id, &entry.patterns)?;
        let regex = build(&entry.id, &pattern)?;
        let near = if entry.near.is_empty() {
            if entry.within.is_some() {
                return Err(error(format!("rule `{}` has `within` but no `near`", entry.id)));
            }
            None
        } else {
            let near_pattern = expander.alternatives(&entry.id, &entry.near)?;
            let near_regex = build(&entry.id, &near_pattern)?;
            near_patterns.push((rules.len(), near_pattern));
            Some((near_regex, entry.within.unwrap_or(DEFAULT_WITHIN)))
        };
        set_patterns.push(pattern);
        rules.push(Rule { id: entry.id, level: entry.level, regex, near, suppressions: Vec::new() });
    }
    let mut near_slot = vec![None; rules.len()];
    for (rule, pattern) in near_patterns {
        near_slot[rule] = Some(set_patterns.len());
        set_patterns.push(pattern);
    }

    let mut suppressions = Vec::with_capacity(file.suppressions.len());
    let mut suppression_patterns = Vec::with_capacity(file.suppressions.len());
    for entry in file.suppressions {
        check_id(&entry.id)?;
        if !seen.insert(entry.id.clone()) {
            return Err(error(format!("suppression id `{}` is used twice", entry.id)));
        }
        if entry.applies_to.is_empty() {
            return Err(error(format!("suppression `{}` applies to no rule", entry.id)));
        }
        let index = suppressions.len();
        for glob in &entry.applies_to {
            let mut any = false;
            for rule in rules.iter_mut().filter(|rule| glob_matches(glob, &rule.id)) {
                rule.suppressions.push(index);
                any = true;
            }
            if !any {
                return Err(error(format!(
                    "suppression `{}`: `applies_to` entry `{glob}` names no rule",
                    entry.id
                )));
            }
        }
        let pattern = expander.alternatives(&entry.id, &entry.patterns)?;
        let regex = build(&entry.id, &pattern)?;
        let unless = if entry.unless.is_empty() {
            None
        } else {
            Some(build(&entry.id, &expander.alternatives(&entry.id, &entry.unless)?)?)
        };
        suppression_patterns.push(pattern);
        suppressions.push(Suppression { scope: entry.scope, cap: entry.cap, regex, unless });
    }

    Ok(Compiled { version: file.version, rules, suppressions, set_patterns, near_slot, suppression_patterns })
}

/// Ids are dotted lower-case words: `en.intent.kill_self`.
fn check_id(id: &str) -> Result<(), RulesError> {
    let parts: Vec<&str> = id.split('.').collect();
    let well_formed = parts.len() >= 3
        && parts.iter().all(|part| {
            !part.is_empty()
                && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        });
    if well_formed { Ok(()) } else { Err(error(format!("id `{id}` is not of the form `lang.kind.name`"))) }
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_matches(glob: &str, id: &str) -> bool {
    let mut pieces = glob.split('*');
    let first = pieces.next().unwrap_or("");
    let Some(mut rest) = id.strip_prefix(first) else { return false };
    let pieces: Vec<&str> = pieces.collect();
    let Some((last, middle)) = pieces.split_last() else { return rest.is_empty() };
    for piece in middle {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

fn build(id: &str, pattern: &str) -> Result<Regex, RulesError> {
    RegexBuilder::new(pattern)
        .size_limit(4 << 20)
        .build()
        .map_err(|e| error(format!("`{id}`: pattern does not compile: {e}")))
}

/// Expands `{NAME}` references and wraps patterns in word boundaries.
struct Expander {
    defines: BTreeMap<String, String>,
}

impl Expander {
    fn new(raw: &BTreeMap<String, String>) -> Result<Self, RulesError> {
        let mut defines = BTreeMap::new();
        for name in raw.keys() {
            if !is_define_name(name) {
                return Err(error(format!("definition name `{name}` must be UPPER_CASE")));
            }
            let expanded = expand(raw, name, &raw[name], 0)?;
            defines.insert(name.clone(), expanded);
        }
        Ok(Expander { defines })
    }

    /// `\b(?:p1|p2|…)(?:[^a-z0-9]|$)`, each `pn` expanded.
    fn alternatives(&self, id: &str, patterns: &[String]) -> Result<String, RulesError> {
        if patterns.is_empty() {
            return Err(error(format!("`{id}` has no patterns")));
        }
        let mut out = String::from(r"\b(?:");
        for (i, pattern) in patterns.iter().enumerate() {
            if pattern.trim().is_empty() || pattern != pattern.trim() {
                return Err(error(format!("`{id}`: pattern {i} is empty or has spaces at its ends")));
            }
            if i > 0 {
                out.push('|');
            }
            out.push_str(&expand(&self.defines, id, pattern, 0)?);
        }
        out.push_str(")(?:[^a-z0-9]|$)");
        Ok(out)
    }
}

fn is_define_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_uppercase())
        && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// Replaces each `{NAME}` (an upper-case name: regex repetitions such as
/// `{2,}` are left alone) by `(?:definition)`.
fn expand(
    defines: &BTreeMap<String, String>,
    owner: &str,
    pattern: &str,
    depth: usize,
) -> Result<String, RulesError> {
    if depth > 8 {
        return Err(error(format!("`{owner}`: definitions nest too deeply (a cycle?)")));
    }
    let mut out = String::with_capacity(pattern.len());
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) if is_define_name(&after[..close]) => {
                let name = &after[..close];
                let Some(definition) = defines.get(name) else {
                    return Err(error(format!("`{owner}` uses `{{{name}}}`, which is not defined")));
                };
                out.push_str("(?:");
                out.push_str(&expand(defines, owner, definition, depth + 1)?);
                out.push(')');
                rest = &after[close + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_ids() {
        assert!(glob_matches("*", "en.intent.kill_self"));
        assert!(glob_matches("en.intent.*", "en.intent.kill_self"));
        assert!(glob_matches("*.intent.*", "de.intent.umbringen"));
        assert!(glob_matches("en.intent.kill_self", "en.intent.kill_self"));
        assert!(!glob_matches("en.intent.kill", "en.intent.kill_self"));
        assert!(!glob_matches("*.abuse.*", "en.intent.kill_self"));
    }

    #[test]
    fn a_broken_file_is_rejected_with_a_reason() {
        let not_toml = compile("version = ").unwrap_err();
        assert!(not_toml.0.contains("expected"), "{not_toml}");

        let bad_regex = compile(
            "version = \"1\"\n[[rule]]\nid = \"en.test.broken\"\nlevel = \"high\"\npatterns = ['kill (myself']\n",
        )
        .unwrap_err();
        assert!(bad_regex.0.contains("en.test.broken"), "{bad_regex}");

        let unknown_define = compile(
            "version = \"1\"\n[[rule]]\nid = \"en.test.define\"\nlevel = \"high\"\npatterns = ['{NOPE} x']\n",
        )
        .unwrap_err();
        assert!(unknown_define.0.contains("NOPE"), "{unknown_define}");

        let stray_glob = compile(
            "version = \"1\"\n[[rule]]\nid = \"en.test.a\"\nlevel = \"high\"\npatterns = ['a']\n\
             [[suppress]]\nid = \"en.test.s\"\napplies_to = [\"fr.*\"]\nscope = \"overlap\"\npatterns = ['b']\n",
        )
        .unwrap_err();
        assert!(stray_glob.0.contains("fr.*"), "{stray_glob}");

        let misspelt_field =
            compile("version = \"1\"\n[[rule]]\nid = \"en.test.a\"\nlevel = \"high\"\npattern = ['a']\n")
                .unwrap_err();
        assert!(misspelt_field.0.contains("pattern"), "{misspelt_field}");
    }

    #[test]
    fn definitions_expand_and_repetitions_stay() {
        let compiled = compile(
            "version = \"1\"\n[define]\nSELF = 'my ?self'\nKILL = 'k+i*l+'\nBOTH = '{KILL} {SELF}'\n\
             [[rule]]\nid = \"en.test.a\"\nlevel = \"high\"\npatterns = ['{BOTH}', 'x{2,}']\n",
        )
        .unwrap();
        assert_eq!(compiled.set_patterns[0], r"\b(?:(?:(?:k+i*l+) (?:my ?self))|x{2,})(?:[^a-z0-9]|$)");
    }
}
