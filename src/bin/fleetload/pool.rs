//! The requests fleetload sends: made once from seeded text, then sent in turn as gRPC messages and HTTP bodies.

use super::texts::{text, Lcg};
use super::Args;

/// Requests made once and sent again and again (in turn), so that the client spends its CPU on calls, not on
/// making texts: this client shares the machine with the fleet it loads.
pub(super) struct Pool {
    pub(super) queries: Vec<String>,
    pub(super) documents: Vec<Vec<String>>,
    /// The same requests as HTTP JSON bodies.
    pub(super) bodies: Vec<hyper::body::Bytes>,
}

/// Distinct requests in the pool.
pub(super) const POOL: usize = 256;

impl Pool {
    pub(super) fn new(args: &Args) -> Self {
        let mut rng = Lcg(args.seed);
        let (lo, hi) = (args.min_words, args.max_words.max(args.min_words));
        let documents = |rng: &mut Lcg| -> Vec<String> {
            (0..args.documents)
                .map(|_| {
                    let words = lo + rng.below(hi - lo + 1);
                    text(rng, words)
                })
                .collect()
        };
        let (mut queries, mut all) = (Vec::new(), Vec::new());
        for _ in 0..POOL {
            queries.push(text(&mut rng, 8));
            all.push(documents(&mut rng));
        }
        let bodies = queries
            .iter()
            .zip(&all)
            .map(|(query, documents)| {
                let body = serde_json::json!({ "query": query, "documents": documents });
                hyper::body::Bytes::from(body.to_string())
            })
            .collect();
        Self {
            queries,
            documents: all,
            bodies,
        }
    }
}
