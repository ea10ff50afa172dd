//! The built-in rules against `data/labelled.jsonl`, and the detector's
//! contract (explainability, ordering, version).
//!
//! `cargo test -p haven-safety -- --nocapture labelled` prints the rates, and
//! every miss and false alarm with its text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use haven_protocol::RiskLevel;
use serde::Deserialize;

use crate::{Detector, RULES, VERSION, classify};

const LABELLED: &str = include_str!("../data/labelled.jsonl");

/// Recall on items labelled high or imminent, detected at high or above.
const MIN_RECALL_HIGH: f64 = 0.98;
/// Recall on items labelled concern, detected at concern or above.
const MIN_RECALL_CONCERN: f64 = 0.90;
/// Share of items labelled none that are detected above none.
const MAX_FALSE_ALARMS: f64 = 0.05;

const LANGUAGES: [&str; 7] = ["de", "fr", "es", "it", "pt", "nl", "pl"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Labelled {
    text: String,
    level: RiskLevel,
    tag: String,
}

fn labelled_set() -> Vec<Labelled> {
    parse_set("labelled", LABELLED)
}

fn parse_set(name: &str, source: &str) -> Vec<Labelled> {
    source
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(number, line)| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("data/{name}.jsonl line {}: {e}", number + 1))
        })
        .collect()
}

/// Whether a verdict is good enough for the thresholds: serious items must
/// reach high, concern items concern, none items must stay none.
fn sufficient(expected: RiskLevel, got: RiskLevel) -> bool {
    match expected {
        RiskLevel::None => got == RiskLevel::None,
        RiskLevel::Concern => got >= RiskLevel::Concern,
        RiskLevel::High | RiskLevel::Imminent => got >= RiskLevel::High,
    }
}

#[derive(Default)]
struct Tally {
    total: usize,
    sufficient: usize,
    exact: usize,
}

impl Tally {
    fn add(&mut self, expected: RiskLevel, got: RiskLevel) {
        self.total += 1;
        self.sufficient += usize::from(sufficient(expected, got));
        self.exact += usize::from(expected == got);
    }
}

fn percent(part: usize, whole: usize) -> f64 {
    if whole == 0 { 100.0 } else { 100.0 * part as f64 / whole as f64 }
}

/// The rates of the built-in rules on one set, and the text of the report.
struct Score {
    recall_high: f64,
    recall_concern: f64,
    false_alarms: f64,
    report: String,
}

impl Score {
    fn passes(&self) -> bool {
        self.recall_high >= 100.0 * MIN_RECALL_HIGH
            && self.recall_concern >= 100.0 * MIN_RECALL_CONCERN
            && self.false_alarms <= 100.0 * MAX_FALSE_ALARMS
    }
}

#[test]
fn labelled_set_meets_the_recall_and_false_alarm_thresholds() {
    let score = score("labelled", &labelled_set());
    println!("{}", score.report);
    assert!(score.passes(), "the rules miss a threshold:{}", score.report);
}

