//! The learned half of the detector: a small classifier that generalises
//! beyond the rules' wording.
//!
//! A message (in [`normalise`](crate::normalise)d form) becomes two kinds
//! of features:
//!
//! - **dense**: the mean and the maximum, per dimension, of its WordPiece
//!   tokens' static vectors. The vectors were distilled from the sentence
//!   encoder all-MiniLM-L6-v2 (`scripts/safety-model/distill.py`), so words
//!   the training data never used still land near words of like meaning;
//! - **sparse**: hashed word unigrams and bigrams and character 3–5-grams
//!   of each word, which carry typos, slang and other languages.
//!
//! An ordinal head gives three probabilities: that the text is at
//! `concern` or above, at `high` or above, and `imminent`. Each row's logit
//! is a linear function of all the features plus a small hidden layer
//! (rectified) over the dense ones, which lets the head combine meanings
//! that no single weight carries; the file's thresholds turn the
//! probabilities into a level (`Model::assess_readings`). The file is
//! safetensors: the int8 token vectors with a scale per token, the head
//! (the hidden layer's input weights int8 with a scale per unit), and
//! metadata (format, version, vocabulary, thresholds, a SHA-256 of
//! every tensor). A file that does not
//! match in any of these is refused with a [`ModelError`], never used.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use haven_protocol::RiskLevel;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The format this code reads, recorded in every model file.
pub const FORMAT: &str = "haven-crisis-model/4";

/// Hash buckets of the sparse features (part of the format).
pub const BUCKETS: usize = 1 << 17;

/// The head's rows: `concern` or above, `high` or above, `imminent`.
const ROWS: usize = 3;

/// The tensors of a model file, in the order of its `data_sha256`.
const TENSORS: [&str; 8] = [
    "token_vectors",
    "token_scales",
    "head_weight",
    "head_bias",
    "hidden_weight",
    "hidden_scale",
    "hidden_bias",
    "hidden_output",
];

/// The most hidden units a file may have (a bound on the work per message).
const MAX_HIDDEN: usize = 4096;

/// The weight of the sparse features against the dense ones (part of the
/// format): `SPARSE_WEIGHT / sqrt(max(count, SPARSE_FLOOR))` per occurrence.
const SPARSE_WEIGHT: f32 = 10.0;

/// The shipped model, trained by `scripts/safety-model/train.sh`.
const BUILTIN: &[u8] = include_bytes!("../model/crisis-model.safetensors");

/// The shipped model's SHA-256, as printed by the training script; a test
/// checks the file against it.
pub const BUILTIN_SHA256: &str = "b4962c14373577e1f897896c4c58f544279c9f24d67b66f300125d126ea64c90";

/// A model file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelError(pub String);

impl std::fmt::Display for ModelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "crisis model: {}", self.0)
    }
}

impl std::error::Error for ModelError {}

fn error(message: impl Into<String>) -> ModelError {
    ModelError(message.into())
}

/// What the model says of one text: `{"version", "level", "score"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModelVerdict {
    /// The model file's version.
    pub version: String,
    /// The level the model's thresholds give (`none` under three words).
    pub level: RiskLevel,
    /// The model's probability that the text is at `concern` or above,
    /// rounded to four places.
    pub score: f32,
}

/// Probability thresholds: the highest level whose probability of "this
/// level or above" reaches its threshold is the model's level (`imminent`
/// needs the `high` threshold too).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub concern: f32,
    pub high: f32,
    pub imminent: f32,
}

/// Static token vectors and the tokenizer over their vocabulary: the
/// features, without a head (all that `distill.py` writes).
pub struct Encoder {
    /// Whole-word pieces, and continuation pieces (`##ing` as `ing`).
    words: HashMap<Box<str>, u32>,
    continuations: HashMap<Box<str>, u32>,
    unknown: u32,
    dims: usize,
    vectors: Vec<i8>,
    scales: Vec<f32>,
}

