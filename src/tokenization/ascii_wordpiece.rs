//! A fast path for BERT-style tokenizers (BertNormalizer + BertPreTokenizer + WordPiece) on ASCII text: the same
//! ids as Hugging Face tokenizers, without its per-character alignment bookkeeping, which dominates the cost of
//! tokenizing long documents. Anything else (non-ASCII text, text holding an added token, other tokenizers)
//! goes through the tokenizer itself.

use std::collections::HashMap;

use tokenizers::{Encoding, ModelWrapper, NormalizerWrapper, PreTokenizerWrapper, Tokenizer};

/// The parts of a BERT tokenizer the fast path reproduces.
pub struct AsciiWordPiece {
    vocab: HashMap<String, u32>,
    unk_id: u32,
    continuing_prefix: String,
    max_input_chars_per_word: usize,
    lowercase: bool,
    /// Added tokens (lowercased): text containing one is left to the tokenizer, which splits on them.
    added_tokens: Vec<String>,
}

impl AsciiWordPiece {
    /// Some when the tokenizer is BertNormalizer (cleaning text) + BertPreTokenizer + WordPiece.
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Option<Self> {
        let lowercase = match tokenizer.get_normalizer()? {
            NormalizerWrapper::BertNormalizer(normalizer) if normalizer.clean_text => {
                normalizer.lowercase
            }
            _ => return None,
        };
        if !matches!(
            tokenizer.get_pre_tokenizer()?,
            PreTokenizerWrapper::BertPreTokenizer(_)
        ) {
            return None;
        }
        let ModelWrapper::WordPiece(model) = tokenizer.get_model() else {
            return None;
        };
        let vocab = tokenizers::Model::get_vocab(model);
        let unk_id = *vocab.get(&model.unk_token)?;
        let added_tokens = tokenizer
            .get_added_tokens_decoder()
            .values()
            .map(|token| token.content.to_ascii_lowercase())
            .filter(|content| !content.is_empty())
            .collect();
        Some(Self {
            vocab,
            unk_id,
            continuing_prefix: model.continuing_subword_prefix.clone(),
            max_input_chars_per_word: model.max_input_chars_per_word,
            lowercase,
            added_tokens,
        })
    }

    /// The encoding of `text` (no special tokens, every type id `type_id`), or None when the text needs the full
    /// tokenizer.
    pub fn encode(&self, text: &str, type_id: u32) -> Option<Encoding> {
        if !text.is_ascii() || self.holds_added_token(text) {
            return None;
        }
        let mut ids = Vec::with_capacity(text.len() / 4 + 1);
        let mut word = String::with_capacity(32);
        let mut scratch = String::with_capacity(32 + self.continuing_prefix.len());
        for byte in text.bytes() {
            match byte {
                // BertNormalizer drops control characters (tab, newline and carriage return are whitespace).
                b'\t' | b'\n' | b'\r' | b' ' => self.flush(&mut word, &mut scratch, &mut ids),
                0..=0x1f | 0x7f => {}
                // BertPreTokenizer isolates each punctuation character; every ASCII symbol is punctuation.
                b if b.is_ascii_punctuation() => {
                    self.flush(&mut word, &mut scratch, &mut ids);
                    word.push(b as char);
                    self.flush(&mut word, &mut scratch, &mut ids);
                }
                b => word.push(if self.lowercase {
                    b.to_ascii_lowercase() as char
                } else {
                    b as char
                }),
            }
        }
        self.flush(&mut word, &mut scratch, &mut ids);
        Some(
            ids.into_iter()
                .map(|id| (id, String::new(), (0, 0), None, type_id))
                .collect(),
        )
    }

    fn holds_added_token(&self, text: &str) -> bool {
        if self.added_tokens.is_empty() {
            return false;
        }
        let lowered = text.to_ascii_lowercase();
        self.added_tokens
            .iter()
            .any(|token| lowered.contains(token.as_str()))
    }

    /// WordPiece of one pre-tokenized word: greedy longest match, continuation pieces with the prefix, the
    /// unknown token for the whole word if any part has no match or the word is too long.
    fn flush(&self, word: &mut String, scratch: &mut String, ids: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        if word.len() > self.max_input_chars_per_word {
            ids.push(self.unk_id);
            word.clear();
            return;
        }
        let first_piece = ids.len();
        let mut start = 0;
        while start < word.len() {
            let mut end = word.len();
            let mut found = None;
            while start < end {
                let piece = &word[start..end];
                let id = if start == 0 {
                    self.vocab.get(piece)
                } else {
                    scratch.clear();
                    scratch.push_str(&self.continuing_prefix);
                    scratch.push_str(piece);
                    self.vocab.get(scratch.as_str())
                };
                if let Some(&id) = id {
                    found = Some(id);
                    break;
                }
                end -= 1;
            }
            match found {
                Some(id) => {
                    ids.push(id);
                    start = end;
                }
                None => {
                    ids.truncate(first_piece);
                    ids.push(self.unk_id);
                    break;
                }
            }
        }
        word.clear();
    }
}