fn score(name: &str, items: &[Labelled]) -> Score {
    let mut report = String::new();
    let mut by_level: BTreeMap<RiskLevel, Tally> = BTreeMap::new();
    let mut by_tag: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut by_language: BTreeMap<&str, (Tally, Tally)> = BTreeMap::new();
    let mut confusion = [[0usize; 4]; 4];
    let mut failures = Vec::new();
    let mut under_or_over = Vec::new();

    for item in items {
        let assessment = classify(&item.text);
        let got = assessment.level;
        by_level.entry(item.level).or_default().add(item.level, got);
        by_tag.entry(item.tag.as_str()).or_default().add(item.level, got);
        if LANGUAGES.contains(&item.tag.as_str()) {
            let (risky, none) = by_language.entry(item.tag.as_str()).or_default();
            if item.level == RiskLevel::None { none } else { risky }.add(item.level, got);
        }
        confusion[item.level as usize][got as usize] += 1;
        let fired: Vec<String> =
            assessment.rules.iter().map(|hit| format!("{} [{}]", hit.id, hit.matched)).collect();
        let line = format!(
            "  {:>8} -> {:<8} ({}) {:?}  {}",
            item.level.as_str(),
            got.as_str(),
            item.tag,
            item.text,
            fired.join(", ")
        );
        if !sufficient(item.level, got) {
            failures.push(line);
        } else if item.level != got {
            under_or_over.push(line);
        }
    }

    let serious = [RiskLevel::High, RiskLevel::Imminent].map(|level| by_level.get(&level));
    let serious_total: usize = serious.iter().flatten().map(|t| t.total).sum();
    let serious_found: usize = serious.iter().flatten().map(|t| t.sufficient).sum();
    let concern = by_level.get(&RiskLevel::Concern).map_or((0, 0), |t| (t.sufficient, t.total));
    let none = by_level.get(&RiskLevel::None).map_or((0, 0), |t| (t.total - t.sufficient, t.total));
    let exact: usize = by_level.values().map(|t| t.exact).sum();

    let recall_high = percent(serious_found, serious_total);
    let recall_concern = percent(concern.0, concern.1);
    let false_alarms = percent(none.0, none.1);

    writeln!(report, "\n{name} set: {} items, rules version {VERSION}", items.len()).unwrap();
    writeln!(report, "  recall high+imminent (>= high): {serious_found}/{serious_total} = {recall_high:.1}%")
        .unwrap();
    writeln!(report, "  recall concern (>= concern):    {}/{} = {recall_concern:.1}%", concern.0, concern.1)
        .unwrap();
    writeln!(report, "  false alarms on none (> none):  {}/{} = {false_alarms:.1}%", none.0, none.1).unwrap();
    writeln!(
        report,
        "  exact level agreement:          {exact}/{} = {:.1}%",
        items.len(),
        percent(exact, items.len())
    )
    .unwrap();

    writeln!(report, "\nper level          n  sufficient      exact").unwrap();
    for (level, t) in &by_level {
        writeln!(
            report,
            "  {:<10} {:>6} {:>5} {:>5.1}% {:>4} {:>5.1}%",
            level.as_str(),
            t.total,
            t.sufficient,
            percent(t.sufficient, t.total),
            t.exact,
            percent(t.exact, t.total)
        )
        .unwrap();
    }

    writeln!(report, "\nconfusion (rows: label, columns: detected)").unwrap();
    writeln!(report, "              none  concern  high  imminent").unwrap();
    for level in RiskLevel::ALL {
        let row = confusion[level as usize];
        writeln!(report, "  {:<10} {:>5} {:>8} {:>5} {:>9}", level.as_str(), row[0], row[1], row[2], row[3])
            .unwrap();
    }

    writeln!(report, "\nper tag            n  sufficient      exact").unwrap();
    for (tag, t) in &by_tag {
        writeln!(
            report,
            "  {:<14} {:>3} {:>5} {:>5.1}% {:>4} {:>5.1}%",
            tag,
            t.total,
            t.sufficient,
            percent(t.sufficient, t.total),
            t.exact,
            percent(t.exact, t.total)
        )
        .unwrap();
    }

    writeln!(report, "\nper language   recall (risky items)   false alarms (none items)").unwrap();
    for (language, (risky, none)) in &by_language {
        writeln!(
            report,
            "  {:<4} {:>10}/{:<3} {:>5.1}%   {:>10}/{:<3} {:>5.1}%",
            language,
            risky.sufficient,
            risky.total,
            percent(risky.sufficient, risky.total),
            none.total - none.sufficient,
            none.total,
            percent(none.total - none.sufficient, none.total)
        )
        .unwrap();
    }

    writeln!(report, "\nmisses and false alarms ({}):", failures.len()).unwrap();
    for line in &failures {
        writeln!(report, "{line}").unwrap();
    }
    writeln!(report, "\nright side of the threshold, wrong exact level ({}):", under_or_over.len()).unwrap();
    for line in &under_or_over {
        writeln!(report, "{line}").unwrap();
    }
    Score { recall_high, recall_concern, false_alarms, report }
}

#[test]
fn labelled_set_is_large_and_balanced_enough() {
    let items = labelled_set();
    let count = |level| items.iter().filter(|item| item.level == level).count();
    let foreign = items.iter().filter(|item| LANGUAGES.contains(&item.tag.as_str())).count();
    assert!(items.len() >= 260, "{} items", items.len());
    assert!(count(RiskLevel::None) >= 70);
    assert!(count(RiskLevel::Concern) >= 50);
    assert!(count(RiskLevel::High) >= 70);
    assert!(count(RiskLevel::Imminent) >= 50);
    assert!(foreign >= 40);
    for language in LANGUAGES {
        let levels: std::collections::BTreeSet<_> =
            items.iter().filter(|item| item.tag == language).map(|item| item.level).collect();
        assert_eq!(levels.len(), 4, "{language} should have items at every level");
    }
}

#[test]
fn builtin_rules_compile() {
    // This is what guarantees the `LazyLock` behind `classify` never panics.
    let detector = Detector::from_rules(RULES).expect("rules/rules.toml");
    assert_eq!(detector.version(), VERSION);
    assert_eq!(crate::rules_version(), VERSION);
    assert!(VERSION.chars().all(|c| c.is_ascii_digit() || c == '.') && !VERSION.is_empty());
}

