//! Property tests of the batching policy: for random arrivals, sizes, cancellations (a passed deadline or a
//! client that went away cancels its request the same way) and cut times, every pair is computed at most once,
//! every pair of a live request exactly once, and no batch breaks its budget.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rerank_server::batch::{Pair, RequestHandle};
use rerank_server::scheduler::{BatchPolicy, BatchQueue, BatchShape};
use rerank_server::tokenization::PairTokens;

#[derive(Debug, Clone)]
enum Op {
    Push {
        request: usize,
        len: usize,
        after_us: u64,
    },
    Cancel {
        request: usize,
    },
    Cut {
        after_us: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..6usize, 1..600usize, 0..3000u64).prop_map(|(request, len, after_us)| Op::Push { request, len, after_us }),
        1 => (0..6usize).prop_map(|request| Op::Cancel { request }),
        3 => (0..4000u64).prop_map(|after_us| Op::Cut { after_us }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn pairs_are_computed_once_and_batches_keep_their_budget(
        ops in prop::collection::vec(op(), 1..300),
        max_batch_tokens in 256..4096usize,
        max_batch_size in 1..64usize,
        max_wait_us in 0..5000u64,
    ) {
        let policy = BatchPolicy { max_batch_tokens, max_batch_size, max_wait: Duration::from_micros(max_wait_us) };
        let mut queue = BatchQueue::new(policy, 512, BatchShape::Padded);
        let handles: Vec<_> = (0..6).map(|id| RequestHandle::new(id as u64)).collect();
        let mut now = Instant::now();
        let mut next_index: HashMap<usize, u32> = HashMap::new();
        let mut pushed: HashSet<(u64, u32)> = HashSet::new();
        let mut computed: HashSet<(u64, u32)> = HashSet::new();
        let mut cancelled: HashSet<u64> = HashSet::new();

        let take_batch = |queue: &mut BatchQueue, at: Instant, computed: &mut HashSet<(u64, u32)>, cancelled: &HashSet<u64>| -> Result<bool, TestCaseError> {
            let Some(batch) = queue.cut(at) else { return Ok(false) };
            prop_assert!(!batch.pairs.is_empty());
            prop_assert!(batch.pairs.len() <= max_batch_size, "{} pairs", batch.pairs.len());
            prop_assert!(batch.pairs.len() == 1 || batch.inputs.padded_tokens() <= max_batch_tokens,
                "{} padded tokens", batch.inputs.padded_tokens());
            for pair in &batch.pairs {
                prop_assert!(!cancelled.contains(&pair.request.id), "a cancelled request's pair was batched");
                prop_assert!(computed.insert((pair.request.id, pair.index)), "pair computed twice");
            }
            Ok(true)
        };

        for op in ops {
            match op {
                Op::Push { request, len, after_us } => {
                    now += Duration::from_micros(after_us);
                    if cancelled.contains(&(request as u64)) {
                        continue; // a cancelled request sends nothing more
                    }
                    let index = next_index.entry(request).or_insert(0);
                    let tokens = PairTokens { input_ids: vec![1; len], type_ids: vec![0; len] };
                    queue.push(Pair { request: Arc::clone(&handles[request].0), index: *index, tokens, enqueued_at: now });
                    pushed.insert((request as u64, *index));
                    *index += 1;
                }
                Op::Cancel { request } => {
                    cancelled.insert(request as u64);
                    queue.cancel(request as u64);
                }
                Op::Cut { after_us } => {
                    now += Duration::from_micros(after_us);
                    take_batch(&mut queue, now, &mut computed, &cancelled)?;
                }
            }
        }
        let end = now + Duration::from_secs(1);
        while take_batch(&mut queue, end, &mut computed, &cancelled)? {}
        prop_assert!(queue.is_empty());
        let live: HashSet<(u64, u32)> = pushed.iter().copied().filter(|(r, _)| !cancelled.contains(r)).collect();
        prop_assert!(live.is_subset(&computed), "every pair of a live request is computed");
        prop_assert!(computed.is_subset(&pushed));
    }
}
