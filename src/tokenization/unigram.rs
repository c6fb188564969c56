//! A fast path for SentencePiece Unigram tokenizers (XLM-R and the rerankers built on it): the precompiled
//! normalisation map, Metaspace pre-tokenization and Unigram's best segmentation, giving the same ids as Hugging
//! Face tokenizers without its per-character alignment bookkeeping, its per-piece strings and its hash-map trie.
//! Text holding an added token, and tokenizers of another shape or with byte fallback, go through the tokenizer.

use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::Precompiled;
use tokenizers::pre_tokenizers::metaspace::PrependScheme;
use tokenizers::{Encoding, ModelWrapper, NormalizerWrapper, PreTokenizerWrapper, Tokenizer};
use unicode_segmentation::UnicodeSegmentation;
use yada::builder::DoubleArrayBuilder;
use yada::DoubleArray;

/// Score below the vocabulary's lowest for a character no piece covers, as tokenizers and SentencePiece use.
const UNKNOWN_PENALTY: f64 = 10.0;

/// The parts of a SentencePiece Unigram tokenizer the fast path reproduces.
pub struct UnigramFastPath {
    normalizer: Normalization,
    /// `WhitespaceSplit` runs before Metaspace (transformers' current conversion); without it Metaspace alone
    /// replaces spaces (the conversion the published XLM-R rerankers carry).
    split_on_whitespace: bool,
    /// Metaspace's replacement for a space, also prepended to each word: `▁`.
    replacement: char,
    /// Every non-empty piece, to its id (the last id of a piece listed twice, as tokenizers keeps).
    pieces: DoubleArray<Vec<u8>>,
    /// Scores by id.
    scores: Vec<f64>,
    unknown_id: u32,
    unknown_score: f64,
    /// Added tokens: text holding one is left to the tokenizer, which splits on them.
    added_tokens: Vec<String>,
}

/// The precompiled map, and whether a `Replace(" {2,}", " ")` follows it.
struct Normalization {
    map: Precompiled,
    /// What the map makes of each ASCII character on its own (None: left as it is).
    ascii: Vec<Option<String>>,
    collapse_spaces: bool,
}

/// The best segmentation's last piece ending at a byte position: its id, where it starts, and the path's score.
#[derive(Clone, Copy)]
struct BestPath {
    id: u32,
    starts_at: usize,
    score: f64,
    reached: bool,
}

const UNREACHED: BestPath = BestPath {
    id: 0,
    starts_at: 0,
    score: 0.0,
    reached: false,
};

impl UnigramFastPath {
    /// Some when the tokenizer is Precompiled (optionally then collapsing runs of spaces) + Metaspace (prepending
    /// always, splitting; optionally after WhitespaceSplit) + Unigram without byte fallback.
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Option<Self> {
        let normalizer = Normalization::from_wrapper(tokenizer.get_normalizer()?)?;
        let (split_on_whitespace, metaspace) = match tokenizer.get_pre_tokenizer()? {
            PreTokenizerWrapper::Metaspace(metaspace) => (false, metaspace.clone()),
            PreTokenizerWrapper::Sequence(sequence) => {
                let parts = serde_json::to_value(sequence).ok()?;
                let parts = parts.get("pretokenizers")?.as_array()?;
                let [first, second] = parts.as_slice() else {
                    return None;
                };
                if first.get("type")?.as_str()? != "WhitespaceSplit" {
                    return None;
                }
                let metaspace: PreTokenizerWrapper = serde_json::from_value(second.clone()).ok()?;
                let PreTokenizerWrapper::Metaspace(metaspace) = metaspace else {
                    return None;
                };
                (true, metaspace)
            }
            _ => return None,
        };
        if !metaspace.get_split() || metaspace.get_prepend_scheme() != PrependScheme::Always {
            return None;
        }
        let ModelWrapper::Unigram(model) = tokenizer.get_model() else {
            return None;
        };
        let (pieces, scores, unknown_id) = vocabulary(model)?;
        let lowest = scores.iter().copied().fold(f64::INFINITY, f64::min);
        let added_tokens = tokenizer
            .get_added_tokens_decoder()
            .values()
            .map(|token| token.content.clone())
            .filter(|content| !content.is_empty())
            .collect();
        Some(Self {
            normalizer,
            split_on_whitespace,
            replacement: metaspace.get_replacement(),
            pieces,
            scores,
            unknown_id,
            unknown_score: lowest - UNKNOWN_PENALTY,
            added_tokens,
        })
    }

