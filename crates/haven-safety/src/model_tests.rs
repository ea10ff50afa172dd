//! The model file's contract, and the whole detector (rules and model) on
//! the unseen rounds of `data/unseen/`: messages written by people who
//! never saw the rules or the training data, scored once when written.
//!
//! `cargo test -p haven-safety -- --nocapture unseen` prints the figures,
//! with 95 % Wilson intervals. The guards below are the shipped detector's
//! figures, recorded in `docs/safety.md` beside the round's first score: a
//! change to the rules or the model may not make them worse.

use haven_protocol::RiskLevel;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::model::{BUILTIN_SHA256, Encoder, FORMAT, Hidden, Model, f32_tensor, hex, quantise};
use crate::{CONTEXT_RULE, Classifier, Earlier, classify};

const ROUND_1_CONVERSATIONS: &str = include_str!("../data/unseen/round-1-conversations.jsonl");
const ROUND_2: &str = include_str!("../data/unseen/round-2.jsonl");
const ROUND_2_CONVERSATIONS: &str = include_str!("../data/unseen/round-2-conversations.jsonl");
const ROUND_3: &str = include_str!("../data/unseen/round-3.jsonl");
const ROUND_3_CONVERSATIONS: &str = include_str!("../data/unseen/round-3-conversations.jsonl");
const ROUND_4: &str = include_str!("../data/unseen/round-4.jsonl");
const ROUND_4_CONVERSATIONS: &str = include_str!("../data/unseen/round-4-conversations.jsonl");
const ROUND_5: &str = include_str!("../data/unseen/round-5.jsonl");
const ROUND_5_CONVERSATIONS: &str = include_str!("../data/unseen/round-5-conversations.jsonl");
const ROUND_6: &str = include_str!("../data/unseen/round-6.jsonl");
const ROUND_6_CONVERSATIONS: &str = include_str!("../data/unseen/round-6-conversations.jsonl");
const ROUND_7: &str = include_str!("../data/unseen/round-7.jsonl");
const ROUND_7_CONVERSATIONS: &str = include_str!("../data/unseen/round-7-conversations.jsonl");
const ROUND_8: &str = include_str!("../data/unseen/round-8.jsonl");
const ROUND_8_CONVERSATIONS: &str = include_str!("../data/unseen/round-8-conversations.jsonl");
const ROUND_9: &str = include_str!("../data/unseen/round-9.jsonl");
const ROUND_9_CONVERSATIONS: &str = include_str!("../data/unseen/round-9-conversations.jsonl");
const ROUND_10: &str = include_str!("../data/unseen/round-10.jsonl");
const ROUND_10_CONVERSATIONS: &str = include_str!("../data/unseen/round-10-conversations.jsonl");
const ROUND_11: &str = include_str!("../data/unseen/round-11.jsonl");
const ROUND_11_CONVERSATIONS: &str = include_str!("../data/unseen/round-11-conversations.jsonl");
const ROUND_12: &str = include_str!("../data/unseen/round-12.jsonl");
const ROUND_12_CONVERSATIONS: &str = include_str!("../data/unseen/round-12-conversations.jsonl");
const ROUND_13: &str = include_str!("../data/unseen/round-13.jsonl");
const ROUND_13_CONVERSATIONS: &str = include_str!("../data/unseen/round-13-conversations.jsonl");
const ROUND_14: &str = include_str!("../data/unseen/round-14.jsonl");
const ROUND_14_CONVERSATIONS: &str = include_str!("../data/unseen/round-14-conversations.jsonl");
const BUILTIN: &[u8] = include_bytes!("../model/crisis-model.safetensors");

/// Round 2 with the detector it was first scored with (rules 2026.12.1,
/// model 2026.12.3), scored once: items detected at a sufficient level, and
/// false alarms. Round 2 now trains the model, so this is only a floor.
const ROUND_2_HIGH_DETECTED: usize = 228;
const ROUND_2_CONCERN_DETECTED: usize = 101;
const ROUND_2_FALSE_ALARMS: usize = 9;
/// Both rounds' conversations together (their single messages now train
/// the model; their conversations do not): 25 + 27 with model 2026.12.3.
/// Model 2026.12.4 gives 30 + 25, so the floor is on the sum.
const CONVERSATIONS_SUFFICIENT: usize = 52;

/// Round 3 with the detector it was first scored with (rules 2026.12.1,
/// model 2026.12.4), scored once. Round 3 now trains the model, so this is
/// only a floor.
const ROUND_3_HIGH_DETECTED: usize = 243;
const ROUND_3_CONCERN_DETECTED: usize = 97;
const ROUND_3_FALSE_ALARMS: usize = 10;
const ROUND_3_CONVERSATIONS_SUFFICIENT: usize = 37;

