//! The architecture table: config.json's `architectures[0]` to the file that builds it. Adding an architecture is
//! its file, its `mod` line and its row here.

pub mod bert;
pub mod deberta;
pub mod decoder;
pub mod decoder_rerankers;
pub mod electra;
mod encoder;
pub mod gemma;
pub mod gte;
pub mod minicpm;
pub mod modernbert;
pub mod qwen2;
pub mod qwen3;
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
    row(qwen3::CAUSAL_LM, qwen3::build),
    row(qwen3::SEQUENCE_CLASSIFICATION, qwen3::build_converted),
    row(qwen2::CAUSAL_LM, qwen2::build),
    row(gemma::CAUSAL_LM, gemma::build),
    row(minicpm::CAUSAL_LM, minicpm::build),
];

const fn row(name: &'static str, build: super::registry::Builder) -> Architecture {
    Architecture { name, build }
}
