//! The SentencePiece Unigram fast path gives exactly the tokenizer's ids, on hand-picked and random text in many
//! scripts, for both shapes XLM-R tokenizers are published in.

mod common;

use std::path::Path;
use std::sync::OnceLock;

use common::fixture;
use proptest::prelude::*;
use rerank_server::tokenization::PairTokenizer;

/// The fixture as transformers converts XLM-R today: Precompiled; WhitespaceSplit then Metaspace.
fn current_shape() -> PairTokenizer {
    PairTokenizer::load(&fixture("xlmr-tiny-1label"), None, 512, 1).expect("tokenizer loads")
}

/// The same pieces as the published XLM-R rerankers carry them: Precompiled then `Replace(" {2,}", " ")`;
/// Metaspace alone.
fn published_shape(dir: &Path) -> PairTokenizer {
    let source = fixture("xlmr-tiny-1label");
    let text = std::fs::read_to_string(source.join("tokenizer.json")).expect("fixture tokenizer");
    let mut json: serde_json::Value = serde_json::from_str(&text).expect("json");
    let precompiled = json["normalizer"].clone();
    assert_eq!(precompiled["type"], "Precompiled");
    json["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": [
        precompiled, {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]});
    json["pre_tokenizer"] = serde_json::json!(
        {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true});
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).expect("write");
    std::fs::copy(
        source.join("tokenizer_config.json"),
        dir.join("tokenizer_config.json"),
    )
    .expect("copy");
    PairTokenizer::load(dir, None, 512, 1).expect("tokenizer loads")
}

fn holds_added_token(text: &str) -> bool {
    ["<s>", "</s>", "<pad>", "<unk>", "<mask>"]
        .iter()
        .any(|t| text.contains(t))
}

fn assert_same(tokenizer: &PairTokenizer, text: &str) {
    let reference = tokenizer.reference_document_ids(text).expect("reference");
    match tokenizer.fast_document_ids(text) {
        Some(fast) => assert_eq!(fast, reference, "ids differ for {text:?}"),
        None => assert!(
            holds_added_token(text) || text.contains('\0'),
            "fast path refused {text:?}"
        ),
    }
}

const HAND_PICKED: &[&str] = &[
    "",
    " ",
    "   leading and trailing   ",
    "The market by the river sells fresh fish.",
    "what is the capital of france? paris is the capital and largest city of france.",
    "café crème brûlée naïve résumé façade ångström über straße",
    "cafe\u{301} decomposed e\u{301}\u{302}\u{303}\u{304}\u{305} stacked marks",
    "北京是中国的首都 东京是日本的首都 中国の首都は北京です 서울은 한국의 수도입니다",
    "i love pizza 🍕 🔥 👍 🤖 robots and emoji 👨‍👩‍👧‍👦 family 🇫🇷 flag",
    "مرحبا بالعالم שלום עולם עברית وعربية",
    "Москва столица России. Ελληνικά γράμματα.",
    "financial full width ＡＢＣ ｶﾀｶﾅ katakana ① ② ③ numbers 0123456789 ﬁ ligature",
    "tabs\tand\nnewlines\r\nand\x0bvertical\x0cfeeds\u{a0}nbsp\u{2003}em\u{3000}ideographic",
    "control\x01chars\x7finside\x1fwords\u{200b}zero\u{feff}width",
    "▁already ▁▁marked▁ words▁",
    "zzzzqqqq xyzzy qwertyuiop ǅǆ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "a literal <s> marker",
    "unknown <unk> and <mask>",
];

#[test]
fn hand_picked_texts_match_the_tokenizer_in_both_shapes() {
    let dir = tempfile::tempdir().expect("tempdir");
    for tokenizer in [current_shape(), published_shape(dir.path())] {
        assert_eq!(tokenizer.fast_path_name(), Some("unigram"));
        for text in HAND_PICKED {
            assert_same(&tokenizer, text);
        }
        assert!(tokenizer.fast_document_ids("北京 café").is_some());
        assert!(tokenizer.fast_document_ids("held <mask> token").is_none());
    }
}

#[test]
fn the_shapes_differ_where_spaces_run_and_the_fast_path_follows_each() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (current, published) = (current_shape(), published_shape(dir.path()));
    let text = "trailing space ";
    let (a, b) = (
        current.fast_document_ids(text),
        published.fast_document_ids(text),
    );
    assert_eq!(
        a.as_ref(),
        current.reference_document_ids(text).ok().as_ref()
    );
    assert_eq!(
        b.as_ref(),
        published.reference_document_ids(text).ok().as_ref()
    );
    assert_ne!(
        a, b,
        "Metaspace alone keeps a trailing space as a piece; WhitespaceSplit drops it"
    );
}

/// Text from many scripts, combining marks, emoji sequences, whitespace of every kind, controls, the Metaspace
/// mark itself, and now and then an added token.
fn any_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => prop::sample::select(vec![
            "the", "market", "capital", "France", "paris", "café", "straße", "北京", "首都", "서울은",
            "Москва", "γράμματα", "مرحبا", "שלום", "🍕", "👨‍👩‍👧", "🇫🇷", "ＡＢＣ", "ｶﾀｶﾅ", "①", "ﬁ",
            "e\u{301}", "▁", "<s>", "<mask>",
        ])
        .prop_map(str::to_string),
        3 => "[a-zA-Z]{1,12}",
        2 => "\\PC{1,6}",
        1 => "[0-9]{1,6}",
        2 => "[!-/:-@\\[-`{-~]{1,3}",
        3 => "[ \t\n\r\u{a0}\u{2003}\u{3000}\u{0b}\u{0c}]{1,3}",
        1 => "[\u{1}-\u{8}\u{e}-\u{1f}\u{7f}\u{200b}\u{feff}\u{300}-\u{36f}]{1,2}",
        1 => "\\p{Han}{1,4}",
        1 => "\\p{Arabic}{1,4}",
        1 => "[\u{ac00}-\u{d7a3}]{1,4}",
    ];
    prop::collection::vec(piece, 0..30).prop_map(|pieces| pieces.concat())
}

/// Both shapes, loaded once for all cases.
fn both_shapes() -> &'static (tempfile::TempDir, PairTokenizer, PairTokenizer) {
    static SHAPES: OnceLock<(tempfile::TempDir, PairTokenizer, PairTokenizer)> = OnceLock::new();
    SHAPES.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let published = published_shape(dir.path());
        (dir, current_shape(), published)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]
    #[test]
    fn random_text_matches_the_tokenizer_in_both_shapes(text in any_text()) {
        let (_, current, published) = both_shapes();
        assert_same(current, &text);
        assert_same(published, &text);
    }
}
