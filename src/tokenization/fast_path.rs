//! Which of our own document encoders a tokenizer takes: each gives exactly the tokenizer's ids for the text it
//! accepts, without tokenizers' alignment bookkeeping; other text goes through the tokenizer.

use tokenizers::{Encoding, Tokenizer};

use super::ascii_wordpiece::AsciiWordPiece;
use super::unigram::UnigramFastPath;

pub(super) enum FastPath {
    /// BERT's WordPiece on ASCII text.
    AsciiWordPiece(AsciiWordPiece),
    /// SentencePiece Unigram (XLM-R) on any text.
    Unigram(Box<UnigramFastPath>),
}

impl FastPath {
    pub(super) fn for_tokenizer(tokenizer: &Tokenizer) -> Option<Self> {
        AsciiWordPiece::from_tokenizer(tokenizer)
            .map(Self::AsciiWordPiece)
            .or_else(|| {
                UnigramFastPath::from_tokenizer(tokenizer).map(|u| Self::Unigram(Box::new(u)))
            })
    }

    /// The text's encoding (no special tokens, type ids `type_id`), or None when it needs the tokenizer.
    pub(super) fn encode(&self, text: &str, type_id: u32) -> Option<Encoding> {
        match self {
            Self::AsciiWordPiece(fast) => fast.encode(text, type_id),
            Self::Unigram(fast) => fast.encode(text, type_id),
        }
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            Self::AsciiWordPiece(_) => "ascii-wordpiece",
            Self::Unigram(_) => "unigram",
        }
    }
}