/// A loaded model: the encoder and the trained head.
pub struct Model {
    /// Tells this loaded model from any other in the process, so that a
    /// [`Reading`] is only ever reused by the model that made it.
    id: u64,
    version: String,
    encoder: Encoder,
    /// The linear part: `ROWS` rows of `2 * dims` weights over the dense
    /// features, and each sparse bucket's `ROWS` weights side by side (the
    /// file keeps them row by row; one bucket's three weights are one
    /// memory read this way).
    dense_weights: Vec<f32>,
    sparse_weights: Vec<[f32; ROWS]>,
    bias: [f32; ROWS],
    /// The hidden layer over the dense features.
    hidden: Hidden,
    thresholds: Thresholds,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("version", &self.version).field("thresholds", &self.thresholds).finish()
    }
}

static BUILTIN_MODEL: LazyLock<Result<Model, ModelError>> = LazyLock::new(|| Model::from_bytes(BUILTIN));

impl Model {
    /// The shipped model, parsed on first use.
    pub fn builtin() -> Result<&'static Model, ModelError> {
        BUILTIN_MODEL.as_ref().map_err(Clone::clone)
    }

    /// Reads a model file (`--safety-model PATH`).
    pub fn load(path: &std::path::Path) -> Result<Model, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| error(format!("cannot read {}: {e}", path.display())))?;
        Model::from_bytes(&bytes).map_err(|e| error(format!("{}: {}", path.display(), e.0)))
    }

    /// Parses and checks a model file's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Model, ModelError> {
        let file =
            SafeTensors::deserialize(bytes).map_err(|e| error(format!("not a safetensors file: {e}")))?;
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| error(format!("not a safetensors file: {e}")))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let field = |key: &str| metadata.get(key).ok_or_else(|| error(format!("metadata has no `{key}`")));
        let format = field("format")?;
        if format != FORMAT {
            return Err(error(format!("format `{format}`, this build reads `{FORMAT}`")));
        }
        let version = field("version")?.clone();
        let thresholds: Thresholds = serde_json::from_str(field("thresholds")?)
            .map_err(|e| error(format!("thresholds are not valid: {e}")))?;
        let valid = |t: f32| t > 0.0 && t < 1.0;
        if !(valid(thresholds.concern) && valid(thresholds.high) && valid(thresholds.imminent)) {
            return Err(error("thresholds must lie between 0 and 1"));
        }

        let mut digest = Sha256::new();
        for name in TENSORS {
            let tensor = file.tensor(name).map_err(|_| error(format!("no tensor `{name}`")))?;
            digest.update(tensor.data());
        }
        let digest = hex(&digest.finalize());
        if &digest != field("data_sha256")? {
            return Err(error("the tensors do not match their recorded SHA-256: the file is corrupt"));
        }

        let encoder = Encoder::from_tensors(&file, &metadata)?;
        let features = encoder.feature_count();
        let weights = f32_tensor(&file, "head_weight", &[ROWS, features])?;
        let bias = f32_tensor(&file, "head_bias", &[ROWS])?;
        let bias = [bias[0], bias[1], bias[2]];
        let dense = 2 * encoder.dims;
        let hidden = match file.tensor("hidden_bias").map_err(|_| error("no tensor `hidden_bias`"))?.shape() {
            [units] if (1..=MAX_HIDDEN).contains(units) => *units,
            shape => {
                return Err(error(format!("`hidden_bias` must have 1 to {MAX_HIDDEN} units, is {shape:?}")));
            }
        };
        let hidden_weight = i8_tensor(&file, "hidden_weight", &[hidden, dense])?;
        let hidden_scale = f32_tensor(&file, "hidden_scale", &[hidden])?;
        let hidden_bias = f32_tensor(&file, "hidden_bias", &[hidden])?;
        let hidden_output = f32_tensor(&file, "hidden_output", &[ROWS, hidden])?;
        let all = [&weights[..], &bias, &hidden_scale, &hidden_bias, &hidden_output];
        if all.iter().flat_map(|t| t.iter()).any(|w| !w.is_finite()) {
            return Err(error("the head has a weight that is not a finite number"));
        }
        if hidden_weight.contains(&i8::MIN) {
            return Err(error("`hidden_weight` holds -128: int8 weights lie within ±127"));
        }
        let hidden = Hidden::new(dense, &hidden_weight, &hidden_scale, &hidden_bias, &hidden_output);
        let dense_weights = weights.chunks_exact(features).flat_map(|row| &row[..dense]).copied().collect();
        let sparse_weights = (dense..features)
            .map(|column| std::array::from_fn(|class| weights[class * features + column]))
            .collect();
        static LOADED: AtomicU64 = AtomicU64::new(0);
        let id = LOADED.fetch_add(1, Ordering::Relaxed);
        Ok(Model { id, version, encoder, dense_weights, sparse_weights, bias, hidden, thresholds })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// What the model reads of a normalised text, to be judged alone or
    /// as part of a conversation ([`Model::assess_readings`]).
    pub(crate) fn read(&self, normalised: &str) -> Reading {
        let mut dense = vec![0.0; 2 * self.encoder.dims].into_boxed_slice();
        let mut sparse = [0.0f32; ROWS];
        let counts = self.encoder.accumulate(normalised, &mut dense, |bucket| {
            for (sum, weight) in sparse.iter_mut().zip(self.sparse_weights[bucket]) {
                *sum += weight;
            }
        });
        Reading {
            model: self.id,
            dense,
            sparse,
            tokens: counts.tokens,
            occurrences: counts.occurrences,
            words: counts.words,
            first_word: counts.first_word.into(),
            last_word: counts.last_word.into(),
        }
    }

    /// The model's verdict on texts read one after the other, as one text
    /// with a line each would be: the token vectors' sum and maximum, and
    /// the sparse occurrences with the word bigram across each boundary,
    /// are put together from each text's [`Reading`], so that a
    /// conversation's earlier messages are not read again. The level needs
    /// [`MIN_WORDS`] words in all.
    pub(crate) fn assess_readings(&self, readings: &[&Reading]) -> ModelVerdict {
        let [verdict] = self.assess_each([readings]);
        verdict
    }

    /// The verdicts on `N` texts, each read as [`Model::assess_readings`]
    /// reads it, with one pass over the hidden layer's weights for all.
    pub(crate) fn assess_each<const N: usize>(&self, texts: [&[&Reading]; N]) -> [ModelVerdict; N] {
        let probabilities = self.probabilities_each(texts);
        std::array::from_fn(|at| {
            let [at_least_concern, at_least_high, imminent] = probabilities[at];
            let thresholds = self.thresholds;
            let words: usize = texts[at].iter().map(|reading| reading.words).sum();
            let level = if words < MIN_WORDS {
                RiskLevel::None
            } else if at_least_high >= thresholds.high && imminent >= thresholds.imminent {
                RiskLevel::Imminent
            } else if at_least_high >= thresholds.high {
                RiskLevel::High
            } else if at_least_concern >= thresholds.concern {
                RiskLevel::Concern
            } else {
                RiskLevel::None
            };
            let score = (at_least_concern * 10_000.0).round() / 10_000.0;
            ModelVerdict { version: self.version.clone(), level, score }
        })
    }

    /// The probabilities that texts read one after the other are at
    /// `concern` or above, at `high` or above, and `imminent`. The rows are
    /// fitted apart, so a row above may exceed the one below it (a sentence
    /// repeated four times once had 0.9 for `high` or above and 0.07 for
    /// `concern` or above): each is capped by the one below.
    #[cfg(test)]
    pub(crate) fn probabilities(&self, readings: &[&Reading]) -> [f32; ROWS] {
        let [probabilities] = self.probabilities_each([readings]);
        probabilities
    }

    /// [`Model::probabilities`] of `N` texts.
    fn probabilities_each<const N: usize>(&self, texts: [&[&Reading]; N]) -> [[f32; ROWS]; N] {
        let mut linear = texts.map(|readings| self.linear(readings));
        self.hidden.add_to_each(linear.each_mut().map(|(dense, logits)| (&**dense, logits)));
        linear.map(|(_, logits)| {
            let [concern, high, imminent] = logits.map(sigmoid);
            let high = high.min(concern);
            [concern, high, imminent.min(high)]
        })
    }

    /// The dense features of texts read one after the other (at least
    /// one), and the logits of the head's linear part.
    fn linear(&self, readings: &[&Reading]) -> (Box<[f32]>, [f32; ROWS]) {
        assert!(readings.iter().all(|reading| reading.model == self.id), "read by another model");
        let dims = self.encoder.dims;
        let (first, rest) = readings.split_first().expect("a text is read from at least one reading");
        let mut dense = first.dense.clone();
        let mut sparse = first.sparse;
        let (mut tokens, mut occurrences) = (first.tokens, first.occurrences);
        let mut last_word: &str = &first.last_word;
        for reading in rest {
            let (sum, max) = dense.split_at_mut(dims);
            for ((s, m), (&rs, &rm)) in sum
                .iter_mut()
                .zip(max.iter_mut())
                .zip(reading.dense[..dims].iter().zip(&reading.dense[dims..]))
            {
                *s += rs;
                *m = m.max(rm);
            }
            if !last_word.is_empty() && !reading.first_word.is_empty() {
                let bucket = bigram_bucket(last_word, &reading.first_word);
                for (sum, weight) in sparse.iter_mut().zip(self.sparse_weights[bucket]) {
                    *sum += weight;
                }
                occurrences += 1;
            }
            for (sum, part) in sparse.iter_mut().zip(reading.sparse) {
                *sum += part;
            }
            if !reading.last_word.is_empty() {
                last_word = &reading.last_word;
            }
            tokens += reading.tokens;
            occurrences += reading.occurrences;
        }
        finish_dense(&mut dense, tokens);
        let scale = sparse_scale(occurrences);
        let mut logits = self.bias;
        for ((logit, row), sparse) in
            logits.iter_mut().zip(self.dense_weights.chunks_exact(2 * dims)).zip(sparse)
        {
            *logit += dot(row, &dense) + sparse * scale;
        }
        (dense, logits)
    }
}

