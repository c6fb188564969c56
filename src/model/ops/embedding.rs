//! Token embeddings: the sum of word, position and token-type rows, then LayerNorm.

use candle_core::{DType, Result, Tensor};

#[cfg(feature = "cuda")]
use super::cuda;
use super::{Hidden, LayerNorm};

/// Sum of the word, position and token-type embeddings of each token, then LayerNorm. All id tensors: [tokens].
/// The result's `input` has the dtype of the tables.
pub fn embed(
    tables: &EmbeddingTables,
    input_ids: &Tensor,
    position_ids: &Tensor,
    type_ids: Option<&Tensor>,
    norm: &LayerNorm,
) -> Result<Hidden> {
    #[cfg(feature = "cuda")]
    if let (true, Some(type_ids)) = (input_ids.device().is_cuda(), type_ids) {
        if let Some(hidden) = cuda::embed(tables, input_ids, position_ids, type_ids, norm) {
            return hidden;
        }
    }
    let as_f32 = |t: Tensor| t.to_dtype(DType::F32);
    let mut sum = as_f32(tables.word.index_select(input_ids, 0)?)?
        .add(&as_f32(tables.position.index_select(position_ids, 0)?)?)?;
    if let (Some(table), Some(ids)) = (&tables.token_type, type_ids) {
        sum = sum.add(&as_f32(table.index_select(ids, 0)?)?)?;
    }
    Hidden::from_residual(norm.forward(&sum)?, tables.word.dtype())
}

/// The embedding matrices of an encoder, [rows, hidden] each.
#[derive(Debug, Clone)]
pub struct EmbeddingTables {
    pub word: Tensor,
    pub position: Tensor,
    pub token_type: Option<Tensor>,
}
