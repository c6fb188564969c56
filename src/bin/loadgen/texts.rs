//! Request texts of the load generator: seeded random words, or one-token words of a model's tokenizer.

const WORDS: &[&str] = &[
    "the", "market", "river", "city", "bread", "fish", "fruit", "people", "sell", "old", "new",
    "north", "south", "trade", "history", "bridge", "harbour", "winter", "summer", "price",
    "quality", "fresh", "local", "famous", "street", "morning", "evening", "visitors", "stalls",
    "season", "weather", "coffee", "tea", "music", "festival",
];

/// A small deterministic generator, so runs are repeatable without a dependency.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The words texts are made of: WORDS, or the one-token words of --tokenizer.
pub static WORD_POOL: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

pub fn text(rng: &mut Lcg, words: usize) -> String {
    let pool = WORD_POOL.get_or_init(|| WORDS.iter().map(|w| w.to_string()).collect());
    (0..words)
        .map(|_| pool[rng.below(pool.len())].as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Alphabetic vocabulary entries that the tokenizer encodes as exactly one token when they stand alone
/// between spaces, and the measured tokens per word of a text made of them.
pub fn one_token_words(path: &std::path::Path) -> Result<(Vec<String>, f64), String> {
    let mut tokenizer = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| format!("--tokenizer {}: {e}", path.display()))?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .map_err(|e| format!("--tokenizer: {e}"))?;
    let count = |text: &str| {
        tokenizer
            .encode_fast(text, false)
            .map(|e| e.len())
            .unwrap_or(0)
    };
    let mut words: Vec<String> = tokenizer
        .get_vocab(false)
        .into_keys()
        .map(|piece| piece.trim_start_matches('\u{2581}').to_string())
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase()))
        .collect();
    words.sort_unstable();
    words.dedup();
    words.retain(|w| count(w) == 1);
    words.truncate(4000);
    if words.is_empty() {
        return Err(format!("{} has no one-token words", path.display()));
    }
    let sample: Vec<&str> = (0..500)
        .map(|i| words[(i * 7919) % words.len()].as_str())
        .collect();
    let per_word = count(&sample.join(" ")) as f64 / sample.len() as f64;
    Ok((words, per_word))
}

pub fn word_range(spec: &str) -> Result<(usize, usize), String> {
    let parse = |s: &str| {
        s.trim()
            .parse::<usize>()
            .map_err(|e| format!("--doc-words {spec:?}: {e}"))
    };
    match spec.split_once("..") {
        Some((lo, hi)) => Ok((parse(lo)?, parse(hi)?.max(parse(lo)?))),
        None => parse(spec).map(|n| (n, n)),
    }
}