fn sigmoid(logit: f32) -> f32 {
    1.0 / (1.0 + (-logit).exp())
}

/// What a [`Model`] reads of one text ([`Model::read`]): enough to judge
/// it alone or with the texts around it, without reading it again.
#[derive(Debug, Clone)]
pub(crate) struct Reading {
    /// The model that read it: another model's weights give other sums.
    model: u64,
    /// The sum, then the maximum, of its token vectors, per dimension.
    dense: Box<[f32]>,
    /// The sum of its sparse occurrences' weights, per row of the head.
    sparse: [f32; ROWS],
    tokens: usize,
    occurrences: usize,
    words: usize,
    /// Its first and last word: the bigram across a boundary joins them.
    first_word: Box<str>,
    last_word: Box<str>,
}

impl Reading {
    /// Whether `model` made this reading.
    pub(crate) fn is_by(&self, model: &Model) -> bool {
        self.model == model.id
    }
}

/// The hidden layer as it runs: the units that can move a logit, in the
/// file's order.
///
/// Its input weights are int8, with a scale per unit (the file's
/// `hidden_weight` and `hidden_scale`), and each pass turns the dense
/// features into integers of at most [`FEATURE_STEPS`] in magnitude, in
/// steps of their largest magnitude over `FEATURE_STEPS`. The products are
/// then summed exactly, in 32-bit integers that cannot overflow (at most
/// 127 × 8,191 × 512 < 2³¹), thirty-two at a time: about three times as
/// fast as float32 here, with half the weights' memory. One pass over the
/// weights serves every text judged together (a message and its
/// conversation, [`Hidden::add_to_each`]). `train.py`
/// computes the same sums when it chooses the thresholds. A unit whose
/// output weights are all zero adds nothing and is left out: the logits
/// are the same floats as with every unit computed, bit for bit
/// (`model_tests.rs`).
pub(crate) struct Hidden {
    /// The kept units' input weights, one row of `width` per unit: `dense`,
    /// padded with zeros to a multiple of [`LANES`].
    rows: Vec<i16>,
    width: usize,
    pub(crate) units: Vec<Unit>,
}

