//! The batching policy: pending pairs in length buckets, fair turns between requests, and when to cut a batch.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use super::cost::{BatchPolicy, BatchShape, Fill};
use crate::batch::{Batch, Pair, RequestId};

/// Pairs of one request inside one bucket, oldest first.
#[derive(Debug)]
struct Lane {
    request: RequestId,
    pairs: VecDeque<Pair>,
}

/// Pending pairs whose lengths fall in (previous bound, bound].
#[derive(Debug)]
struct Bucket {
    bound: usize,
    /// One lane per request; the front lane gives the next pair when the bucket is drained round-robin.
    lanes: VecDeque<Lane>,
    count: usize,
}

impl Bucket {
    fn oldest(&self) -> Option<Instant> {
        self.lanes
            .iter()
            .filter_map(|lane| lane.pairs.front())
            .map(|p| p.enqueued_at)
            .min()
    }

    /// Enough pairs to fill a batch by size or by cost (at the bucket's bound, an upper bound).
    fn is_full(&self, policy: &BatchPolicy, shape: BatchShape) -> bool {
        self.count >= policy.max_batch_size
            || self.count.saturating_mul(shape.pair_cost(self.bound)) >= policy.max_batch_tokens
    }

    /// Full, or its oldest pair has waited max_wait; or, with `eager` (an idle engine), any pair at all.
    fn is_ready(&self, policy: &BatchPolicy, shape: BatchShape, now: Instant, eager: bool) -> bool {
        self.count > 0
            && (eager
                || self.is_full(policy, shape)
                || self
                    .oldest()
                    .is_some_and(|t| now.saturating_duration_since(t) >= policy.max_wait))
    }

    fn lane_position(&self, request: RequestId) -> Option<usize> {
        self.lanes.iter().position(|lane| lane.request == request)
    }
}

/// Per-request bookkeeping: how many of its pairs wait, and in which buckets.
#[derive(Debug)]
struct RequestEntry {
    queued: usize,
    /// Real tokens of those pairs.
    tokens: usize,
    per_bucket: Vec<usize>,
}

/// The scheduler's pending pairs and the policy that turns them into batches. Pure logic: time comes in as
/// arguments, so behaviour is deterministic under test.
#[derive(Debug)]
pub struct BatchQueue {
    /// The configured policy.
    policy: BatchPolicy,
    /// The policy in force: the configured one with the token budget of the current batch time.
    active: BatchPolicy,
    shape: BatchShape,
    buckets: Vec<Bucket>,
    requests: HashMap<RequestId, RequestEntry>,
    /// Requests with queued pairs; the front one anchors the next batch, then goes to the back.
    turns: VecDeque<RequestId>,
    queued: usize,
    queued_tokens: usize,
    /// The engine has nothing to compute: waiting for a fuller batch would only leave it idle, so any pending
    /// pair is ready at once (the latency path of a lone small request).
    engine_idle: bool,
    /// Batches cut since start: the last batch's id.
    batches_cut: u64,
    /// Pairs of cancelled requests dropped instead of computed, not yet collected by `take_dropped`.
    dropped: usize,
}

/// Largest padded/real token ratio a batch may reach when it is topped up from other buckets.
const COALESCE_MAX_PADDING: f64 = 1.3;

/// Bucket indices other than `anchor`, nearest first (the shorter one first at equal distance).
fn nearest_first(anchor: usize, buckets: usize) -> impl Iterator<Item = usize> {
    (1..buckets).flat_map(move |distance| {
        let below = anchor.checked_sub(distance);
        let above = (anchor + distance < buckets).then_some(anchor + distance);
        below.into_iter().chain(above)
    })
}

/// Bucket bounds from 16 tokens up to max_length, each at most about 25% above the previous, multiples of 8,
/// so padding inside a bucket wastes at most about a fifth of the tokens.
pub fn bucket_bounds(max_length: usize) -> Vec<usize> {
    let mut bounds = Vec::new();
    let mut bound = 16;
    while bound < max_length {
        bounds.push(bound);
        bound += ((bound / 4) & !7).max(8);
    }
    bounds.push(max_length.max(1));
    bounds
}