    /// The encoding of `text` (no special tokens, every type id `type_id`), or None when the text needs the full
    /// tokenizer.
    pub fn encode(&self, text: &str, type_id: u32) -> Option<Encoding> {
        if self.holds_added_token(text) {
            return None;
        }
        let normalized = self.normalizer.apply(text);
        if normalized.contains('\0') || self.holds_added_token(&normalized) {
            return None;
        }
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        let mut lattice = Vec::new();
        let mut word = String::new();
        let mut segment = |piece: &str| self.segment(piece, &mut lattice, &mut ids);
        if self.split_on_whitespace {
            for part in normalized
                .split(char::is_whitespace)
                .filter(|w| !w.is_empty())
            {
                word.clear();
                self.metaspace(part, &mut word);
                split_before(&word, self.replacement, &mut segment);
            }
        } else if !normalized.is_empty() {
            // Metaspace never sees an empty text (tokenizers does not pre-tokenize one).
            self.metaspace(
                &normalized.replace(' ', self.replacement.encode_utf8(&mut [0; 4])),
                &mut word,
            );
            split_before(&word, self.replacement, &mut segment);
        }
        Some(
            ids.into_iter()
                .map(|id| (id, String::new(), (0, 0), None, type_id))
                .collect(),
        )
    }

    fn holds_added_token(&self, text: &str) -> bool {
        self.added_tokens
            .iter()
            .any(|token| text.contains(token.as_str()))
    }

    /// Metaspace's prefix: the replacement before the word unless it starts with one.
    fn metaspace(&self, part: &str, word: &mut String) {
        if !part.starts_with(self.replacement) {
            word.push(self.replacement);
        }
        word.push_str(part);
    }

    /// Unigram's best segmentation of one piece (Viterbi over the pieces each position starts), as tokenizers'
    /// optimised encoder: ties go to the earliest start; a character no piece covers alone is unknown, and runs
    /// of unknown characters are fused into one unknown token.
    fn segment(&self, word: &str, lattice: &mut Vec<BestPath>, ids: &mut Vec<u32>) {
        lattice.clear();
        lattice.resize(word.len() + 1, UNREACHED);
        for (starts_at, character) in word.char_indices() {
            let till_here = lattice[starts_at].score;
            let char_len = character.len_utf8();
            let mut covers_character = false;
            for (id, len) in self
                .pieces
                .common_prefix_search(&word.as_bytes()[starts_at..])
            {
                let score = till_here + self.scores[id as usize];
                offer(&mut lattice[starts_at + len], id, starts_at, score);
                covers_character |= len == char_len;
            }
            if !covers_character {
                let score = till_here + self.unknown_score;
                offer(
                    &mut lattice[starts_at + char_len],
                    self.unknown_id,
                    starts_at,
                    score,
                );
            }
        }
        let first = ids.len();
        let mut ends_at = word.len();
        let mut unknown_run_start = None;
        while ends_at > 0 {
            let node = lattice[ends_at];
            if node.id == self.unknown_id {
                unknown_run_start.get_or_insert(ends_at);
            } else {
                if let Some(run_end) = unknown_run_start.take() {
                    ids.push(self.fused_unknown(&word[ends_at..run_end]));
                }
                ids.push(node.id);
            }
            ends_at = node.starts_at;
        }
        if let Some(run_end) = unknown_run_start {
            ids.push(self.fused_unknown(&word[..run_end]));
        }
        ids[first..].reverse();
    }

    /// The id tokenizers gives a run of unknown characters: the piece it spells if there is one, else unknown.
    fn fused_unknown(&self, run: &str) -> u32 {
        self.pieces
            .exact_match_search(run.as_bytes())
            .unwrap_or(self.unknown_id)
    }
}

/// Keeps the better path into a position; the first of equal scores stays.
fn offer(node: &mut BestPath, id: u32, starts_at: usize, score: f64) {
    if !node.reached || score > node.score {
        *node = BestPath {
            id,
            starts_at,
            score,
            reached: true,
        };
    }
}

/// Splits before every `delimiter` (tokenizers' MergedWithNext), calling `f` with each non-empty part.
fn split_before(text: &str, delimiter: char, f: &mut impl FnMut(&str)) {
    let mut start = 0;
    for (at, _) in text.match_indices(delimiter) {
        if at > start {
            f(&text[start..at]);
        }
        start = at;
    }
    if start < text.len() {
        f(&text[start..]);
    }
}

