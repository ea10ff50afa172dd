//! `summarize`: medians of several runs. Reads JSON result lines (as the
//! scenarios print them), groups them by scenario and label, and prints one
//! JSON line per group with the median of every number, the spread of the
//! headline figure, and whether the group is noisy.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args as ClapArgs;
use serde_json::{Map, Value, json};

use crate::net::Result;

/// A group is noisy when its headline figure varies by more than this
/// fraction of its median; a run is, when other processes took this many cores.
const NOISY_SPREAD: f64 = 0.15;
const NOISY_OTHER_CORES: f64 = 0.25;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Files of JSON result lines; lines that are not JSON objects are skipped.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// The figure that decides a scenario's spread.
fn headline(scenario: &str) -> &'static str {
    match scenario {
        "direct" => "delivered_per_s",
        "bot" => "replies_per_s",
        "idle" => "server_bytes_per_connection",
        "takeover" => "violations",
        _ => "",
    }
}

pub fn run(args: Args) -> Result<()> {
    let mut groups: BTreeMap<(String, String), Vec<Map<String, Value>>> = BTreeMap::new();
    for file in &args.files {
        let text = std::fs::read_to_string(file).map_err(|error| format!("{}: {error}", file.display()))?;
        for line in text.lines() {
            if let Ok(Value::Object(result)) = serde_json::from_str::<Value>(line) {
                let scenario = result.get("scenario").and_then(Value::as_str).unwrap_or("").to_owned();
                let label = result.get("label").and_then(Value::as_str).unwrap_or("").to_owned();
                groups.entry((scenario, label)).or_default().push(result);
            }
        }
    }
    for ((scenario, label), runs) in &groups {
        // A run is noisy when other processes took CPU during its window.
        let other_cores = |result: &Map<String, Value>| {
            result.get("cpu").and_then(|cpu| cpu.get("other_cores")).and_then(Value::as_f64).unwrap_or(0.0)
        };
        let quiet: Vec<&Map<String, Value>> =
            runs.iter().filter(|result| other_cores(result) <= NOISY_OTHER_CORES).collect();
        let all: Vec<&Map<String, Value>> = runs.iter().collect();
        // Medians over the quiet runs when there are any, else over all.
        let chosen = if quiet.is_empty() { &all } else { &quiet };
        let numbers = numbers_of(chosen);
        let medians: Map<String, Value> =
            numbers.iter().map(|(key, values)| (key.clone(), json!(median(values)))).collect();
        let key = headline(scenario);
        let spread = numbers.get(key).map(|values| {
            let (low, high) = values.iter().fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
            let middle = median(values);
            if middle.abs() > f64::EPSILON { (high - low) / middle.abs() } else { high - low }
        });
        let noisy = quiet.is_empty() || spread.is_some_and(|spread| spread > NOISY_SPREAD);
        let summary = json!({
            "scenario": scenario,
            "label": label,
            "runs": runs.len(),
            "quiet_runs": quiet.len(),
            "median_of": if quiet.is_empty() { "all runs" } else { "quiet runs" },
            "headline": key,
            "headline_all_runs": numbers_of(&all).get(key),
            "spread": spread,
            "noisy": noisy,
            "median": medians,
        });
        eprintln!(
            "{scenario:<9} {label:<44} runs {} (quiet {})  median {} = {}  spread {}{}",
            runs.len(),
            quiet.len(),
            key,
            medians.get(key).unwrap_or(&Value::Null),
            spread.map_or("-".to_owned(), |spread| format!("{:.0}%", spread * 100.0)),
            if noisy { "  NOISY" } else { "" }
        );
        println!("{summary}");
    }
    Ok(())
}

fn numbers_of(runs: &[&Map<String, Value>]) -> BTreeMap<String, Vec<f64>> {
    let mut numbers = BTreeMap::new();
    for result in runs {
        flatten("", &Value::Object((*result).clone()), &mut numbers);
    }
    numbers
}

/// Every number in `value`, keyed by its dotted path.
fn flatten(prefix: &str, value: &Value, into: &mut BTreeMap<String, Vec<f64>>) {
    match value {
        Value::Number(number) => {
            if let Some(number) = number.as_f64() {
                into.entry(prefix.to_owned()).or_default().push(number);
            }
        }
        Value::Bool(flag) => into.entry(prefix.to_owned()).or_default().push(f64::from(u8::from(*flag))),
        Value::Object(object) => {
            for (key, value) in object {
                let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                flatten(&path, value, into);
            }
        }
        _ => {}
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[middle],
        _ => (sorted[middle - 1] + sorted[middle]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