pub(crate) struct Unit {
    scale: f32,
    bias: f32,
    output: [f32; ROWS],
}

/// The largest magnitude of a dense feature as a hidden layer's input
/// integer (part of the format).
pub(crate) const FEATURE_STEPS: f32 = 8191.0;

/// Weights smaller than this are read as zero.
const NEGLIGIBLE: f32 = 1e-30;

impl Hidden {
    /// From the file's tensors: `weight` is `units × dense`, `output` is
    /// `ROWS × units`.
    pub(crate) fn new(dense: usize, weight: &[i8], scale: &[f32], bias: &[f32], output: &[f32]) -> Hidden {
        let flush = |w: f32| if w.abs() < NEGLIGIBLE { 0.0 } else { w };
        let count = bias.len();
        let width = dense.next_multiple_of(LANES);
        let mut hidden = Hidden { rows: Vec::new(), width, units: Vec::new() };
        for (unit, (row, (&scale, &bias))) in
            weight.chunks_exact(dense).zip(scale.iter().zip(bias)).enumerate()
        {
            let output: [f32; ROWS] = std::array::from_fn(|class| flush(output[class * count + unit]));
            if output.iter().all(|&w| w == 0.0) {
                continue;
            }
            hidden.rows.extend(row.iter().map(|&w| i16::from(w)));
            hidden.rows.resize(hidden.units.len() * width + width, 0);
            hidden.units.push(Unit { scale, bias, output });
        }
        hidden
    }