/// Round 4 with the detector it was first scored with (rules 2026.12.1,
/// model 2026.12.5), scored once. Round 4 now trains the model, so this is
/// only a floor; and on the detections of both levels together: model
/// 2026.12.7 detects one `concern` item fewer (122), and 22 serious items
/// more with no false alarm.
const ROUND_4_HIGH_DETECTED: usize = 257;
const ROUND_4_CONCERN_DETECTED: usize = 123;
const ROUND_4_FALSE_ALARMS: usize = 16;
const ROUND_4_CONVERSATIONS_SUFFICIENT: usize = 39;

/// Round 5 with the detector it was first scored with (rules 2026.12.2,
/// model 2026.12.6), scored once. Round 5 now trains the model, so this is
/// only a floor.
const ROUND_5_HIGH_DETECTED: usize = 260;
const ROUND_5_CONCERN_DETECTED: usize = 115;
const ROUND_5_FALSE_ALARMS: usize = 15;
const ROUND_5_CONVERSATIONS_SUFFICIENT: usize = 36;

/// Round 6 with the detector it was first scored with (rules 2026.12.2,
/// model 2026.12.8), scored once. Round 6 now trains the model, so this is
/// only a floor.
const ROUND_6_HIGH_DETECTED: usize = 257;
const ROUND_6_CONCERN_DETECTED: usize = 127;
const ROUND_6_FALSE_ALARMS: usize = 12;
const ROUND_6_CONVERSATIONS_SUFFICIENT: usize = 34;

/// Round 7 with the detector it was first scored with (rules 2026.12.2,
/// model 2026.12.9), scored once. Round 7 now trains the model, so this is
/// only a floor.
const ROUND_7_HIGH_DETECTED: usize = 258;
const ROUND_7_CONCERN_DETECTED: usize = 131;
const ROUND_7_FALSE_ALARMS: usize = 13;
const ROUND_7_CONVERSATIONS_SUFFICIENT: usize = 29;

/// Round 8 with the detector it was first scored with (rules 2026.12.3,
/// model 2026.12.10), scored once. Round 8 now trains the model, so this is
/// only a floor.
const ROUND_8_HIGH_DETECTED: usize = 270;
const ROUND_8_CONCERN_DETECTED: usize = 133;
const ROUND_8_FALSE_ALARMS: usize = 15;
/// 43 at first; 42 since model 2026.12.12, whose training learned that a
/// short thank-you is no farewell and so no longer flags a farewell that
/// gave its possessions away in the earlier messages and thanked in the
/// last (docs/safety.md).
const ROUND_8_CONVERSATIONS_SUFFICIENT: usize = 42;

/// Round 9 with the detector it was first scored with (rules 2026.12.4,
/// model 2026.12.10), scored once. Round 9 now trains the model, so this is
/// only a floor.
const ROUND_9_HIGH_DETECTED: usize = 262;
const ROUND_9_CONCERN_DETECTED: usize = 129;
const ROUND_9_FALSE_ALARMS: usize = 10;
const ROUND_9_CONVERSATIONS_SUFFICIENT: usize = 35;

/// Round 10 with the detector it was first scored with (rules 2026.12.5,
/// model 2026.12.12), scored once; training data since model 2026.12.14.
const ROUND_10_HIGH_DETECTED: usize = 273;
const ROUND_10_CONCERN_DETECTED: usize = 132;
const ROUND_10_FALSE_ALARMS: usize = 18;
/// 38 at first; 37 since model 2026.12.14, which scores 10 more of the
/// conversations of rounds 1 to 11 together than 2026.12.12 (docs/safety.md).
const ROUND_10_CONVERSATIONS_SUFFICIENT: usize = 37;

/// Round 11 with the detector it was first scored with (rules 2026.12.6,
/// model 2026.12.12), scored once; training data since model 2026.12.14.
const ROUND_11_HIGH_DETECTED: usize = 269;
const ROUND_11_CONCERN_DETECTED: usize = 135;
const ROUND_11_FALSE_ALARMS: usize = 12;
const ROUND_11_CONVERSATIONS_SUFFICIENT: usize = 30;

