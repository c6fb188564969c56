//! Length arithmetic of pairs: the pair length limit, longest-first truncation, and low token estimates.

use std::path::Path;

use tokenizers::utils::truncation::TruncationDirection;
use tokenizers::Encoding;

use crate::error::StartupError;

/// Lengths (first, second) that tokenizers' `longest_first` truncation keeps of a pair of sequences of
/// `first` and `second` tokens within `max` tokens (the same arithmetic as `truncate_encodings`).
pub(super) fn longest_first_lengths(first: usize, second: usize, max: usize) -> (usize, usize) {
    if first + second <= max {
        return (first, second);
    }
    let mut short = first.min(second);
    let mut long = if short > max {
        short
    } else {
        short.max(max - short)
    };
    if short + long > max {
        short = max / 2;
        long = short + max % 2;
    }
    if first > second {
        (long, short)
    } else {
        (short, long)
    }
}

/// Fewest tokens an ASCII word can become: one per 10 bytes (prose has 4 to 6), at least one if it holds a
/// letter or digit, and one for a word over 100 bytes (WordPiece maps such a word to a single [UNK]).
pub(super) fn least_word_tokens(word: &str) -> usize {
    if !word.bytes().any(|b| b.is_ascii_alphanumeric()) {
        0
    } else if word.len() > 100 {
        1
    } else {
        (word.len() / 10).max(1)
    }
}

/// Cuts an encoding to its first `len` tokens and drops the overflow pieces tokenizers keeps, so that the pair
/// template never combines them (it would build one pair per combination of query and document pieces).
pub(super) fn keep_first(mut encoding: Encoding, len: usize) -> Encoding {
    encoding.truncate(len, 0, TruncationDirection::Right);
    drop(encoding.take_overflowing());
    encoding
}

pub(super) fn resolve_max_length(
    dir: &Path,
    configured: Option<usize>,
    max_positions: usize,
    added_pair_tokens: usize,
) -> Result<usize, StartupError> {
    let max_length = match configured {
        Some(n) if n > max_positions => {
            return Err(StartupError::Config(format!(
                "max_length {n} is over the model's {max_positions} position embeddings"
            )))
        }
        Some(n) => n,
        None => crate::model::hf_config::tokenizer_max_length(dir)?
            .map_or(max_positions, |n| n.min(max_positions)),
    };
    if max_length <= added_pair_tokens {
        return Err(StartupError::Config(format!(
            "max_length {max_length} leaves no room for text after the {added_pair_tokens} special tokens of a pair"
        )));
    }
    Ok(max_length)
}
