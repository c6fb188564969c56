//! Texts a return_documents session holds while its documents are scored, bounded by its window and top_n;
//! and the ranking of the scores.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;

/// Texts a return_documents session holds: the chunks with documents still waiting for scores, and copies of
/// the scored documents that can still be returned (with top_n, only the best top_n so far). So a stream's
/// memory follows its window and top_n, not its length.
#[derive(Default)]
pub(super) struct Documents {
    /// Chunks by the global index of their first document, with how many of their documents are unscored.
    chunks: BTreeMap<usize, (Arc<[String]>, usize)>,
    /// Scored documents that may be returned, by index.
    pub(super) kept: HashMap<u32, String>,
    /// With top_n: the kept documents, worst on top, to know which to drop.
    ranking: BinaryHeap<Reverse<Rank>>,
    /// Bytes of chunks and kept copies, charged to admission.
    pub(super) held_bytes: usize,
}

impl Documents {
    pub(super) fn hold_chunk(&mut self, first_index: usize, documents: Arc<[String]>) {
        let count = documents.len();
        self.chunks.insert(first_index, (documents, count));
    }

    /// Keeps the scored document's text if it can still be returned; returns the bytes no longer held.
    pub(super) fn scored(&mut self, index: u32, score: f32, top_n: usize) -> usize {
        let Some((&first, (chunk, unscored))) =
            self.chunks.range_mut(..=index as usize).next_back()
        else {
            return 0;
        };
        let text = chunk
            .get(index as usize - first)
            .cloned()
            .unwrap_or_default();
        *unscored -= 1;
        let mut freed = 0;
        if *unscored == 0 {
            freed += chunk.iter().map(String::len).sum::<usize>();
            self.chunks.remove(&first);
        }
        self.held_bytes += text.len();
        self.kept.insert(index, text);
        if top_n > 0 {
            self.ranking.push(Reverse(Rank { score, index }));
            if self.ranking.len() > top_n {
                if let Some(Reverse(worst)) = self.ranking.pop() {
                    freed += self.kept.remove(&worst.index).map_or(0, |text| text.len());
                }
            }
        }
        freed
    }
}

/// A scored document's place in the ranking: higher scores first, then lower indices (as `rank` orders).
#[derive(Debug, Clone, Copy)]
struct Rank {
    score: f32,
    index: u32,
}

impl Ord for Rank {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.index.cmp(&self.index))
    }
}

impl PartialOrd for Rank {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Rank {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Rank {}

/// Indices of `scores` highest first (ties by index), the best `top_n` of them (0 = all).
pub(super) fn ranked(scores: &[f32], top_n: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    let by_score = |a: &u32, b: &u32| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then(a.cmp(b))
    };
    let top_n = match top_n {
        0 => order.len(),
        n => n.min(order.len()),
    };
    if top_n < order.len() {
        order.select_nth_unstable_by(top_n, by_score);
        order.truncate(top_n);
    }
    order.sort_unstable_by(by_score);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 20,000 documents of 8 KB stream through in chunks of 1,000 with top_n 5: the texts held stay those of
    /// the open chunk and the best five, never the stream.
    #[test]
    fn a_return_documents_stream_holds_its_window_and_top_n_not_its_length() {
        let mut documents = Documents::default();
        let text = |i: usize| format!("{i:08}").repeat(1024);
        let mut peak = 0;
        let mut charged = 0usize;
        for chunk in 0..20 {
            let first = chunk * 1000;
            let texts: Arc<[String]> = (first..first + 1000).map(text).collect();
            let bytes = texts.iter().map(String::len).sum::<usize>();
            charged += bytes;
            documents.held_bytes += bytes;
            documents.hold_chunk(first, texts);
            for i in first..first + 1000 {
                // Scores rise and fall, so the best five change along the way.
                let score = ((i * 7919) % 10_007) as f32;
                let before = documents.held_bytes;
                let freed = documents.scored(i as u32, score, 5);
                charged += documents.held_bytes - before;
                charged -= freed;
                documents.held_bytes -= freed;
                peak = peak.max(documents.held_bytes);
            }
        }
        assert!(
            peak <= 1000 * 8192 + 6 * 8192,
            "held {peak} bytes at the peak: more than one chunk and the top five"
        );
        assert_eq!(documents.kept.len(), 5);
        assert_eq!(documents.held_bytes, 5 * 8192);
        assert_eq!(charged, documents.held_bytes, "every byte held is charged");
        let mut best: Vec<u32> = (0..20_000u32).collect();
        best.sort_by_key(|&i| std::cmp::Reverse(((i as usize * 7919) % 10_007, u32::MAX - i)));
        let mut kept: Vec<u32> = documents.kept.keys().copied().collect();
        kept.sort_unstable();
        let mut expected = best[..5].to_vec();
        expected.sort_unstable();
        assert_eq!(kept, expected, "the kept texts are those of the best five");
        assert_eq!(documents.kept[&expected[0]], text(expected[0] as usize));
    }
}