/// The trie of pieces, scores by id and the unknown id; None with byte fallback (not reproduced), without an
/// unknown id, or with a piece the trie cannot hold (a NUL byte).
fn vocabulary(model: &Unigram) -> Option<(DoubleArray<Vec<u8>>, Vec<f64>, u32)> {
    if model.byte_fallback() {
        return None;
    }
    let description = serde_json::to_value(model).ok()?;
    let unknown_id = u32::try_from(description.get("unk_id")?.as_u64()?).ok()?;
    let mut keyed: Vec<(&str, u32)> = Vec::new();
    let mut scores = Vec::new();
    for (id, (piece, score)) in model.iter().enumerate() {
        scores.push(*score);
        if piece.as_bytes().contains(&0) {
            return None;
        }
        if !piece.is_empty() {
            keyed.push((piece.as_str(), u32::try_from(id).ok()?));
        }
    }
    if unknown_id as usize >= scores.len() || scores.len() >= 1 << 31 {
        return None;
    }
    // A piece listed twice maps to its last id, as tokenizers' piece map keeps.
    keyed.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()).then(b.1.cmp(&a.1)));
    keyed.dedup_by(|later, kept| later.0 == kept.0);
    let keyset: Vec<(&[u8], u32)> = keyed.iter().map(|(p, id)| (p.as_bytes(), *id)).collect();
    let trie = DoubleArray::new(DoubleArrayBuilder::build(&keyset).ok()?).ok()?;
    Some((trie, scores, unknown_id))
}

impl Normalization {
    fn from_wrapper(wrapper: &NormalizerWrapper) -> Option<Self> {
        match wrapper {
            NormalizerWrapper::Precompiled(map) => Some(Self::new(map.clone(), false)),
            NormalizerWrapper::Sequence(sequence) => {
                let parts = serde_json::to_value(sequence).ok()?;
                let parts = parts.get("normalizers")?.as_array()?;
                let (map, rest) = parts.split_first()?;
                let NormalizerWrapper::Precompiled(map) =
                    serde_json::from_value(map.clone()).ok()?
                else {
                    return None;
                };
                match rest {
                    [] => Some(Self::new(map, false)),
                    [replace] if collapses_spaces(replace) => Some(Self::new(map, true)),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    fn new(map: Precompiled, collapse_spaces: bool) -> Self {
        let ascii = (0u8..128)
            .map(|byte| {
                let character = [byte];
                let text = std::str::from_utf8(&character).unwrap_or_default();
                map.transform(text).map(str::to_string)
            })
            .collect();
        Self {
            map,
            ascii,
            collapse_spaces,
        }
    }

    /// The normalized text: the map applied grapheme by grapheme exactly as tokenizers applies it (a whole
    /// grapheme of under six bytes if the map has it, else each character), then runs of spaces collapsed.
    fn apply(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len() + text.len() / 8);
        if text.is_ascii() {
            self.apply_ascii(text, &mut out);
        } else {
            for grapheme in text.graphemes(true) {
                self.push_grapheme(grapheme, &mut out);
            }
        }
        if self.collapse_spaces && out.contains("  ") {
            out = collapse_space_runs(&out);
        }
        out
    }

    /// ASCII text's graphemes are its characters, but for CR LF.
    fn apply_ascii(&self, text: &str, out: &mut String) {
        let bytes = text.as_bytes();
        let mut at = 0;
        while at < bytes.len() {
            if bytes[at] == b'\r' && bytes.get(at + 1) == Some(&b'\n') {
                self.push_grapheme("\r\n", out);
                at += 2;
                continue;
            }
            match &self.ascii[usize::from(bytes[at])] {
                Some(mapped) => out.push_str(mapped),
                None => out.push(char::from(bytes[at])),
            }
            at += 1;
        }
    }

    fn push_grapheme(&self, grapheme: &str, out: &mut String) {
        if grapheme.len() < 6 {
            if let Some(mapped) = self.map.transform(grapheme) {
                out.push_str(mapped);
                return;
            }
        }
        for (at, character) in grapheme.char_indices() {
            match self.map.transform(&grapheme[at..at + character.len_utf8()]) {
                Some(mapped) => out.push_str(mapped),
                None => out.push(character),
            }
        }
    }
}

/// `Replace` of the regex ` {2,}` by one space, as XLM-R's published tokenizers carry.
fn collapses_spaces(replace: &serde_json::Value) -> bool {
    replace.get("type").and_then(|t| t.as_str()) == Some("Replace")
        && replace.pointer("/pattern/Regex").and_then(|p| p.as_str()) == Some(" {2,}")
        && replace.get("content").and_then(|c| c.as_str()) == Some(" ")
}

fn collapse_space_runs(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut previous_space = false;
    for character in text.chars() {
        let space = character == ' ';
        if !(space && previous_space) {
            out.push(character);
        }
        previous_space = space;
    }
    out
}
