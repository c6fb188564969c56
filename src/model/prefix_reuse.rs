//! Prompt prefixes reused across pairs and batches, as a wrapper over a decoder: the leading tokens every pair of
//! a batch shares (the prompt, the instruction, usually the query) are computed once, or taken from an earlier
//! batch that computed them (`PrefixCache`), and each pair's own tokens attend to their keys and values. Causal
//! attention makes the result the same as computing every pair whole.

use candle_core::{Result, Tensor};

use super::prefix_cache::{self, KeysValues, PrefixCache, PrefixCacheStats, MIN_PREFIX};
use super::{CrossEncoder, PackedBatch};

/// A decoder that runs a batch after a shared prefix whose keys and values it is given.
pub trait PrefixRun: Send + Sync {
    /// The layers over `batch`, whose sequences sit at positions `offset..` after the cached keys and values of
    /// a prefix they all share (one pair per layer). Returns each sequence's score (unless `scores` is false) and,
    /// for each layer, the keys and values of the first `capture` tokens of the batch's first sequence.
    fn run(
        &self,
        batch: &PackedBatch,
        offset: usize,
        prefix: Option<&[KeysValues]>,
        scores_and_capture: (bool, usize),
    ) -> Result<(Option<Tensor>, Vec<KeysValues>)>;

    /// Bytes the keys and values of one token take over all layers (what the cache holds per token).
    fn kv_bytes_per_token(&self) -> usize;

    /// Layers whose keys and values a run captures when it runs them all.
    fn layer_count(&self) -> usize;
}

/// `D` with its prompt prefixes reused (see the module).
pub struct PrefixReuse<D> {
    decoder: D,
    cache: PrefixCache,
    /// The most leading tokens of one sequence the cache keeps.
    cacheable_tokens: usize,
}

impl<D: PrefixRun> PrefixReuse<D> {
    pub fn new(decoder: D) -> Self {
        let cache = PrefixCache::new(prefix_cache::DEFAULT_BUDGET);
        let cacheable_tokens = cache.tokens_within(decoder.kv_bytes_per_token());
        Self {
            decoder,
            cache,
            cacheable_tokens,
        }
    }
}

impl<D: PrefixRun> PrefixReuse<D> {
    /// A cached run `ids` start with; a cache that fails (a device out of memory) costs only the reuse.
    fn lookup(&self, ids: &[u32]) -> Option<(usize, Vec<KeysValues>)> {
        self.cache.lookup(ids).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "prefix cache lookup failed; computing the whole prompt");
            None
        })
    }

    /// Keeps a computed run for later batches; a failure to keep it costs only the reuse. A run that stopped
    /// before the last layer (a layerwise exit) is not kept: a later batch may need the layers it skipped.
    fn keep(&self, ids: &[u32], layers: Vec<KeysValues>) {
        if layers.len() < self.decoder.layer_count() {
            return;
        }
        if let Err(e) = self.cache.insert(ids, layers, false) {
            tracing::warn!(error = %e, "prefix cache insert failed");
        }
    }
}

/// The longest run of leading tokens every sequence of the batch shares, keeping at least one token of each
/// sequence apart (its last token gives its score); for one sequence, all but its last token.
fn common_run(batch: &PackedBatch) -> usize {
    let mut rows = batch.rows().map(|(ids, _)| ids);
    let Some(first) = rows.next() else {
        return 0;
    };
    rows.fold(first.len().saturating_sub(1), |shared, ids| {
        let common = first.iter().zip(ids).take_while(|(a, b)| a == b).count();
        shared.min(common).min(ids.len().saturating_sub(1))
    })
}

