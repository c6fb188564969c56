//! The architecture table: config.json's `architectures[0]` to the file that builds it. Adding an architecture is
//! its file, its `mod` line and its row here.

pub mod bert;
pub mod deberta;
pub mod decoder_rerankers;
pub mod electra;
mod encoder;
pub mod gte;
pub mod modernbert;
pub mod qwen;
pub mod xlm_roberta;

use super::build_own;
use super::registry::Architecture;

/// Every architecture, in the order README lists them.
pub static ARCHITECTURES: &[Architecture] = &[
    row("BertForSequenceClassification", bert::build),
    row("XLMRobertaForSequenceClassification", xlm_roberta::build),
    row("RobertaForSequenceClassification", xlm_roberta::build),
    row("ElectraForSequenceClassification", electra::build),
    row(deberta::ARCHITECTURE, build_own::<deberta::Deberta>),
    row(
        modernbert::ARCHITECTURE,
        build_own::<modernbert::ModernBert>,
    ),
    row(gte::ARCHITECTURE, build_own::<gte::Gte>),
    row(decoder_rerankers::CAUSAL_LM, decoder_rerankers::build),
    row(
        decoder_rerankers::SEQUENCE_CLASSIFICATION,
        decoder_rerankers::build,
    ),
    row(decoder_rerankers::QWEN2_CAUSAL_LM, decoder_rerankers::build),
    row(decoder_rerankers::GEMMA_CAUSAL_LM, decoder_rerankers::build),
];

const fn row(name: &'static str, build: super::registry::Builder) -> Architecture {
    Architecture { name, build }
}