    /// Adds the layer's output to `logits`.
    #[cfg(test)]
    pub(crate) fn add_to(&self, features: &[f32], logits: &mut [f32; ROWS]) {
        self.add_to_each([(features, logits)]);
    }

    /// Adds the layer's output for each of `N` texts' dense features to
    /// that text's logits, in one pass over the weights.
    pub(crate) fn add_to_each<const N: usize>(&self, mut texts: [(&[f32], &mut [f32; ROWS]); N]) {
        let inputs = texts.each_ref().map(|(features, _)| {
            let (mut input, step) = quantise(features);
            input.resize(self.width, 0);
            (input, step)
        });
        let lanes = inputs.each_ref().map(|(input, _)| input.as_chunks::<LANES>().0);
        let mut all_sums = vec![[0i32; N]; self.units.len()];
        unit_sums(self.rows.as_chunks::<LANES>().0, self.width / LANES, lanes, &mut all_sums);
        for (unit, sums) in self.units.iter().zip(all_sums) {
            for ((sum, (_, step)), (_, logits)) in sums.into_iter().zip(&inputs).zip(texts.iter_mut()) {
                let activation = (unit.bias + (unit.scale * step) * sum as f32).max(0.0);
                if activation > 0.0 {
                    for (logit, weight) in logits.iter_mut().zip(unit.output) {
                        *logit += weight * activation;
                    }
                }
            }
        }
    }
}

/// The dense features as the hidden layer's integers, and the value of one
/// step: `round(x × FEATURE_STEPS / largest)`, ties to even.
pub(crate) fn quantise(features: &[f32]) -> (Vec<i16>, f32) {
    let largest = features.iter().fold(0.0f32, |largest, x| largest.max(x.abs()));
    if largest == 0.0 {
        return (vec![0; features.len()], 0.0);
    }
    let inverse = FEATURE_STEPS / largest;
    (features.iter().map(|x| round_ties_even(x * inverse) as i16).collect(), largest / FEATURE_STEPS)
}

/// `x.round_ties_even()` for `|x| <= FEATURE_STEPS`, without the library
/// call that the baseline x86-64 instruction set needs: adding and taking
/// away 1.5 × 2²³ leaves no fraction bits, and the addition rounds to even.
fn round_ties_even(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    (x + SHIFT) - SHIFT
}