/// Round 12 with the shipped detector (rules 2026.12.6, model
/// 2026.12.15). Its first score, once, was with model 2026.12.13, never
/// shipped: 271, 135 and 17 false alarms, 39 conversations; model
/// 2026.12.14 gave 270, 134, 16 and 38 (docs/safety.md).
const ROUND_12_HIGH_DETECTED: usize = 270;
const ROUND_12_CONCERN_DETECTED: usize = 135;
const ROUND_12_FALSE_ALARMS: usize = 15;
const ROUND_12_CONVERSATIONS_SUFFICIENT: usize = 37;

/// Round 13 with the shipped detector (rules 2026.12.6, model
/// 2026.12.15). Its first score, once, was with model 2026.12.14: 271, 137
/// and 11 false alarms, 36 conversations (docs/safety.md).
const ROUND_13_HIGH_DETECTED: usize = 269;
const ROUND_13_CONCERN_DETECTED: usize = 136;
const ROUND_13_FALSE_ALARMS: usize = 11;
const ROUND_13_CONVERSATIONS_SUFFICIENT: usize = 37;

/// Round 14 with the detector it was first scored with, the shipped one
/// (rules 2026.12.6, model 2026.12.15), scored once.
const ROUND_14_HIGH_DETECTED: usize = 270;
const ROUND_14_CONCERN_DETECTED: usize = 138;
const ROUND_14_FALSE_ALARMS: usize = 13;
const ROUND_14_CONVERSATIONS_SUFFICIENT: usize = 36;

#[derive(Deserialize)]
struct Unseen {
    text: String,
    level: RiskLevel,
    #[serde(default)]
    lang: String,
    #[serde(default)]
    context: Vec<String>,
}

fn parse(source: &str) -> Vec<Unseen> {
    source
        .lines()
        .filter(|line| !line.trim().is_empty())
        .enumerate()
        .map(|(number, line)| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("line {}: {e}", number + 1))
        })
        .collect()
}

/// The 95 % Wilson score interval of `k` out of `n`, in percent.
fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 100.0);
    }
    let (k, n, z) = (k as f64, n as f64, 1.96f64);
    let p = k / n;
    let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / (1.0 + z * z / n);
    (100.0 * (centre - half).max(0.0), 100.0 * (centre + half).min(1.0))
}

fn rate(label: &str, k: usize, n: usize) -> String {
    let (low, high) = wilson(k, n);
    let percent = if n == 0 { 0.0 } else { 100.0 * k as f64 / n as f64 };
    format!("{label}: {k} / {n} = {percent:.1} % (95 % CI {low:.1}–{high:.1})")
}

/// Counts of one set: high+imminent detected at high or above, concern at
/// concern or above, none detected above none.
#[derive(Default, Debug)]
struct Counts {
    high: (usize, usize),
    concern: (usize, usize),
    none: (usize, usize),
}

impl Counts {
    fn add(&mut self, expected: RiskLevel, got: RiskLevel) {
        let (hit, total) = match expected {
            RiskLevel::High | RiskLevel::Imminent => (got >= RiskLevel::High, &mut self.high),
            RiskLevel::Concern => (got >= RiskLevel::Concern, &mut self.concern),
            RiskLevel::None => (got > RiskLevel::None, &mut self.none),
        };
        total.0 += usize::from(hit);
        total.1 += 1;
    }

    fn report(&self, name: &str) -> String {
        format!(
            "{name}\n  {}\n  {}\n  {}",
            rate("recall high+imminent", self.high.0, self.high.1),
            rate("recall concern", self.concern.0, self.concern.1),
            rate("false alarms on none", self.none.0, self.none.1),
        )
    }
}

/// Scores a round of single messages with the shipped detector, prints
/// its figures (rules and model, each alone, and by language) and returns
/// the counts of rules and model together.
fn score(name: &str, source: &str) -> Counts {
    let classifier = Classifier::builtin();
    let rules = crate::Detector::builtin();
    let items = parse(source);
    assert_eq!(items.len(), 700);
    let (mut both, mut rules_only, mut model_only) =
        (Counts::default(), Counts::default(), Counts::default());
    let mut by_language = std::collections::BTreeMap::<&str, Counts>::new();
    for item in &items {
        let assessment = classifier.classify(&item.text);
        both.add(item.level, assessment.level);
        rules_only.add(item.level, rules.classify(&item.text).level);
        model_only.add(item.level, assessment.model.as_ref().map_or(RiskLevel::None, |m| m.level));
        by_language.entry(item.lang.as_str()).or_default().add(item.level, assessment.level);
    }
    println!("{}", both.report(&format!("{name}, rules and model")));
    println!("{}", rules_only.report(&format!("{name}, rules alone")));
    println!("{}", model_only.report(&format!("{name}, model alone")));
    for (language, counts) in &by_language {
        println!("{}", counts.report(&format!("{name}, rules and model, {language}")));
    }
    both
}

