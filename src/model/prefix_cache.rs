//! Keys and values of decoder prompt prefixes, kept across batches within a byte budget: the pairs of one request
//! share the prompt, the instruction and the query but may arrive in batches of their own (on a CPU, often one pair
//! each), and each computes only what follows the longest cached run of its leading tokens. Causal attention makes
//! the keys and values at a position depend only on the tokens up to it, so any matching run is exact.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use candle_core::{Result, Tensor};

/// A layer's keys (after norm and rotary) and values, [tokens, kv_heads, head_dim].
pub type KeysValues = (Tensor, Tensor);

/// The fewest leading tokens worth computing apart (shorter runs are not looked up or kept).
pub const MIN_PREFIX: usize = 16;

/// Bytes of keys and values kept at most (about 1,100 tokens of Qwen3-Reranker-0.6B in fp32).
pub const DEFAULT_BUDGET: usize = 256 << 20;

/// Recently computed runs of leading tokens with every layer's keys and values.
pub struct PrefixCache {
    entries: Mutex<Entries>,
    budget: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Default)]
struct Entries {
    list: Vec<Entry>,
    clock: u64,
}

struct Entry {
    ids: Vec<u32>,
    layers: Vec<KeysValues>,
    bytes: usize,
    last_used: u64,
    /// Lookups that matched it: an entry never matched holds a whole pair, document included.
    hits: u64,
}

/// Lookups that found a cached run, and those that did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixCacheStats {
    pub hits: u64,
    pub misses: u64,
}