/// Each unit's input sums for `N` inputs: `rows` holds one row of `chunks`
/// chunks per unit. Compiled three times, for the baseline x86-64
/// instructions, for AVX2 and for AVX2 with AVX-VNNI, and run as the
/// processor allows (`multiversion`): AVX2's multiply-and-add instructions
/// take sixteen pairs at once, not eight, and AVX-VNNI's add the products
/// to the sums in the same instruction.
#[multiversion::multiversion(targets("x86_64+avx2+avxvnni", "x86_64+avx2"))]
fn unit_sums<const N: usize>(
    rows: &[[i16; LANES]],
    chunks: usize,
    inputs: [&[[i16; LANES]]; N],
    sums: &mut [[i32; N]],
) {
    for (row, sums) in rows.chunks_exact(chunks).zip(sums) {
        *sums = dot_each(row, inputs);
    }
}

/// The exact sums of products of one row of weights with each of `N`
/// inputs of small integers, as long, in lanes side by side (SIMD
/// registers; with no remainder to handle, the compiler turns the loop
/// into multiply-and-add instructions). Plain loops, not closures: a
/// closure that is not inlined would lose the caller's AVX2.
#[inline(always)]
fn dot_each<const N: usize>(row: &[[i16; LANES]], inputs: [&[[i16; LANES]]; N]) -> [i32; N] {
    let mut out = [0i32; N];
    for (out, input) in out.iter_mut().zip(inputs) {
        let mut sums = [0i32; LANES];
        for (weights, input) in row.iter().zip(input) {
            for lane in 0..LANES {
                sums[lane] += i32::from(weights[lane]) * i32::from(input[lane]);
            }
        }
        for sum in sums {
            *out += sum;
        }
    }
    out
}

/// The hidden layer's rows and inputs are padded with zeros to a multiple
/// of this many integers.
const LANES: usize = 32;