/// At least `high` serious and `concern` concern items detected, and at
/// most `false_alarms`.
fn holds(both: &Counts, high: usize, concern: usize, false_alarms: usize) {
    assert!(both.high.0 >= high, "{both:?}");
    assert!(both.concern.0 >= concern, "{both:?}");
    assert!(both.none.0 <= false_alarms, "{both:?}");
}

#[test]
fn unseen_round_2_does_not_fall_below_its_first_score() {
    let both = score("round 2 (now training data)", ROUND_2);
    holds(&both, ROUND_2_HIGH_DETECTED, ROUND_2_CONCERN_DETECTED, ROUND_2_FALSE_ALARMS);
}

#[test]
fn unseen_round_3_does_not_fall_below_its_first_score() {
    let both = score("round 3 (now training data)", ROUND_3);
    holds(&both, ROUND_3_HIGH_DETECTED, ROUND_3_CONCERN_DETECTED, ROUND_3_FALSE_ALARMS);
}

#[test]
fn unseen_round_4_does_not_fall_below_its_first_score() {
    let both = score("round 4 (now training data)", ROUND_4);
    assert!(both.high.0 >= ROUND_4_HIGH_DETECTED, "{both:?}");
    assert!(both.high.0 + both.concern.0 >= ROUND_4_HIGH_DETECTED + ROUND_4_CONCERN_DETECTED, "{both:?}");
    assert!(both.none.0 <= ROUND_4_FALSE_ALARMS, "{both:?}");
}

#[test]
fn unseen_round_5_does_not_fall_below_its_first_score() {
    let both = score("round 5 (now training data)", ROUND_5);
    holds(&both, ROUND_5_HIGH_DETECTED, ROUND_5_CONCERN_DETECTED, ROUND_5_FALSE_ALARMS);
}

#[test]
fn unseen_round_6_does_not_fall_below_its_first_score() {
    let both = score("round 6 (now training data)", ROUND_6);
    holds(&both, ROUND_6_HIGH_DETECTED, ROUND_6_CONCERN_DETECTED, ROUND_6_FALSE_ALARMS);
}

#[test]
fn unseen_round_7_does_not_fall_below_its_first_score() {
    let both = score("round 7 (now training data)", ROUND_7);
    holds(&both, ROUND_7_HIGH_DETECTED, ROUND_7_CONCERN_DETECTED, ROUND_7_FALSE_ALARMS);
}

#[test]
fn unseen_round_8_does_not_fall_below_its_first_score() {
    let both = score("round 8 (now training data)", ROUND_8);
    holds(&both, ROUND_8_HIGH_DETECTED, ROUND_8_CONCERN_DETECTED, ROUND_8_FALSE_ALARMS);
}

#[test]
fn unseen_round_9_does_not_fall_below_its_first_score() {
    let both = score("round 9 (now training data)", ROUND_9);
    holds(&both, ROUND_9_HIGH_DETECTED, ROUND_9_CONCERN_DETECTED, ROUND_9_FALSE_ALARMS);
}

#[test]
fn unseen_round_11_does_not_fall_below_its_first_score() {
    let both = score("round 11 (now training data)", ROUND_11);
    holds(&both, ROUND_11_HIGH_DETECTED, ROUND_11_CONCERN_DETECTED, ROUND_11_FALSE_ALARMS);
}

#[test]
fn unseen_round_12_does_not_fall_below_the_shipped_models_score() {
    let both = score("unseen round 12", ROUND_12);
    holds(&both, ROUND_12_HIGH_DETECTED, ROUND_12_CONCERN_DETECTED, ROUND_12_FALSE_ALARMS);
}

#[test]
fn unseen_round_13_does_not_fall_below_the_shipped_models_score() {
    let both = score("unseen round 13", ROUND_13);
    holds(&both, ROUND_13_HIGH_DETECTED, ROUND_13_CONCERN_DETECTED, ROUND_13_FALSE_ALARMS);
}

#[test]
fn unseen_round_14_does_not_fall_below_its_first_score() {
    let both = score("unseen round 14", ROUND_14);
    holds(&both, ROUND_14_HIGH_DETECTED, ROUND_14_CONCERN_DETECTED, ROUND_14_FALSE_ALARMS);
}