impl BatchQueue {
    pub fn new(policy: BatchPolicy, max_length: usize, shape: BatchShape) -> Self {
        let buckets = bucket_bounds(max_length)
            .into_iter()
            .map(|bound| Bucket {
                bound,
                lanes: VecDeque::new(),
                count: 0,
            })
            .collect();
        Self {
            policy,
            active: policy,
            shape,
            buckets,
            requests: HashMap::new(),
            turns: VecDeque::new(),
            queued: 0,
            queued_tokens: 0,
            engine_idle: false,
            batches_cut: 0,
            dropped: 0,
        }
    }

    pub fn policy(&self) -> &BatchPolicy {
        &self.policy
    }

    /// Sets the cost the next batches may reach (what the engine computes in the target batch time),
    /// within max_batch_tokens. A bucket holding that much is cut at once.
    pub fn set_token_budget(&mut self, tokens: usize) {
        self.active.max_batch_tokens = tokens.clamp(1, self.policy.max_batch_tokens);
    }

    /// Whether the engine is idle (see `engine_idle`); until told, the queue assumes it is busy.
    pub fn set_engine_idle(&mut self, idle: bool) {
        self.engine_idle = idle;
    }

    /// Pairs waiting.
    pub fn len(&self) -> usize {
        self.queued
    }

    /// Real tokens of the pairs waiting.
    pub fn queued_tokens(&self) -> usize {
        self.queued_tokens
    }

    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Pairs of `request` waiting.
    pub fn queued_for(&self, request: RequestId) -> usize {
        self.requests.get(&request).map_or(0, |entry| entry.queued)
    }

    fn bucket_of(&self, len: usize) -> usize {
        self.buckets
            .partition_point(|b| b.bound < len)
            .min(self.buckets.len() - 1)
    }

    pub fn push(&mut self, pair: Pair) {
        let bucket_index = self.bucket_of(pair.len());
        let request = pair.request.id;
        let bucket_count = self.buckets.len();
        let entry = self
            .requests
            .entry(request)
            .or_insert_with(|| RequestEntry {
                queued: 0,
                tokens: 0,
                per_bucket: vec![0; bucket_count],
            });
        if entry.queued == 0 {
            self.turns.push_back(request);
        }
        entry.queued += 1;
        entry.tokens += pair.len();
        self.queued_tokens += pair.len();
        entry.per_bucket[bucket_index] += 1;
        let bucket = &mut self.buckets[bucket_index];
        match bucket.lane_position(request) {
            Some(i) => bucket.lanes[i].pairs.push_back(pair),
            None => bucket.lanes.push_back(Lane {
                request,
                pairs: VecDeque::from([pair]),
            }),
        }
        bucket.count += 1;
        self.queued += 1;
    }

    /// Drops every pending pair of `request`; returns how many.
    pub fn cancel(&mut self, request: RequestId) -> usize {
        let Some(entry) = self.requests.remove(&request) else {
            return 0;
        };
        for (bucket, &count) in self.buckets.iter_mut().zip(&entry.per_bucket) {
            if count > 0 {
                bucket.lanes.retain(|lane| lane.request != request);
                bucket.count -= count;
            }
        }
        self.turns.retain(|&r| r != request);
        self.queued -= entry.queued;
        self.queued_tokens -= entry.tokens;
        self.dropped += entry.queued;
        entry.queued
    }

    /// Pairs dropped for cancelled requests since the last call.
    pub fn take_dropped(&mut self) -> usize {
        std::mem::take(&mut self.dropped)
    }

    /// Whether some bucket is ready to be cut at `now`.
    pub fn has_ready(&self, now: Instant) -> bool {
        self.buckets
            .iter()
            .any(|b| b.is_ready(&self.active, self.shape, now, self.engine_idle))
    }