impl Encoder {
    /// Reads the token vectors and vocabulary (a `distill.py` output, or a
    /// whole model file).
    pub fn from_bytes(bytes: &[u8]) -> Result<Encoder, ModelError> {
        let file =
            SafeTensors::deserialize(bytes).map_err(|e| error(format!("not a safetensors file: {e}")))?;
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| error(format!("not a safetensors file: {e}")))?;
        Encoder::from_tensors(&file, &header.metadata().clone().unwrap_or_default())
    }

    fn from_tensors(
        file: &SafeTensors<'_>,
        metadata: &HashMap<String, String>,
    ) -> Result<Encoder, ModelError> {
        let vocab: Vec<String> =
            serde_json::from_str(metadata.get("vocab").ok_or_else(|| error("metadata has no `vocab`"))?)
                .map_err(|e| error(format!("the vocabulary is not valid: {e}")))?;
        let vectors = file.tensor("token_vectors").map_err(|_| error("no tensor `token_vectors`"))?;
        let [rows, dims] = vectors.shape() else {
            return Err(error("`token_vectors` is not a matrix"));
        };
        let (rows, dims) = (*rows, *dims);
        if vectors.dtype() != Dtype::I8 || rows != vocab.len() || dims == 0 {
            return Err(error(format!(
                "`token_vectors` must be int8 with one row per vocabulary entry ({} entries)",
                vocab.len()
            )));
        }
        let scales = f32_tensor(file, "token_scales", &[rows])?;
        if scales.iter().any(|s| !s.is_finite()) {
            return Err(error("a token scale is not a finite number"));
        }
        let vectors = vectors.data().iter().map(|&b| b as i8).collect();
        let mut words = HashMap::new();
        let mut continuations = HashMap::new();
        for (id, token) in vocab.into_iter().enumerate() {
            let id = id as u32;
            match token.strip_prefix("##") {
                Some(piece) => continuations.insert(piece.into(), id),
                None => words.insert(token.into_boxed_str(), id),
            };
        }
        let unknown = *words.get("[UNK]").ok_or_else(|| error("the vocabulary has no [UNK]"))?;
        Ok(Encoder { words, continuations, unknown, dims, vectors, scales })
    }

    /// Dense features, then sparse buckets: the head's input width.
    pub fn feature_count(&self) -> usize {
        2 * self.dims + BUCKETS
    }

    /// Fills `dense` (`2 * dims`: mean, then maximum of the token vectors),
    /// calls `sparse` with the bucket of every sparse feature occurrence,
    /// and returns how many there were (each counts `1 / sqrt(count)`).
    pub fn features(&self, normalised: &str, dense: &mut [f32], sparse: impl FnMut(usize)) -> usize {
        let counts = self.accumulate(normalised, dense, sparse);
        finish_dense(dense, counts.tokens);
        counts.occurrences
    }

    /// Fills `dense` with the sum, then the maximum, of the token vectors,
    /// and calls `sparse` with the bucket of every sparse occurrence.
    fn accumulate<'t>(
        &self,
        normalised: &'t str,
        dense: &mut [f32],
        mut sparse: impl FnMut(usize),
    ) -> Counts<'t> {
        let dims = self.dims;
        let (sum, max) = dense.split_at_mut(dims);
        sum.fill(0.0);
        max.fill(f32::NEG_INFINITY);
        let mut counts = Counts::default();
        self.tokens(normalised, |id| {
            let id = id as usize;
            let scale = self.scales[id];
            let row = &self.vectors[id * dims..(id + 1) * dims];
            for ((m, x), &v) in sum.iter_mut().zip(max.iter_mut()).zip(row) {
                let v = f32::from(v) * scale;
                *m += v;
                *x = x.max(v);
            }
            counts.tokens += 1;
        });

        let mut emit = |bucket: usize| {
            sparse(bucket);
            counts.occurrences += 1;
        };
        let mut previous: Option<&str> = None;
        for word in normalised.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()) {
            emit(bucket(fnv(b"w", &[word.as_bytes()])));
            match previous {
                Some(previous) => emit(bigram_bucket(previous, word)),
                None => counts.first_word = word,
            }
            previous = Some(word);
            counts.words += 1;
            let bytes = word.as_bytes();
            if bytes.len() > 40 {
                continue;
            }
            let mut padded = [0u8; 42];
            padded[0] = b'<';
            padded[1..=bytes.len()].copy_from_slice(bytes);
            padded[bytes.len() + 1] = b'>';
            let padded = &padded[..bytes.len() + 2];
            for n in 3..=5 {
                for gram in padded.windows(n) {
                    emit(bucket(fnv(b"c", &[gram])));
                }
            }
        }
        counts.last_word = previous.unwrap_or_default();
        counts
    }

    /// BERT's uncased WordPiece over a normalised text (already lower
    /// case, without accents): words split at spaces and punctuation, each
    /// split greedily into the longest pieces of the vocabulary.
    fn tokens(&self, normalised: &str, mut token: impl FnMut(u32)) {
        for chunk in normalised.split_whitespace() {
            for word in chunk.split_inclusive(|c: char| c.is_ascii_punctuation()) {
                let (word, punctuation) = match word.char_indices().last() {
                    Some((at, c)) if c.is_ascii_punctuation() => (&word[..at], Some(&word[at..])),
                    _ => (word, None),
                };
                if !word.is_empty() {
                    self.word_pieces(word, &mut token);
                }
                if let Some(punctuation) = punctuation {
                    token(self.words.get(punctuation).copied().unwrap_or(self.unknown));
                }
            }
        }
    }

    fn word_pieces(&self, word: &str, token: &mut impl FnMut(u32)) {
        const MAX_WORD: usize = 100;
        if word.len() > MAX_WORD {
            return token(self.unknown);
        }
        // At most one piece per byte.
        let mut pieces = [0u32; MAX_WORD];
        let mut found_pieces = 0;
        let mut start = 0;
        while start < word.len() {
            let table = if start == 0 { &self.words } else { &self.continuations };
            // Normalised text is ASCII: every byte offset is a boundary.
            let found = (start + 1..=word.len())
                .rev()
                .find_map(|end| table.get(&word[start..end]).map(|&id| (id, end)));
            match found {
                Some((id, end)) => {
                    pieces[found_pieces] = id;
                    found_pieces += 1;
                    start = end;
                }
                None => return token(self.unknown),
            }
        }
        pieces[..found_pieces].iter().copied().for_each(token);
    }
}