#[test]
fn unseen_round_10_does_not_fall_below_its_first_score() {
    let both = score("round 10 (now training data)", ROUND_10);
    holds(&both, ROUND_10_HIGH_DETECTED, ROUND_10_CONCERN_DETECTED, ROUND_10_FALSE_ALARMS);
}

/// The conversations of a round: the last message read with the earlier
/// ones, and alone; returns how many the window scores at a sufficient level.
fn conversations(name: &str, source: &str) -> usize {
    let classifier = Classifier::builtin();
    let items = parse(source);
    assert_eq!(items.len(), 50);
    let (mut with_window, mut alone) = (Counts::default(), Counts::default());
    let mut sufficient = 0;
    for item in &items {
        let earlier: Vec<Earlier> = item.context.iter().cloned().map(Earlier::new).collect();
        let got = classifier
            .classify_in_context(&Earlier::new(item.text.clone()), &earlier.iter().collect::<Vec<_>>())
            .level;
        with_window.add(item.level, got);
        alone.add(item.level, classifier.classify(&item.text).level);
        sufficient += usize::from(match item.level {
            RiskLevel::None => got == RiskLevel::None,
            RiskLevel::Concern => got >= RiskLevel::Concern,
            _ => got >= RiskLevel::High,
        });
    }
    println!("{}", with_window.report(&format!("{name} conversations, with the window")));
    println!("{}", alone.report(&format!("{name} conversations, the last message alone")));
    sufficient
}

#[test]
fn unseen_conversations_are_read_with_their_window() {
    let round_1 = conversations("unseen round 1", ROUND_1_CONVERSATIONS);
    let round_2 = conversations("unseen round 2", ROUND_2_CONVERSATIONS);
    let round_3 = conversations("unseen round 3", ROUND_3_CONVERSATIONS);
    let round_4 = conversations("unseen round 4", ROUND_4_CONVERSATIONS);
    let round_5 = conversations("unseen round 5", ROUND_5_CONVERSATIONS);
    let round_6 = conversations("unseen round 6", ROUND_6_CONVERSATIONS);
    let round_7 = conversations("unseen round 7", ROUND_7_CONVERSATIONS);
    let round_8 = conversations("unseen round 8", ROUND_8_CONVERSATIONS);
    let round_9 = conversations("unseen round 9", ROUND_9_CONVERSATIONS);
    let round_10 = conversations("unseen round 10", ROUND_10_CONVERSATIONS);
    let round_11 = conversations("unseen round 11", ROUND_11_CONVERSATIONS);
    let round_12 = conversations("unseen round 12", ROUND_12_CONVERSATIONS);
    let round_13 = conversations("unseen round 13", ROUND_13_CONVERSATIONS);
    let round_14 = conversations("unseen round 14", ROUND_14_CONVERSATIONS);
    println!(
        "sufficient: round 1 {round_1} / 50, round 2 {round_2} / 50, round 3 {round_3} / 50, round 4 {round_4} / 50, round 5 {round_5} / 50, round 6 {round_6} / 50, round 7 {round_7} / 50, round 8 {round_8} / 50, round 9 {round_9} / 50, round 10 {round_10} / 50, round 11 {round_11} / 50, round 12 {round_12} / 50, round 13 {round_13} / 50, round 14 {round_14} / 50"
    );
    assert!(
        round_1 + round_2 >= CONVERSATIONS_SUFFICIENT,
        "round 1: {round_1}, round 2: {round_2} sufficient"
    );
    assert!(round_3 >= ROUND_3_CONVERSATIONS_SUFFICIENT, "round 3: {round_3} sufficient");
    assert!(round_4 >= ROUND_4_CONVERSATIONS_SUFFICIENT, "round 4: {round_4} sufficient");
    assert!(round_5 >= ROUND_5_CONVERSATIONS_SUFFICIENT, "round 5: {round_5} sufficient");
    assert!(round_6 >= ROUND_6_CONVERSATIONS_SUFFICIENT, "round 6: {round_6} sufficient");
    assert!(round_7 >= ROUND_7_CONVERSATIONS_SUFFICIENT, "round 7: {round_7} sufficient");
    assert!(round_8 >= ROUND_8_CONVERSATIONS_SUFFICIENT, "round 8: {round_8} sufficient");
    assert!(round_9 >= ROUND_9_CONVERSATIONS_SUFFICIENT, "round 9: {round_9} sufficient");
    assert!(round_10 >= ROUND_10_CONVERSATIONS_SUFFICIENT, "round 10: {round_10} sufficient");
    assert!(round_11 >= ROUND_11_CONVERSATIONS_SUFFICIENT, "round 11: {round_11} sufficient");
    assert!(round_12 >= ROUND_12_CONVERSATIONS_SUFFICIENT, "round 12: {round_12} sufficient");
    assert!(round_13 >= ROUND_13_CONVERSATIONS_SUFFICIENT, "round 13: {round_13} sufficient");
    assert!(round_14 >= ROUND_14_CONVERSATIONS_SUFFICIENT, "round 14: {round_14} sufficient");
}