    /// The earliest time a not-yet-ready bucket becomes due by max_wait.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.buckets
            .iter()
            .filter_map(Bucket::oldest)
            .min()
            .map(|t| t + self.active.max_wait)
    }

    /// Cuts the next batch if a bucket is ready. Requests take turns anchoring batches: the first request in
    /// turn order that has pairs in a ready bucket picks the bucket holding its oldest such pair, and the batch
    /// is filled round-robin across all requests in that bucket. So a huge request cannot starve a small one.
    /// A batch with budget left is topped up from the nearest other buckets while padding stays within
    /// COALESCE_MAX_PADDING: a sparse queue then runs as a few larger batches instead of one small batch per
    /// bucket, since every batch costs a fixed overhead on the device.
    pub fn cut(&mut self, now: Instant) -> Option<Batch> {
        loop {
            let (turn, bucket_index) = self.anchor(now)?;
            if let Some(request) = self.turns.remove(turn) {
                self.turns.push_back(request);
            }
            let mut fill = Fill::new(self.shape);
            self.take_from_bucket(bucket_index, &mut fill, None);
            for neighbour in nearest_first(bucket_index, self.buckets.len()) {
                if fill.pairs.is_empty() || !fill.has_room(&self.active) {
                    break;
                }
                if self.buckets[neighbour].count > 0 {
                    self.take_from_bucket(neighbour, &mut fill, Some(COALESCE_MAX_PADDING));
                }
            }
            if !fill.pairs.is_empty() {
                let pairs = fill.pairs;
                let inputs = crate::batch::pack(&pairs);
                self.batches_cut += 1;
                return Some(Batch {
                    id: self.batches_cut,
                    cost: self.shape.batch_cost(&inputs),
                    device_tokens: self.shape.device_tokens(&inputs),
                    pairs,
                    inputs,
                });
            }
            // Everything taken belonged to cancelled requests: look again.
        }
    }

    /// (position in turn order, bucket) of the next batch's anchor.
    fn anchor(&self, now: Instant) -> Option<(usize, usize)> {
        let ready: Vec<bool> = self
            .buckets
            .iter()
            .map(|b| b.is_ready(&self.active, self.shape, now, self.engine_idle))
            .collect();
        self.turns.iter().enumerate().find_map(|(turn, request)| {
            let entry = self.requests.get(request)?;
            let bucket = (0..self.buckets.len())
                .filter(|&b| ready[b] && entry.per_bucket[b] > 0)
                .min_by_key(|&b| {
                    let bucket = &self.buckets[b];
                    bucket
                        .lane_position(*request)
                        .and_then(|i| bucket.lanes[i].pairs.front())
                        .map(|p| p.enqueued_at)
                })?;
            Some((turn, bucket))
        })
    }

    /// Takes pairs from a bucket round-robin over its lanes (the anchor's lane is first) into `fill` until the
    /// next pair would break the size or token budget, or raise the padding ratio above `max_padding`. Pairs of
    /// cancelled requests are dropped, not batched.
    fn take_from_bucket(&mut self, bucket_index: usize, fill: &mut Fill, max_padding: Option<f64>) {
        let policy = self.active;
        let anchor = self.turns.back().copied();
        let bucket = &mut self.buckets[bucket_index];
        if let Some(position) = anchor.and_then(|r| bucket.lane_position(r)) {
            bucket.lanes.rotate_left(position);
        }
        let mut taken: Vec<(RequestId, usize)> = Vec::new();
        let mut dropped = 0;
        while let Some(mut lane) = bucket.lanes.pop_front() {
            let Some(pair) = lane.pairs.front() else {
                continue;
            };
            if pair.request.is_cancelled() {
                dropped += lane.pairs.len();
                taken.extend(lane.pairs.iter().map(|p| (lane.request, p.len())));
                bucket.count -= lane.pairs.len();
                continue;
            }
            if !fill.accepts(pair.len(), &policy, max_padding) {
                bucket.lanes.push_front(lane);
                break;
            }
            if let Some(pair) = lane.pairs.pop_front() {
                taken.push((lane.request, pair.len()));
                fill.push(pair);
                bucket.count -= 1;
            }
            if !lane.pairs.is_empty() {
                bucket.lanes.push_back(lane);
            }
        }
        self.dropped += dropped;
        for (request, len) in taken {
            self.forget_one(request, bucket_index, len);
        }
    }

    fn forget_one(&mut self, request: RequestId, bucket_index: usize, len: usize) {
        self.queued -= 1;
        self.queued_tokens -= len;
        if let Some(entry) = self.requests.get_mut(&request) {
            entry.queued -= 1;
            entry.tokens -= len;
            entry.per_bucket[bucket_index] -= 1;
            if entry.queued == 0 {
                self.requests.remove(&request);
                self.turns.retain(|&r| r != request);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::RequestHandle;
    use crate::tokenization::PairTokens;
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    fn policy(tokens: usize, size: usize, wait_ms: u64) -> BatchPolicy {
        BatchPolicy {
            max_batch_tokens: tokens,
            max_batch_size: size,
            max_wait: Duration::from_millis(wait_ms),
        }
    }

    fn pair(request: &Arc<RequestHandle>, index: u32, len: usize, at: Instant) -> Pair {
        let tokens = PairTokens {
            input_ids: vec![7; len],
            type_ids: vec![0; len],
        };
        Pair {
            request: Arc::clone(request),
            index,
            tokens,
            enqueued_at: at,
        }
    }

    fn request(id: RequestId) -> Arc<RequestHandle> {
        let (handle, receiver) = RequestHandle::new(id);
        std::mem::forget(receiver); // keep the sink open: a closed sink reads as cancelled
        handle
    }

    fn drain(queue: &mut BatchQueue, now: Instant) -> Vec<Batch> {
        std::iter::from_fn(|| queue.cut(now)).collect()
    }

    #[test]
    fn an_idle_engine_takes_a_lone_request_at_once_and_a_busy_one_waits_max_wait() {
        let t0 = Instant::now();
        let mut queue = BatchQueue::new(
            policy(4096, 64, 5),
            512,
            BatchShape::Packed {
                attention_span: 1920,
            },
        );
        let r = request(1);
        for (i, len) in [12, 40, 200].into_iter().enumerate() {
            queue.push(pair(&r, i as u32, len, t0));
        }
        assert!(
            !queue.has_ready(t0),
            "a busy engine: the batch may still fill for max_wait"
        );
        assert!(queue.has_ready(t0 + 5 * MS));
        queue.set_engine_idle(true);
        assert!(queue.has_ready(t0), "an idle engine: nothing to wait for");
        let batch = queue.cut(t0).expect("a batch");
        assert_eq!(batch.pairs.len(), 3, "the small request runs in one batch");
        assert!(queue.is_empty());
    }

    #[test]
    fn bounds_grow_by_at_most_a_quarter_and_end_at_max_length() {
        let bounds = bucket_bounds(512);
        assert_eq!(bounds.first(), Some(&16));
        assert_eq!(bounds.last(), Some(&512));
        assert!(bounds
            .windows(2)
            .all(|w| w[1] > w[0] && (w[1] - w[0]) * 4 <= w[0].max(32)));
        assert_eq!(bucket_bounds(8), vec![8]);
        assert_eq!(bucket_bounds(8194).last(), Some(&8194));
    }

    #[test]
    fn budget_and_size_are_never_exceeded() {
        let t0 = Instant::now();
        let mut queue = BatchQueue::new(policy(1000, 16, 5), 512, BatchShape::Padded);
        let r = request(1);
        let mut seed = 17u64;
        for i in 0..600 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            queue.push(pair(&r, i, 3 + (seed >> 33) as usize % 300, t0));
        }
        let batches = drain(&mut queue, t0 + 10 * MS);
        assert_eq!(batches.iter().map(|b| b.pairs.len()).sum::<usize>(), 600);
        for batch in &batches {
            assert!(batch.pairs.len() <= 16);
            assert!(
                batch.inputs.padded_tokens() <= 1000,
                "{} padded tokens",
                batch.inputs.padded_tokens()
            );
            assert_eq!(
                batch.inputs.max_len,
                batch.pairs.iter().map(Pair::len).max().unwrap_or(0)
            );
        }
    }

    #[test]
    fn a_pair_longer_than_the_budget_runs_alone() {
        let t0 = Instant::now();
        let mut queue = BatchQueue::new(policy(100, 8, 5), 512, BatchShape::Padded);
        let r = request(1);
        queue.push(pair(&r, 0, 400, t0));
        queue.push(pair(&r, 1, 410, t0));
        assert!(
            queue.has_ready(t0),
            "an over-budget pair is a full batch at once"
        );
        let batches = drain(&mut queue, t0);
        assert_eq!(
            batches.iter().map(|b| b.pairs.len()).collect::<Vec<_>>(),
            vec![1, 1]
        );
    }

    #[test]
    fn long_context_pairs_share_a_batch_only_within_the_budget() {
        let t0 = Instant::now();
        let mut queue = BatchQueue::new(policy(16_384, 64, 5), 8192, BatchShape::Padded);
        let r = request(1);
        for i in 0..3 {
            queue.push(pair(&r, i, 8000, t0));
        }
        queue.push(pair(&r, 3, 8192, t0));
        let sizes: Vec<(usize, usize)> = drain(&mut queue, t0)
            .iter()
            .map(|b| (b.pairs.len(), b.inputs.max_len))
            .collect();
        assert_eq!(sizes.iter().map(|(n, _)| n).sum::<usize>(), 4);
        assert!(sizes.iter().all(|&(n, len)| n * len <= 16_384), "{sizes:?}");
        let mut small_budget = BatchQueue::new(policy(4096, 64, 5), 8192, BatchShape::Padded);
        small_budget.push(pair(&r, 0, 8192, t0));
        assert!(
            small_budget.has_ready(t0),
            "a pair over the budget is ready at once and runs alone"
        );
        assert_eq!(small_budget.cut(t0).map(|b| b.pairs.len()), Some(1));
    }

    #[test]
    fn max_wait_is_honoured() {
        let t0 = Instant::now();
        let mut queue = BatchQueue::new(policy(10_000, 64, 5), 512, BatchShape::Padded);
        let r = request(1);
        queue.push(pair(&r, 0, 20, t0));
        assert!(
            !queue.has_ready(t0 + 4 * MS),
            "a lone pair waits for company until max_wait"
        );
        assert!(queue.cut(t0 + 4 * MS).is_none());
        assert_eq!(queue.next_deadline(), Some(t0 + 5 * MS));
        assert!(queue.has_ready(t0 + 5 * MS));
        let batch = queue.cut(t0 + 5 * MS).expect("due at max_wait");
        assert_eq!(batch.pairs.len(), 1);
        assert!(queue.is_empty() && queue.next_deadline().is_none());
    }

    #[test]
    fn the_token_budget_of_the_batch_time_sizes_batches_within_max_batch_tokens() {
        let t0 = Instant::now();
        let mut queue = BatchQueue::new(policy(10_000, 64, 1000), 512, BatchShape::Padded);
        let r = request(1);
        for i in 0..40 {
            queue.push(pair(&r, i, 100, t0));
        }
        queue.set_token_budget(1000);
        assert!(
            queue.has_ready(t0),
            "a bucket holding the budget is cut at once"
        );
        let batch = queue.cut(t0).expect("batch");
        assert_eq!(batch.pairs.len(), 10, "1,000 tokens of 100-token pairs");
        queue.set_token_budget(1_000_000);
        let batch = queue.cut(t0 + Duration::from_secs(1)).expect("batch");
        assert_eq!(
            batch.pairs.len(),
            30,
            "the rest, within max_batch_tokens 10,000"
        );
        queue.set_token_budget(0);
        queue.push(pair(&r, 40, 300, t0));
        assert_eq!(
            queue.cut(t0).map(|b| b.pairs.len()),
            Some(1),
            "a pair longer than the budget still runs, alone"
        );
    }

    #[test]
    fn a_full_bucket_is_cut_without_waiting() {
        let t0 = Instant::now();
        let mut queue = BatchQueue::new(policy(10_000, 4, 1000), 512, BatchShape::Padded);
        let r = request(1);
        for i in 0..4 {
            queue.push(pair(&r, i, 30, t0));
        }
        let batch = queue.cut(t0).expect("full by size");
        assert_eq!(batch.pairs.len(), 4);
    }

    #[test]
    fn pairs_are_grouped_by_length() {
        let t0 = Instant::now();
        let mut queue = BatchQueue::new(policy(100_000, 64, 0), 512, BatchShape::Padded);
        let r = request(1);
        for i in 0..20 {
            queue.push(pair(&r, i, if i % 2 == 0 { 10 } else { 300 }, t0));
        }
        let batches = drain(&mut queue, t0);
        assert_eq!(batches.len(), 2);
        for batch in &batches {
            assert_eq!(
                batch.inputs.padded_tokens(),
                batch.inputs.real_tokens(),
                "no padding across lengths"
            );
        }
    }

    #[test]
    fn a_sparse_queue_is_coalesced_into_few_batches_with_bounded_padding() {
        let t0 = Instant::now();
        let mut queue = BatchQueue::new(policy(65_536, 512, 2), 512, BatchShape::Padded);
        let r = request(1);
        // One request of 100 documents spread over 51..499 tokens: about one pair per bucket.
        for i in 0..100u32 {
            queue.push(pair(&r, i, 51 + (i as usize * 179) % 449, t0));
        }
        let buckets_used = (0..100usize)
            .map(|i| queue.bucket_of(51 + (i * 179) % 449))
            .collect::<HashSet<_>>()
            .len();
        let batches = drain(&mut queue, t0 + 2 * MS);
        assert_eq!(batches.iter().map(|b| b.pairs.len()).sum::<usize>(), 100);
        assert!(
            batches.len() * 2 <= buckets_used,
            "{} batches for {buckets_used} buckets",
            batches.len()
        );
        for batch in &batches {
            let ratio = batch.inputs.padded_tokens() as f64 / batch.inputs.real_tokens() as f64;
            assert!(
                ratio <= COALESCE_MAX_PADDING + 1e-9,
                "padding ratio {ratio}"
            );
            assert!(batch.inputs.padded_tokens() <= 65_536);
        }
    }

    #[test]
    fn a_small_request_is_not_starved_by_a_huge_one() {
        let t0 = Instant::now();
        let mut queue = BatchQueue::new(policy(100_000, 32, 2), 512, BatchShape::Padded);
        let (huge, small) = (request(1), request(2));
        for i in 0..5000 {
            queue.push(pair(&huge, i, 16 + (i as usize * 7) % 400, t0));
        }
        for i in 0..10 {
            queue.push(pair(&small, i, 16 + (i as usize * 37) % 400, t0 + MS));
        }
        let mut batches_until_small_done = 0;
        let now = t0 + 10 * MS;
        while queue.queued_for(2) > 0 {
            queue.cut(now).expect("work remains");
            batches_until_small_done += 1;
        }
        // The small request spans at most 10 buckets and anchors every other batch.
        assert!(
            batches_until_small_done <= 20,
            "small request waited {batches_until_small_done} batches"
        );
        assert!(
            queue.len() > 4000,
            "the huge request is still mostly queued"
        );
    }

    #[test]
    fn cancelled_requests_are_dropped_before_batching() {
        let t0 = Instant::now();
        let mut queue = BatchQueue::new(policy(100_000, 64, 0), 512, BatchShape::Padded);
        let (keep, gone, flagged) = (request(1), request(2), request(3));
        for i in 0..10 {
            queue.push(pair(&keep, i, 40, t0));
            queue.push(pair(&gone, i, 40, t0));
            queue.push(pair(&flagged, i, 40, t0));
        }
        assert_eq!(queue.cancel(2), 10);
        assert_eq!(queue.cancel(2), 0);
        assert_eq!(queue.take_dropped(), 10);
        flagged.cancel(); // flagged but not yet removed: must still never reach a batch
        let mut seen = Vec::new();
        while let Some(batch) = queue.cut(t0) {
            seen.extend(batch.pairs.iter().map(|p| p.request.id));
        }
        assert_eq!(
            queue.take_dropped(),
            10,
            "flagged pairs are counted even when no batch follows"
        );
        assert_eq!(seen, vec![1; 10]);
        assert!(queue.is_empty());
    }

    #[test]
    fn every_pair_leaves_exactly_once_under_interleaved_pushes() {
        let t0 = Instant::now();
        let mut queue = BatchQueue::new(policy(2048, 24, 3), 256, BatchShape::Padded);
        let requests: Vec<_> = (0..7).map(request).collect();
        let mut expected = HashSet::new();
        let mut seen = HashSet::new();
        let mut seed = 99u64;
        for step in 0..400u32 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = &requests[(seed >> 40) as usize % requests.len()];
            let now = t0 + Duration::from_micros(step as u64 * 300);
            queue.push(pair(r, step, 1 + (seed >> 20) as usize % 256, now));
            expected.insert((r.id, step));
            if step % 3 == 0 {
                if let Some(batch) = queue.cut(now) {
                    for p in batch.pairs {
                        assert!(seen.insert((p.request.id, p.index)), "pair computed twice");
                    }
                }
            }
        }
        for batch in drain(&mut queue, t0 + Duration::from_secs(1)) {
            for p in batch.pairs {
                assert!(seen.insert((p.request.id, p.index)), "pair computed twice");
            }
        }
        assert_eq!(seen, expected);
    }
}