impl PrefixCache {
    pub fn new(budget: usize) -> Self {
        Self {
            entries: Mutex::new(Entries::default()),
            budget,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The most tokens one run may keep, for keys and values of `bytes_per_token` (a quarter of the budget).
    pub fn tokens_within(&self, bytes_per_token: usize) -> usize {
        (self.budget / 4) / bytes_per_token.max(1)
    }

    /// Drops every run (after warm-up batches of padding, which no request shares).
    pub fn clear(&self) {
        self.lock().list.clear();
    }

    pub fn stats(&self) -> PrefixCacheStats {
        PrefixCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    /// The longest cached run (at least MIN_PREFIX tokens) that `ids` starts with: its length and every layer's
    /// keys and values for it. A match shorter than the entry it was found in (the prompt and query of a whole
    /// pair kept earlier) is kept as an entry of its own; the longer entry stays for the other pairs of its own
    /// request until it is the least recently used.
    pub fn lookup(&self, ids: &[u32]) -> Result<Option<(usize, Vec<KeysValues>)>> {
        let mut entries = self.lock();
        entries.clock += 1;
        let clock = entries.clock;
        let best = entries
            .list
            .iter()
            .enumerate()
            .map(|(i, entry)| (i, common_prefix(&entry.ids, ids), entry.ids.len()))
            // The longest match; among equal matches, the entry closest to it in length.
            .max_by_key(|&(_, len, size)| (len, std::cmp::Reverse(size)))
            .map(|(i, len, _)| (i, len));
        let Some((index, len)) = best.filter(|&(_, len)| len >= MIN_PREFIX) else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        self.hits.fetch_add(1, Ordering::Relaxed);
        let entry = &mut entries.list[index];
        entry.last_used = clock;
        let layers = narrowed(&entry.layers, len)?;
        if !entries.list.iter().any(|e| e.ids == ids[..len]) {
            let shorter = Entry::new(ids[..len].to_vec(), owned(&layers)?, clock);
            entries.list.push(shorter);
        }
        if let Some(entry) = entries.list.iter_mut().find(|e| e.ids == ids[..len]) {
            entry.hits += 1;
        }
        self.evict(&mut entries, clock);
        Ok(Some((len, layers)))
    }

    /// Keeps `ids` with their keys and values (copied out of larger batch tensors when `copy`), dropping the least
    /// recently used entries past the budget. Of a run over a quarter of the budget only its leading tokens are
    /// kept (where a prompt and query are); runs under MIN_PREFIX tokens are not kept.
    pub fn insert(&self, ids: &[u32], layers: Vec<KeysValues>, copy: bool) -> Result<()> {
        let per_token = size_of(&layers) / ids.len().max(1);
        let keep = ids.len().min((self.budget / 4) / per_token.max(1));
        if keep < MIN_PREFIX {
            return Ok(());
        }
        let (ids, layers) = match (keep < ids.len(), copy) {
            (true, _) => (&ids[..keep], owned(&narrowed(&layers, keep)?)?),
            (false, true) => (ids, owned(&layers)?),
            (false, false) => (ids, layers),
        };
        let mut entries = self.lock();
        entries.clock += 1;
        let clock = entries.clock;
        entries.list.retain(|entry| entry.ids != ids);
        entries.list.push(Entry::new(ids.to_vec(), layers, clock));
        self.evict(&mut entries, clock);
        Ok(())
    }

    /// Drops the least recently used entries (never one used at `now`) until the rest fit the budget.
    fn evict(&self, entries: &mut Entries, now: u64) {
        while entries.list.iter().map(|e| e.bytes).sum::<usize>() > self.budget {
            let oldest = entries
                .list
                .iter()
                .enumerate()
                .filter(|(_, entry)| entry.last_used < now)
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(i, _)| i);
            match oldest {
                Some(i) => {
                    entries.list.swap_remove(i);
                }
                None => break,
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A panic while holding the lock leaves entries that are each whole: keep using them.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Entry {
    fn new(ids: Vec<u32>, layers: Vec<KeysValues>, clock: u64) -> Self {
        Self {
            bytes: size_of(&layers),
            ids,
            layers,
            last_used: clock,
            hits: 0,
        }
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Each layer's first `len` positions (views).
fn narrowed(layers: &[KeysValues], len: usize) -> Result<Vec<KeysValues>> {
    layers
        .iter()
        .map(|(k, v)| Ok((k.narrow(0, 0, len)?, v.narrow(0, 0, len)?)))
        .collect()
}

/// The same values in storage of their own, so that the tensors they were cut from can be freed.
fn owned(layers: &[KeysValues]) -> Result<Vec<KeysValues>> {
    layers
        .iter()
        .map(|(k, v)| Ok((k.copy()?, v.copy()?)))
        .collect()
}

fn size_of(layers: &[KeysValues]) -> usize {
    layers
        .iter()
        .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Two layers whose keys at position p hold p, so a narrowed view shows its length.
    fn layers(len: usize) -> Vec<KeysValues> {
        let positions: Vec<f32> = (0..len).map(|p| p as f32).collect();
        let t = Tensor::from_vec(positions, (len, 1, 1), &Device::Cpu).expect("tensor");
        vec![(t.clone(), t.clone()), (t.clone(), t)]
    }

    fn ids(prefix: &[u32], len: usize) -> Vec<u32> {
        let mut ids = prefix.to_vec();
        ids.extend((0..len - prefix.len()).map(|i| 1000 + i as u32));
        ids
    }

    #[test]
    fn a_pair_after_one_of_its_request_reuses_the_shared_run_only() -> Result<()> {
        let cache = PrefixCache::new(DEFAULT_BUDGET);
        let shared: Vec<u32> = (0..20).collect();
        let first = ids(&shared, 30);
        cache.insert(&first, layers(30), false)?;
        let mut second = shared.clone();
        second.extend([7000, 7001, 7002]);
        let (len, found) = cache.lookup(&second)?.expect("the shared run is cached");
        assert_eq!(len, 20);
        assert_eq!(found[1].0.dims(), &[20, 1, 1]);
        let last: Vec<f32> = found[0].1.flatten_all()?.to_vec1()?;
        assert_eq!(last[19], 19.0, "positions come from the cached run");
        // The shared run is an entry of its own beside the whole pair; a different query shares too little.
        assert!(cache.lock().list.iter().any(|e| e.ids == shared));
        assert!(cache.lock().list.iter().any(|e| e.ids == first));
        let other: Vec<u32> = (100..140).collect();
        assert!(cache.lookup(&other)?.is_none());
        assert_eq!(cache.stats(), PrefixCacheStats { hits: 1, misses: 1 });
        Ok(())
    }

    /// `head` followed by tokens from `tail` on, `len` in all.
    fn pair(head: &[u32], tail: u32, len: usize) -> Vec<u32> {
        let mut ids = head.to_vec();
        ids.extend((0..(len - head.len()) as u32).map(|i| tail + i));
        ids
    }

    #[test]
    fn a_run_used_before_stays_beside_a_shorter_match() -> Result<()> {
        let cache = PrefixCache::new(DEFAULT_BUDGET);
        let prompt: Vec<u32> = (0..18).collect();
        let query_a = pair(&prompt, 500, 35);
        cache.insert(&pair(&query_a, 1000, 40), layers(40), false)?;
        let (len, _) = cache.lookup(&pair(&query_a, 2000, 50))?.expect("hit");
        assert_eq!(len, 35);
        // Another request's pair shares only the prompt.
        let (len, _) = cache
            .lookup(&pair(&prompt, 3000, 30))?
            .expect("the prompt is shared");
        assert_eq!(len, 18);
        let (len, _) = cache.lookup(&pair(&query_a, 4000, 45))?.expect("hit");
        assert_eq!(
            len, 35,
            "the longer run of the first request is still there"
        );
        let lengths: Vec<usize> = cache.lock().list.iter().map(|e| e.ids.len()).collect();
        assert_eq!(lengths, [40, 35, 18]);
        Ok(())
    }

    #[test]
    fn entries_past_the_budget_go_least_recently_used_first() -> Result<()> {
        // Each 20-token entry: 2 layers x (keys + values) x 20 positions x 4 bytes = 320 bytes; four fit.
        let cache = PrefixCache::new(1300);
        let runs: Vec<Vec<u32>> = (0..5).map(|r| (r * 100..r * 100 + 20).collect()).collect();
        for run in &runs[..4] {
            cache.insert(run, layers(20), false)?;
        }
        cache.lookup(&runs[0])?.expect("the first run is cached");
        cache.insert(&runs[4], layers(20), true)?;
        assert!(
            cache.lookup(&runs[0])?.is_some(),
            "the first run was used more recently than the second"
        );
        assert!(cache.lookup(&runs[1])?.is_none(), "the second went");
        for run in &runs[2..] {
            assert!(cache.lookup(run)?.is_some());
        }
        // A quarter of 1,600 bytes holds 25 tokens of these layers: of a 40-token run, its first 25.
        let small = PrefixCache::new(1600);
        let long: Vec<u32> = (0..40).collect();
        small.insert(&long, layers(40), false)?;
        assert_eq!(small.lookup(&long)?.map(|(len, _)| len), Some(25));
        let tiny = PrefixCache::new(100);
        tiny.insert(&runs[0], layers(20), false)?;
        assert!(
            tiny.lookup(&runs[0])?.is_none(),
            "fewer than 16 tokens fit: nothing is kept"
        );
        assert_eq!(layers(1)[0].0.dtype(), DType::F32);
        Ok(())
    }
}
