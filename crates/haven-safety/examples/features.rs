//! The model's input features of each text, for `scripts/safety-model/train.py`:
//! the same code the server runs, so training and serving cannot disagree.
//!
//! Usage: `features ENCODER.safetensors < texts.jsonl > features.jsonl`. Each
//! input line is `{"text": "…"}`; each output line is
//! `{"dense": [...], "sparse": [[bucket, value], ...], "rules": "level"}`, the
//! last being the rules' verdict, against which the thresholds are chosen.

use std::io::{BufRead, BufWriter, Write};

use haven_safety::model::{Encoder, sparse_scale};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: features ENCODER.safetensors < texts.jsonl")?;
    let encoder = Encoder::from_bytes(&std::fs::read(path)?)?;
    let rules = haven_safety::Detector::builtin();
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut dense = vec![0.0f32; encoder.feature_count() - haven_safety::model::BUCKETS];
    for line in std::io::stdin().lock().lines() {
        let line: serde_json::Value = serde_json::from_str(&line?)?;
        let text = line["text"].as_str().ok_or("a line has no text")?;
        let mut buckets = std::collections::BTreeMap::<usize, u32>::new();
        let count = encoder.features(&haven_safety::normalise(text), &mut dense, |bucket| {
            *buckets.entry(bucket).or_default() += 1;
        });
        let scale = sparse_scale(count);
        let sparse: Vec<(usize, f32)> = buckets.into_iter().map(|(b, n)| (b, n as f32 * scale)).collect();
        serde_json::to_writer(
            &mut out,
            &serde_json::json!({ "dense": dense, "sparse": sparse, "rules": rules.classify(text).level }),
        )?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}
