//! The ASCII WordPiece fast path gives exactly the tokenizer's ids, on hand-picked and random ASCII text.

mod common;

use common::fixture;
use proptest::prelude::*;
use rerank_server::tokenization::PairTokenizer;

fn tokenizer() -> PairTokenizer {
    PairTokenizer::load(&fixture("bert-tiny-1label"), None, 512, 1).expect("tokenizer loads")
}

fn assert_same(tokenizer: &PairTokenizer, text: &str) {
    let reference = tokenizer.reference_document_ids(text).expect("reference");
    match tokenizer.fast_document_ids(text) {
        Some(fast) => assert_eq!(fast, reference, "ids differ for {text:?}"),
        None => assert!(
            !text.is_ascii() || text.to_ascii_lowercase().contains('['),
            "fast path refused plain ASCII {text:?}"
        ),
    }
}

#[test]
fn hand_picked_texts_match_the_tokenizer() {
    let tokenizer = tokenizer();
    let long_word = "a".repeat(101);
    let texts = [
        "",
        "   ",
        "The market by the river sells fresh fish.",
        "UPPER case, MiXeD; punctuation!?... (brackets) {braces} <angles> ~tilde~ `tick`",
        "numbers 123 4.56 7,890 and e-mail@example.com http://x.y/z?a=b&c=d",
        "tabs\tand\nnewlines\r\nand\x0bvertical\x0cfeeds",
        "control\x01chars\x7finside\x1fwords",
        "unbelievablyunknownwordpiecesplitting antidisestablishmentarianism",
        long_word.as_str(),
        "zzzzqqqq xyzzy qwertyuiop",
        "a literal [SEP] marker and [cls] lower",
        "café naïve résumé",
        "emoji 😀 and 中文",
    ];
    for text in texts {
        assert_same(&tokenizer, text);
    }
    assert!(tokenizer.fast_document_ids("plain ascii text").is_some());
    assert!(tokenizer.fast_document_ids("not ascii: é").is_none());
}

/// ASCII text from words of the vocabulary, random letters, digits, punctuation, whitespace and controls.
fn ascii_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => prop::sample::select(vec![
            "the", "market", "River", "FISH", "bread", "history", "visitors", "unbelievable", "running",
            "played", "##ing", "sep", "cls",
        ])
        .prop_map(str::to_string),
        3 => "[a-zA-Z]{1,14}",
        1 => "[0-9]{1,6}",
        2 => "[!-/:-@\\[-`{-~]{1,3}",
        2 => "[ \t\n\r]{1,3}",
        1 => "[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f]",
        1 => "[a-z]{95,110}",
    ];
    prop::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn random_ascii_text_matches_the_tokenizer(text in ascii_text()) {
        assert_same(&tokenizer(), &text);
    }
}