#[test]
fn each_hit_names_its_rule_and_the_words_it_fired_on() {
    let assessment = classify("Honestly I want to K!LL mys3lf… I have the pills in front of me.");
    assert_eq!(assessment.level, RiskLevel::Imminent);
    assert_eq!(assessment.version, VERSION);
    let hit = |id: &str| assessment.rules.iter().find(|hit| hit.id == id).map(|hit| hit.matched.as_str());
    assert_eq!(hit("en.intent.kill_self"), Some("kill myself"));
    assert_eq!(hit("en.imminent.means_at_hand"), Some("pills in front of me"));
    let levels: Vec<RiskLevel> = assessment.rules.iter().map(|hit| hit.level).collect();
    assert!(levels.windows(2).all(|pair| pair[0] >= pair[1]), "highest first: {levels:?}");
}

#[test]
fn assessment_serialises_as_level_rules_version() {
    let json = serde_json::to_value(classify("ich will mich umbringen")).unwrap();
    assert_eq!(json["level"], "high");
    assert_eq!(json["version"], VERSION);
    assert_eq!(json["rules"][0]["id"], "de.intent.umbringen");
    assert_eq!(json["rules"][0]["level"], "high");
    assert_eq!(json["rules"][0]["matched"], "mich umbringen");
}

#[test]
fn nothing_fires_on_an_ordinary_message() {
    let assessment = classify("Hi! Work was long today but I'm ok, just wanted to chat.");
    assert_eq!(assessment.level, RiskLevel::None);
    assert!(assessment.rules.is_empty());
}

/// The rules alone, for the tests of their suppressions.
fn rules(text: &str) -> crate::Assessment {
    Detector::builtin().classify(text)
}

#[test]
fn negation_drops_the_hit_and_disavowal_caps_it() {
    assert_eq!(rules("I'm not suicidal").level, RiskLevel::None);
    assert_eq!(rules("I don't want to kill myself, I just feel tired").level, RiskLevel::None);
    let disavowed = rules("I think about suicide but I'm not going to act on it");
    assert_eq!(disavowed.level, RiskLevel::Concern, "{disavowed:?}");
}

#[test]
fn past_history_is_concern_unless_it_is_back() {
    assert_eq!(rules("I used to self-harm years ago").level, RiskLevel::Concern);
    assert_eq!(rules("I used to self-harm years ago and I started again").level, RiskLevel::High);
}

#[test]
fn a_third_person_at_risk_now_is_high_but_not_in_fiction_or_the_past() {
    assert_eq!(rules("my sister told me she wants to kill herself").level, RiskLevel::High);
    assert_eq!(rules("in the novel his sister wants to kill herself").level, RiskLevel::None);
    assert_eq!(rules("my sister wanted to kill herself years ago, she is fine now").level, RiskLevel::None);
}

#[test]
fn long_and_hostile_input_is_handled() {
    let long = "I feel fine. ".repeat(2_000) + "I want to die";
    assert_eq!(classify(&long).level, RiskLevel::High);
    let noise: String =
        (0..20_000).map(|i| char::from_u32(0x20 + (i * 7919) % 0x2FF).unwrap_or('x')).collect();
    let _ = classify(&noise);
    assert_eq!(classify("").level, RiskLevel::None);
    assert_eq!(classify("1".repeat(10_000).as_str()).level, RiskLevel::None);
}