/// Fewer sparse occurrences than this count as this many: a one-word
/// message ("no", "one") must not weigh its few n-grams like a sentence
/// full of evidence (part of the format).
const SPARSE_FLOOR: usize = 48;

/// The model gives a level only to texts of at least this many words: on
/// one- and two-word replies ("only once", "no") it was wrong far more
/// often than right. Their score is still reported; the rules, and the
/// window of earlier messages, judge them.
const MIN_WORDS: usize = 3;

/// Fewer tokens than this shrink the dense features in proportion (part of
/// the format).
const DENSE_FLOOR: usize = 8;

/// What [`Encoder::accumulate`] counted of a text.
#[derive(Default)]
struct Counts<'t> {
    tokens: usize,
    occurrences: usize,
    words: usize,
    first_word: &'t str,
    last_word: &'t str,
}

/// Turns the token vectors' sum and maximum (`dense`) into the dense
/// features: their mean and maximum, shrunk towards zero when there are
/// fewer tokens than [`DENSE_FLOOR`] (less evidence, as for the sparse
/// ones).
fn finish_dense(dense: &mut [f32], tokens: usize) {
    let (mean, max) = dense.split_at_mut(dense.len() / 2);
    if tokens == 0 {
        max.fill(0.0);
    } else {
        let n = tokens as f32;
        let weight = (n / DENSE_FLOOR as f32).min(1.0);
        mean.iter_mut().for_each(|m| *m *= weight / n);
        max.iter_mut().for_each(|x| *x *= weight);
    }
}

/// The bucket of the word bigram `first second`.
fn bigram_bucket(first: &str, second: &str) -> usize {
    bucket(fnv(b"b", &[first.as_bytes(), b" ", second.as_bytes()]))
}

/// A sparse feature's bucket from its hash.
fn bucket(hash: u64) -> usize {
    (hash % BUCKETS as u64) as usize
}

/// The value of each sparse occurrence, when there are `count`.
pub fn sparse_scale(count: usize) -> f32 {
    if count == 0 { 0.0 } else { SPARSE_WEIGHT / (count.max(SPARSE_FLOOR) as f32).sqrt() }
}

/// FNV-1a (64-bit) of a kind tag and some parts: stable across builds and
/// platforms, as the shipped weights need.
fn fnv(kind: &[u8], parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in kind.iter().chain(parts.iter().flat_map(|part| part.iter())) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The dot product of two vectors, summed in eight lanes: a single running
/// sum of floats is one long chain of dependent additions that the compiler
/// may not reorder, where eight lanes run side by side (in SIMD registers).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a_lanes, a_rest) = a.as_chunks::<8>();
    let (b_lanes, b_rest) = b.as_chunks::<8>();
    let mut sums = [0.0f32; 8];
    for (x, y) in a_lanes.iter().zip(b_lanes) {
        for lane in 0..8 {
            sums[lane] += x[lane] * y[lane];
        }
    }
    sums.iter().sum::<f32>() + a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum::<f32>()
}

/// The bytes of a tensor of the given type and shape.
fn tensor_data<'f>(
    file: &'f SafeTensors<'_>,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<&'f [u8], ModelError> {
    let tensor = file.tensor(name).map_err(|_| error(format!("no tensor `{name}`")))?;
    if tensor.dtype() != dtype || tensor.shape() != shape {
        return Err(error(format!(
            "`{name}` must be {dtype:?} of shape {shape:?}, is {:?} {:?}",
            tensor.dtype(),
            tensor.shape()
        )));
    }
    Ok(tensor.data())
}

fn i8_tensor(file: &SafeTensors<'_>, name: &str, shape: &[usize]) -> Result<Vec<i8>, ModelError> {
    Ok(tensor_data(file, name, Dtype::I8, shape)?.iter().map(|&b| b as i8).collect())
}

pub(crate) fn f32_tensor(
    file: &SafeTensors<'_>,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>, ModelError> {
    let data = tensor_data(file, name, Dtype::F32, shape)?;
    Ok(data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// Lower-case hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