#[test]
fn the_shipped_model_is_the_recorded_one() {
    assert_eq!(hex(&Sha256::digest(BUILTIN)), BUILTIN_SHA256, "retrain with scripts/safety-model/train.sh");
    let model = Model::builtin().expect("the built-in model loads");
    assert_eq!(model.version(), "2026.12.15");
    assert_eq!(Classifier::builtin().version(), format!("{}+model.2026.12.15", crate::VERSION));
}

/// A copy of the shipped file with its header rewritten by `edit`.
fn with_header(edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let length = u64::from_le_bytes(BUILTIN[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&BUILTIN[8..8 + length]).unwrap();
    edit(&mut header);
    let mut text = serde_json::to_vec(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend_from_slice(&BUILTIN[8 + length..]);
    out
}

/// The hidden layer as it runs (silent units left out, see `Hidden`) adds
/// the same floats, bit for bit, as every unit of the shipped file
/// computed from its own weights, on every unseen message and
/// conversation, alone or two in one pass; and its integer sums stay close to the float32 products
/// of the weights they stand for.
#[test]
fn the_hidden_layer_as_it_runs_adds_exactly_what_the_whole_file_adds() {
    let file = safetensors::SafeTensors::deserialize(BUILTIN).expect("the shipped file parses");
    let units = file.tensor("hidden_bias").unwrap().shape()[0];
    let bias = f32_tensor(&file, "hidden_bias", &[units]).unwrap();
    let scale = f32_tensor(&file, "hidden_scale", &[units]).unwrap();
    let encoder = Encoder::from_bytes(BUILTIN).unwrap();
    let dense = encoder.feature_count() - crate::model::BUCKETS;
    let weight: Vec<i8> = file.tensor("hidden_weight").unwrap().data().iter().map(|&b| b as i8).collect();
    assert_eq!(weight.len(), units * dense);
    let output = f32_tensor(&file, "hidden_output", &[3, units]).unwrap();
    let hidden = Hidden::new(dense, &weight, &scale, &bias, &output);
    assert!(
        hidden.units.len() < units,
        "the shipped model has units that add nothing, and they are left out"
    );

    let mut texts: Vec<String> = Vec::new();
    for round in [ROUND_2, ROUND_3, ROUND_4, ROUND_5] {
        texts.extend(parse(round).into_iter().map(|item| item.text));
    }
    for round in [
        ROUND_1_CONVERSATIONS,
        ROUND_2_CONVERSATIONS,
        ROUND_3_CONVERSATIONS,
        ROUND_4_CONVERSATIONS,
        ROUND_5_CONVERSATIONS,
    ] {
        texts.extend(parse(round).into_iter().map(|item| item.context.join("\n") + "\n" + &item.text));
    }
    let mut features = vec![0.0f32; dense];
    let (mut checked, mut largest_error) = (0, 0.0f32);
    let mut previous: Option<(Vec<f32>, [f32; 3])> = None;
    for text in &texts {
        encoder.features(&crate::normalise(text), &mut features, |_| {});
        let start = [0.25f32, -1.5, 2.0];
        let mut running = start;
        hidden.add_to(&features, &mut running);
        let (input, step) = quantise(&features);
        let mut whole = start;
        for (unit, row) in weight.chunks_exact(dense).enumerate() {
            let sum: i32 = row.iter().zip(&input).map(|(&w, &x)| i32::from(w) * i32::from(x)).sum();
            let activation = (bias[unit] + (scale[unit] * step) * sum as f32).max(0.0);
            if activation > 0.0 {
                for (class, logit) in whole.iter_mut().enumerate() {
                    *logit += output[class * units + unit] * activation;
                }
            }
            let float: f32 = row.iter().zip(&features).map(|(&w, &x)| f32::from(w) * scale[unit] * x).sum();
            largest_error = largest_error.max((float - (scale[unit] * step) * sum as f32).abs());
        }
        assert_eq!(running.map(f32::to_bits), whole.map(f32::to_bits), "{text:?}");
        checked += usize::from(whole != start);
        // Two texts in one pass (a message and its conversation) get what
        // each gets alone.
        if let Some((previous_features, previous_whole)) = &previous {
            let (mut first, mut second) = (start, start);
            hidden.add_to_each([(&previous_features[..], &mut first), (&features[..], &mut second)]);
            assert_eq!(first.map(f32::to_bits), previous_whole.map(f32::to_bits), "{text:?}");
            assert_eq!(second.map(f32::to_bits), whole.map(f32::to_bits), "{text:?}");
        }
        previous = Some((features.clone(), whole));
    }
    assert!(checked > texts.len() / 2, "the layer moved the logits of only {checked} texts");
    assert!(largest_error < 1e-2, "a unit's sum is {largest_error} off its float32 value");
}

/// The benchmark's filler sentence, repeated in a window, once read as
/// `high` with a 7 % probability of `concern` or above: no row may now
/// exceed the one below it.
#[test]
fn a_row_above_never_exceeds_the_one_below() {
    let classifier = Classifier::builtin();
    let filler: String = "steady breathing helps ".chars().cycle().take(100).collect();
    let earlier: Vec<Earlier> = (0..3).map(|_| Earlier::new(filler.clone())).collect();
    let earlier: Vec<&Earlier> = earlier.iter().collect();
    assert_eq!(
        classifier.classify_in_context(&Earlier::new(filler.clone()), &earlier).level,
        RiskLevel::None
    );
    let model = Model::builtin().unwrap();
    let mut texts: Vec<String> = vec![[filler.as_str(); 4].join("\n")];
    texts.extend(parse(ROUND_5).into_iter().map(|item| item.text));
    for text in &texts {
        let [concern, high, imminent] = model.probabilities(&[&model.read(&crate::normalise(text))]);
        assert!(high <= concern && imminent <= high, "{text:?}: {concern} {high} {imminent}");
    }
}

#[test]
fn features_are_quantised_to_the_nearest_step_ties_to_even() {
    let (input, step) = quantise(&[0.5, -1.0, 0.25, 1.5 / 8191.0, 2.5 / 8191.0, -0.5 / 8191.0, 0.0]);
    assert_eq!(step, 1.0 / 8191.0);
    assert_eq!(input, [4096, -8191, 2048, 2, 2, 0, 0]);
    assert_eq!(quantise(&[0.0; 4]), (vec![0; 4], 0.0));
}

#[test]
fn a_corrupt_or_mismatched_model_is_refused_with_the_reason() {
    let refused = |bytes: &[u8]| Model::from_bytes(bytes).expect_err("must be refused").to_string();
    // The header re-encoded unchanged still loads: the edits below are the cause.
    assert!(Model::from_bytes(&with_header(|_| {})).is_ok());

    let mut flipped = BUILTIN.to_vec();
    let last = flipped.len() - 5;
    flipped[last] ^= 0x40;
    assert!(refused(&flipped).contains("corrupt"));
    assert!(refused(&BUILTIN[..BUILTIN.len() / 2]).contains("not a safetensors file"));
    assert!(refused(b"definitely not a model").contains("not a safetensors file"));
    let format = with_header(|h| h["__metadata__"]["format"] = "haven-crisis-model/0".into());
    assert!(refused(&format).contains(FORMAT));
    let thresholds =
        with_header(|h| h["__metadata__"]["thresholds"] = r#"{"concern":0,"high":2,"imminent":0.5}"#.into());
    assert!(refused(&thresholds).contains("thresholds"));
    let no_vocab = with_header(|h| {
        h["__metadata__"].as_object_mut().unwrap().remove("vocab");
    });
    assert!(refused(&no_vocab).contains("vocab"));
    let path = std::env::temp_dir().join(format!("haven-missing-model-{}", std::process::id()));
    assert!(Model::load(&path).unwrap_err().to_string().contains("cannot read"));
}

#[test]
fn the_verdict_carries_the_model_and_the_higher_level() {
    let json = serde_json::to_value(classify("i want to kill myself")).unwrap();
    assert_eq!(json["model"]["version"], "2026.12.15");
    let score = json["model"]["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score), "{json}");
    let mut keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["level", "model", "rules", "version"]);
    let pills = classify("i want to take all my pills");
    assert!(pills.rules.is_empty() && pills.rule_ids() == [crate::MODEL_RULE], "{pills:?}");
    let calm = classify("thanks, the walk helped and i slept well");
    assert_eq!(calm.level, RiskLevel::None, "{calm:?}");
}

#[test]
fn the_two_bugs_of_issue_17_are_gone() {
    assert!(classify("i want to take all my pills").level >= RiskLevel::High);
    assert!(classify("im going to take all my pills").level >= RiskLevel::High);
    let past = classify("used to want to kill myself but not anymore, today was good");
    assert!(past.level < RiskLevel::High, "{past:?}");
}

#[test]
fn telling_of_messages_is_not_risk() {
    // Model 2026.12.12 read "i sent her a message" as `high` and a list of
    // numbered messages as `imminent`: its training data said "message"
    // mostly in farewells. A farewell still is one. (Model 2026.12.13 also
    // learned time words and goodbyes as everyday, and lost conversations
    // where "tonight" or "after dinner" follows a plan; never shipped.)
    for everyday in [
        "she messaged me about lunch on friday",
        "did my message go through?",
        "message 0 message 1 message 2 message 3",
        "i'll send him a message after work",
        "texting my brother now, brb",
    ] {
        let assessment = classify(everyday);
        assert_eq!(assessment.level, RiskLevel::None, "{everyday}: {assessment:?}");
    }
    let farewell = classify("this is the last message anyone gets from me");
    assert_eq!(farewell.level, RiskLevel::Imminent, "{farewell:?}");
}

#[test]
fn words_that_are_nothing_alone_are_not_made_risk_by_their_order() {
    // Model 2026.12.9 reads "one / two / three" together as `high`; none of
    // it, alone or before the last word, says anything.
    let classifier = Classifier::builtin();
    let (one, two) = (Earlier::new("one".to_owned()), Earlier::new("two".to_owned()));
    let counted = classifier.classify_in_context(&Earlier::new("three".to_owned()), &[&one, &two]);
    assert_eq!(counted.level, RiskLevel::None, "{counted:?}");
}

#[test]
fn a_time_after_earlier_ideation_escalates_and_a_calm_reply_does_not() {
    let classifier = Classifier::builtin();
    let earlier = Earlier::new("i keep thinking i want to kill myself".to_owned());
    let earlier = [&earlier];
    let when = "after everyone is asleep";
    // Alone, the model reads it as `concern` at most; the window
    // makes it imminent.
    assert!(classifier.classify(when).level < RiskLevel::High);
    let tonight = classifier.classify_in_context(&Earlier::new(when.to_owned()), &earlier);
    assert_eq!(tonight.level, RiskLevel::Imminent, "{tonight:?}");
    assert_eq!(tonight.rules[0].id, CONTEXT_RULE);
    let calm =
        classifier.classify_in_context(&Earlier::new("ok thank you for listening".to_owned()), &earlier);
    assert_eq!(calm.level, RiskLevel::None, "{calm:?}");
    assert!(calm.rules.is_empty());
}

/// What screening a message reads of it is kept for the windows after it,
/// and gives the verdicts a fresh reading gives; a message longer than a
/// window keeps is not kept whole.
#[test]
fn a_screened_message_is_read_once_and_judged_the_same_later() {
    let classifier = Classifier::builtin();
    let rounds = [ROUND_11_CONVERSATIONS, ROUND_12_CONVERSATIONS, ROUND_13_CONVERSATIONS];
    let items: Vec<Unseen> = rounds.into_iter().flat_map(parse).collect();
    let mut raised = 0;
    for item in &items {
        let (last, before) = item.context.split_last().expect("a conversation has earlier messages");
        let before: Vec<Earlier> = before.iter().cloned().map(Earlier::new).collect();
        let before: Vec<&Earlier> = before.iter().collect();
        let screened = Earlier::new(last.clone());
        let first = classifier.classify_in_context(&screened, &before);
        assert_eq!(screened.kept.get().is_some(), last.len() <= crate::WINDOW_BYTES, "{last:?}");
        assert_eq!(first, classifier.classify_in_context(&Earlier::new(last.clone()), &before));
        let mut with_read = before.clone();
        with_read.push(&screened);
        let fresh = Earlier::new(last.clone());
        let mut with_fresh = before.clone();
        with_fresh.push(&fresh);
        let message = Earlier::new(item.text.clone());
        let got = classifier.classify_in_context(&message, &with_read);
        assert_eq!(got, classifier.classify_in_context(&Earlier::new(item.text.clone()), &with_fresh));
        raised += usize::from(got.rules.first().is_some_and(|hit| hit.id == CONTEXT_RULE));
    }
    assert!(raised > 0, "no conversation of the rounds was raised by its window");
    let long = Earlier::new("i keep thinking about it. ".repeat(60));
    let _ = classifier.classify_in_context(&long, &[]);
    assert!(long.kept.get().is_none());
}