impl<D: PrefixRun> CrossEncoder for PrefixReuse<D> {
    /// The leading tokens every pair of the batch shares (the prompt, the instruction, usually the query) are
    /// computed once, or taken from an earlier batch that computed them (the prefix cache), and each pair's own
    /// tokens attend to their keys and values: causal attention makes the result the same as computing every
    /// pair whole. What a batch computes from the start is kept for the batches after it.
    fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let shared = common_run(batch);
        let (first, first_types) = batch.rows().next().unwrap_or((&[], &[]));
        // What is worth keeping for the request's other pairs: the first segment (prompt, instruction, query) where
        // the tokenizer marks it with type id 1, else the whole first sequence.
        let segment = first_types.iter().take_while(|&&t| t == 1).count();
        let worth_keeping = match segment >= MIN_PREFIX {
            true => segment,
            false => first.len(),
        }
        .min(self.cacheable_tokens);
        let cached = match shared >= MIN_PREFIX {
            true => self.lookup(&first[..shared]),
            false => None,
        };
        let scores = match cached {
            // Pairs that share more than was cached (a new query after a cached prompt): that part once, kept.
            Some((len, kvs)) if batch.size() > 1 && shared > len => {
                let (part, _) = split_prefix(&split_prefix(batch, len).1, shared - len);
                let (_, more) = self
                    .decoder
                    .run(&part, len, Some(&kvs), (false, shared - len))?;
                let longer = extend(&kvs, &more)?;
                self.keep(&first[..shared], longer.clone());
                let (_, suffixes) = split_prefix(batch, shared);
                self.decoder
                    .run(&suffixes, shared, Some(&longer), (true, 0))?
                    .0
            }
            Some((len, kvs)) => {
                // One pair: what it computes after the cached run is kept as far as the cache takes it.
                let capture = shared.min(worth_keeping).saturating_sub(len);
                let (_, suffixes) = split_prefix(batch, len);
                let (scores, own) =
                    self.decoder
                        .run(&suffixes, len, Some(&kvs), (true, capture))?;
                if capture > 0 {
                    self.keep(&first[..len + capture], extend(&kvs, &own)?);
                }
                scores
            }
            None if shared >= MIN_PREFIX && batch.size() > 1 => {
                let (prefix, suffixes) = split_prefix(batch, shared);
                let (_, kvs) = self.decoder.run(&prefix, 0, None, (false, shared))?;
                self.keep(&prefix.input_ids, kvs.clone());
                self.decoder
                    .run(&suffixes, shared, Some(&kvs), (true, 0))?
                    .0
            }
            None => {
                // Another batch of the same request will share this pair's prompt.
                let capture = match worth_keeping >= MIN_PREFIX {
                    true => worth_keeping,
                    false => 0,
                };
                let (scores, kvs) = self.decoder.run(batch, 0, None, (true, capture))?;
                if capture > 0 {
                    self.keep(&first[..capture], kvs);
                }
                scores
            }
        };
        scores.ok_or_else(|| candle_core::Error::Msg("no scores from the decoder".into()))
    }

    fn clear_prefix_cache(&self) {
        self.cache.clear();
    }

    fn prefix_cache_stats(&self) -> Option<PrefixCacheStats> {
        Some(self.cache.stats())
    }
}

/// Each layer's cached keys and values followed by those computed after them.
fn extend(cached: &[KeysValues], computed: &[KeysValues]) -> Result<Vec<KeysValues>> {
    cached
        .iter()
        .zip(computed)
        .map(|((ck, cv), (k, v))| Ok((Tensor::cat(&[ck, k], 0)?, Tensor::cat(&[cv, v], 0)?)))
        .collect()
}

/// The shared prefix as a batch of one sequence, and every sequence's tokens after it.
fn split_prefix(batch: &PackedBatch, shared: usize) -> (PackedBatch, PackedBatch) {
    let rows: Vec<(&[u32], &[u32])> = batch.rows().collect();
    let prefix = PackedBatch::from_sequences(
        rows.iter()
            .take(1)
            .map(|(ids, types)| (&ids[..shared], &types[..shared])),
    );
    let mut suffixes = PackedBatch::from_sequences(
        rows.iter()
            .map(|(ids, types)| (&ids[shared..], &types[shared..])),
    );
    suffixes.exit_layers = batch.exit_layers.clone();
    (prefix, suffixes)
}