/// Not a timing assertion: prints the mean time per message over the
/// labelled set. Run with
/// `cargo test -p haven-safety --release -- --ignored --nocapture speed`.
#[test]
#[ignore]
fn classification_speed() {
    let items = labelled_set();
    let started = Instant::now();
    let detector = Detector::builtin();
    let _ = detector.classify("warm up");
    println!("first use (compiles the rules): {:?}", started.elapsed());
    let started = Instant::now();
    let classifier = crate::Classifier::builtin();
    println!("first use (loads the model): {:?}", started.elapsed());

    let rounds = 200;
    for (name, with_model) in [("rules alone", false), ("rules and model", true)] {
        let started = Instant::now();
        let mut fired = 0usize;
        for _ in 0..rounds {
            for item in &items {
                let text = std::hint::black_box(&item.text);
                let assessment = if with_model { classifier.classify(text) } else { detector.classify(text) };
                fired += assessment.rules.len();
            }
        }
        let per_message = started.elapsed() / (rounds * items.len()) as u32;
        println!("{name}, {} messages x {rounds}: {per_message:?} per message ({fired} hits)", items.len());
    }

    let max = haven_protocol::MAX_CONTENT_CHARS;
    let at_limit = |unit: &str| unit.repeat(max / unit.len()).chars().take(max).collect::<String>();
    let cases = [
        ("short, nothing fires", "Work was long today but I'm ok, just wanted to chat.".to_owned()),
        (
            "4000 chars, nothing fires",
            at_limit("I had a long day at work and my manager kept asking me things. "),
        ),
        ("4000 chars, a rule fires in every sentence", at_limit("I want to die. ")),
        ("4000 chars, every hit suppressed", at_limit("I don't want to kill myself. ")),
        ("4000 chars, near rules in every sentence", at_limit("kill myself tonight. ")),
        ("4000 chars, one long unknown word per 99 letters", at_limit(&format!("{} ", "q".repeat(99)))),
    ];
    // Each earlier message is read once, by the first window that needs
    // it, and kept: the times below are of windows whose messages were
    // read before, as in a chat.
    let long = ["I want to die.".repeat(300), "kill myself tonight. ".repeat(200), "x".repeat(4000)];
    let long: Vec<crate::Earlier> = long.into_iter().map(crate::Earlier::new).collect();
    let long: Vec<&crate::Earlier> = long.iter().collect();
    let short =
        ["hi, can we talk for a bit?", "work has been a lot this week", "my sister is visiting on sunday"];
    let short: Vec<crate::Earlier> =
        short.into_iter().map(|text| crate::Earlier::new(text.to_owned())).collect();
    let short: Vec<&crate::Earlier> = short.iter().collect();
    for (name, text) in &cases {
        let rounds = 100;
        for (how, run) in [
            ("rules alone", 0),
            ("rules and model", 1),
            ("rules and model, window of 3 short messages", 2),
            ("rules and model, window of 3 long messages", 3),
            ("rules and model, window of 3 long messages, each read for the first time", 4),
        ] {
            let mut times: Vec<std::time::Duration> = (0..rounds)
                .map(|_| {
                    let unread: Vec<crate::Earlier> =
                        long.iter().map(|message| crate::Earlier::new(message.text().to_owned())).collect();
                    let unread: Vec<&crate::Earlier> = unread.iter().collect();
                    let started = Instant::now();
                    let text = std::hint::black_box(text);
                    let _ = match run {
                        0 => detector.classify(text),
                        1 => classifier.classify(text),
                        2 => classifier.classify_in_context(&crate::Earlier::new(text.clone()), &short),
                        3 => classifier.classify_in_context(&crate::Earlier::new(text.clone()), &long),
                        _ => classifier.classify_in_context(&crate::Earlier::new(text.clone()), &unread),
                    };
                    started.elapsed()
                })
                .collect();
            times.sort();
            println!("{name}, {how}: median {:?}, worst {:?}", times[rounds / 2], times[rounds - 1]);
        }
    }
}

#[test]
fn hard_cases_found_in_review() {
    // The rules alone: the model's own false alarms are counted on the
    // unseen rounds (model_tests.rs).
    for (text, level) in [
        ("i have the pills in front of me and im going to take them all tonight", RiskLevel::Imminent),
        ("I've been cutting myself again", RiskLevel::High),
        ("this traffic is killing me", RiskLevel::None),
    ] {
        assert_eq!(classify(text).level, level, "the server's API tests rely on {text:?}");
    }
    let cases: [(&str, RiskLevel); 15] = [
        // The server's API tests rely on these three.
        ("i have the pills in front of me and im going to take them all tonight", RiskLevel::Imminent),
        ("I've been cutting myself again", RiskLevel::High),
        ("this traffic is killing me", RiskLevel::None),
        ("I can't promise I won't kill myself", RiskLevel::High),
        ("I don't know if I won't hurt myself tonight", RiskLevel::High),
        ("thinking about ssd upgrades for my laptop", RiskLevel::None),
        ("I took all the boxes to the car", RiskLevel::None),
        ("I took a whole box of chocolates to work", RiskLevel::None),
        ("I just took the whole bottle", RiskLevel::Imminent),
        ("I want to walk the bridge at sunset", RiskLevel::None),
        ("I'm going to step in front of a train", RiskLevel::Imminent),
        ("I really shot myself in the foot with that email", RiskLevel::None),
        ("this coffee is like drinking poison", RiskLevel::None),
        ("the shop was attacked last night", RiskLevel::None),
        ("I'm thinking about ending things with him", RiskLevel::None),
    ];
    let wrong: Vec<String> = cases
        .iter()
        .filter_map(|(text, level)| {
            let got = Detector::builtin().classify(text);
            (got.level != *level).then(|| format!("{text:?}: expected {}, got {:?}", level.as_str(), got))
        })
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
}
