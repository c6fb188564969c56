//! A bounded cache of documents' token ids keyed by their text: retrieval pipelines rerank the same chunks
//! again and again, and tokenizing them (SentencePiece especially) costs host cores.

use std::sync::Arc;

use quick_cache::sync::Cache;
use quick_cache::Weighter;
use tokenizers::Encoding;

use crate::metrics::Metrics;

/// Bytes an entry holds: its text, its ids and a fixed overhead for the entry and its two allocations.
#[derive(Clone)]
struct EntryBytes;

impl Weighter<Arc<str>, Arc<[u32]>> for EntryBytes {
    fn weight(&self, text: &Arc<str>, ids: &Arc<[u32]>) -> u64 {
        (text.len() + 4 * ids.len() + 64) as u64
    }
}

/// Document text → its token ids (no special tokens), within a byte budget; hits and misses go to the metrics.
pub struct DocumentCache {
    entries: Cache<Arc<str>, Arc<[u32]>, EntryBytes>,
    metrics: Arc<Metrics>,
}

impl DocumentCache {
    /// A cache holding at most `bytes` of texts and ids.
    pub fn new(bytes: usize, metrics: Arc<Metrics>) -> Self {
        // Room for entries of about 2 KB each, the weight limit being what bounds it.
        let estimated_items = (bytes / 2048).max(16);
        Self {
            entries: Cache::with_weighter(estimated_items, bytes as u64, EntryBytes),
            metrics,
        }
    }

    /// The document's encoding (type id 1, as the second sequence of a pair), if cached.
    pub fn get(&self, document: &str) -> Option<Encoding> {
        match self.entries.get(document) {
            Some(ids) => {
                self.metrics.token_cache_hits.inc();
                Some(
                    ids.iter()
                        .map(|&id| (id, String::new(), (0, 0), None, 1))
                        .collect(),
                )
            }
            None => {
                self.metrics.token_cache_misses.inc();
                None
            }
        }
    }

    pub fn insert(&self, document: &str, encoding: &Encoding) {
        self.entries
            .insert(Arc::from(document), Arc::from(encoding.get_ids()));
    }

    /// Bytes held now.
    pub fn weight(&self) -> u64 {
        self.entries.weight()
    }
}
