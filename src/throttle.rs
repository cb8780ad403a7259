//! Token buckets (SPEC 3, Throttling) in the form of the generic cell rate algorithm: a bucket
//! is one number, the time at which it is full again. A tier of N requests per period with
//! burst B gives each request a cost of one interval (period / N) and lets the bucket run up
//! to B intervals ahead of the clock; a bucket whose time has passed is full, so it can be
//! dropped. Pure integer arithmetic on nanoseconds since the Unix epoch: no clock, no I/O.
//!
//! What this module leaves to others: which buckets apply to a request ([`crate::policy`] and
//! the connection), where buckets live and when they are saved ([`crate::server`],
//! [`crate::store`]).

use std::collections::{HashMap, VecDeque};

use crate::model::{Period, Rate};

pub const NANOS_PER_SEC: u64 = 1_000_000_000;

/// A rate as the arithmetic needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Nanoseconds one request costs: the period divided by N (at least 1).
    pub interval: u64,
    /// How many requests the bucket holds.
    pub burst: u64,
}

impl Limit {
    pub fn new(rate: &Rate) -> Self {
        let period = period_nanos(rate.per);
        Self {
            interval: (period / rate.requests.max(1)).max(1),
            burst: rate.burst.max(1),
        }
    }

    /// How far ahead of the clock a bucket may run: `burst` intervals.
    fn capacity(self) -> u128 {
        u128::from(self.interval) * u128::from(self.burst)
    }
}

pub fn period_nanos(per: Period) -> u64 {
    let secs = match per {
        Period::Second => 1,
        Period::Minute => 60,
        Period::Hour => 3_600,
        Period::Day => 86_400,
    };
    secs * NANOS_PER_SEC
}

/// What a bucket says to one more request at some moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// Allowed: the bucket's new time, the requests left after this one, and the nanoseconds
    /// until it is full again.
    Allowed {
        full_at: u64,
        remaining: u64,
        reset: u64,
    },
    /// Refused, the bucket unchanged: nanoseconds until one request would pass, and until it
    /// is full again.
    Refused { retry_after: u64, reset: u64 },
}

impl Take {
    /// Requests left after this one (none when refused): what picks the tightest bucket.
    pub fn remaining(self) -> u64 {
        match self {
            Self::Allowed { remaining, .. } => remaining,
            Self::Refused { .. } => 0,
        }
    }
}

/// Asks a bucket that is full again at `full_at` (0 for a new one) for one request at `now`.
pub fn take(full_at: u64, limit: Limit, now: u64) -> Take {
    let base = full_at.max(now);
    let after = base.saturating_add(limit.interval);
    let used = u128::from(after - now);
    let capacity = limit.capacity();
    if used > capacity {
        return Take::Refused {
            retry_after: saturating_u64(used - capacity),
            reset: base - now,
        };
    }
    Take::Allowed {
        full_at: after,
        remaining: saturating_u64((capacity - used) / u128::from(limit.interval)),
        reset: after - now,
    }
}

/// Carries a bucket over to a changed limit, keeping what it has used: the requests it is
/// ahead of the clock stay as many requests at the new interval.
pub fn rescale(full_at: u64, from: Limit, to: Limit, now: u64) -> u64 {
    if full_at <= now || from.interval == to.interval {
        return full_at;
    }
    let ahead = u128::from(full_at - now) * u128::from(to.interval) / u128::from(from.interval);
    now.saturating_add(saturating_u64(ahead))
}

/// Which bucket: the kind, the API or resource it belongs to, and the caller (certificate
/// entry, and the first 8 bytes of the leaf's SHA-256; zero for the API's own bucket). Names
/// are hashed ([`name_key`]), so a key is the same across reloads and restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub kind: Kind,
    pub scope: u64,
    pub entry: u64,
    pub caller: u64,
}

/// The caller part of a [`Key`] for a caller without a certificate (on a public resource):
/// its address, hashed.
pub fn address_key(ip: std::net::IpAddr) -> u64 {
    let octets = match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    };
    let digest = ring::digest::digest(&ring::digest::SHA256, &octets);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_le_bytes(first)
}

/// The caller part of a [`Key`]: the leaf fingerprint's first 8 bytes, a hash already.
pub fn caller_key(sha256: &[u8; 32]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&sha256[..8]);
    u64::from_le_bytes(first)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Per API and caller, with the tier of the caller's certificate entry.
    Caller,
    /// Per resource and caller, with the resource's tier.
    Resource,
    /// One for the whole API, with the API's tier.
    Api,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Caller => "caller",
            Self::Resource => "resource",
            Self::Api => "api",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "caller" => Some(Self::Caller),
            "resource" => Some(Self::Resource),
            "api" => Some(Self::Api),
            _ => None,
        }
    }
}

/// A stable 64-bit key for a name made of `parts`: the first bytes of their SHA-256.
pub fn name_key(parts: &[&str]) -> u64 {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        context.update(part.as_bytes());
        context.update(&[0]);
    }
    let digest = context.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_le_bytes(first)
}

/// What the client learns of the tightest bucket: `RateLimit-Limit`, `-Remaining` and
/// `-Reset` (seconds until full).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateHeaders {
    pub limit: u64,
    pub remaining: u64,
    pub reset: u64,
}

/// The answer to one request that asked every bucket that applies to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Allowed; headers when any bucket applied.
    Allowed(Option<RateHeaders>),
    /// Refused by the bucket of kind `by`; `retry_after` in whole seconds (at least 1).
    Throttled {
        by: Kind,
        retry_after: u64,
        headers: RateHeaders,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub full_at: u64,
    /// The limit `full_at` was reckoned with, to carry it over when the tier changes.
    pub limit: Limit,
    /// Changed since it was last saved.
    pub unsaved: bool,
}

/// Every bucket that is not full; a full one is the same as none.
#[derive(Debug, Default)]
pub struct Buckets {
    map: HashMap<Key, Bucket>,
    /// The keys of unsaved buckets, oldest change first, each once: saved in turn, so that
    /// none waits behind busier ones.
    unsaved: VecDeque<Key>,
}

impl Buckets {
    /// Takes one request from each bucket of `wants` (the caller's, the resource's and the
    /// API's, those that apply) at `now`, or from none if any is empty.
    pub fn take(&mut self, wants: &[Option<(Key, Limit)>; 3], now: u64) -> Outcome {
        let mut takes = [None; 3];
        let mut tightest: Option<(usize, Take)> = None;
        let mut refused: Option<(usize, u64)> = None;
        for (i, want) in wants.iter().enumerate() {
            let Some((key, limit)) = want else {
                continue;
            };
            let full_at = match self.map.get(key) {
                Some(b) => rescale(b.full_at, b.limit, *limit, now),
                None => 0,
            };
            let take = take(full_at, *limit, now);
            if let Take::Refused { retry_after, .. } = take {
                if refused.is_none_or(|(_, r)| retry_after > r) {
                    refused = Some((i, retry_after));
                }
            }
            if tightest.is_none_or(|(_, t)| take.remaining() < t.remaining()) {
                tightest = Some((i, take));
            }
            takes[i] = Some(take);
        }
        let limit_of = |i: usize| wants[i].map_or(0, |(_, l)| l.burst);
        let headers = |i: usize, take: Take| RateHeaders {
            limit: limit_of(i),
            remaining: take.remaining(),
            reset: whole_seconds(
                match take {
                    Take::Allowed { reset, .. } | Take::Refused { reset, .. } => reset,
                },
                0,
            ),
        };
        // A refusal tells of the bucket that refused; an allowed request of the tightest.
        if let Some((by, retry_after)) = refused {
            if let (Some(take), Some((key, _))) = (takes[by], wants[by]) {
                return Outcome::Throttled {
                    by: key.kind,
                    retry_after: whole_seconds(retry_after, 1),
                    headers: headers(by, take),
                };
            }
        }
        let headers = tightest.map(|(i, take)| headers(i, take));
        for (want, take) in wants.iter().zip(takes) {
            if let (Some((key, limit)), Some(Take::Allowed { full_at, .. })) = (want, take) {
                let was_unsaved = self.map.get(key).is_some_and(|b| b.unsaved);
                self.map.insert(
                    *key,
                    Bucket {
                        full_at,
                        limit: *limit,
                        unsaved: true,
                    },
                );
                if !was_unsaved {
                    self.unsaved.push_back(*key);
                }
            }
        }
        Outcome::Allowed(headers)
    }

    /// Drops the buckets that are full again by `now`, and those `keep` rejects.
    pub fn retain(&mut self, now: u64, keep: impl Fn(&Key) -> bool) {
        self.map.retain(|key, b| b.full_at > now && keep(key));
        let map = &self.map;
        self.unsaved.retain(|k| map.contains_key(k));
    }

    /// Up to `most` buckets changed since they were last saved, those changed first first.
    pub fn unsaved(&self, most: usize) -> Vec<(Key, Bucket)> {
        self.unsaved
            .iter()
            .filter_map(|k| self.map.get(k).filter(|b| b.unsaved).map(|b| (*k, *b)))
            .take(most)
            .collect()
    }

    /// Notes that `saved` are in the store; one that changed again since waits its turn anew.
    pub fn mark_saved(&mut self, saved: &[(Key, Bucket)]) {
        for (key, copy) in saved {
            if let Some(b) = self.map.get_mut(key) {
                if b.full_at == copy.full_at && b.limit == copy.limit {
                    b.unsaved = false;
                }
            }
        }
        let map = &self.map;
        self.unsaved
            .retain(|k| map.get(k).is_some_and(|b| b.unsaved));
    }

    pub fn insert(&mut self, key: Key, bucket: Bucket) {
        self.map.insert(key, bucket);
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Bucket)> {
        self.map.iter()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Whom a count is for: the API, the certificate entry's alias and the caller's leaf
/// fingerprint (lower-case hex), as `certgate status` shows them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CountKey {
    pub api: String,
    pub alias: String,
    pub caller: String,
}

/// Requests allowed and throttled since the counts were last taken.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Count {
    pub subject: String,
    pub allowed: u64,
    pub throttled: u64,
}

/// The counts of requests that reached throttling, since they were last saved: bounded by
/// the callers of a few seconds.
#[derive(Debug, Default)]
pub struct Counters {
    map: HashMap<(u64, u64, u64), (CountKey, Count)>,
    /// Counts a failed save gave back, merged by whom they are for.
    unsaved: HashMap<CountKey, Count>,
}

impl Counters {
    /// Counts one request of the caller `(api, entry, caller)`; `names` gives the names the
    /// first time it is seen.
    pub fn count(
        &mut self,
        key: (u64, u64, u64),
        allowed: bool,
        names: impl FnOnce() -> (CountKey, String),
    ) {
        let (_, count) = self.map.entry(key).or_insert_with(|| {
            let (key, subject) = names();
            (
                key,
                Count {
                    subject,
                    ..Count::default()
                },
            )
        });
        if allowed {
            count.allowed += 1;
        } else {
            count.throttled += 1;
        }
    }

    /// The counts so far, leaving none.
    pub fn take(&mut self) -> Vec<(CountKey, Count)> {
        let mut counts = std::mem::take(&mut self.unsaved);
        for (key, count) in self.map.drain().map(|(_, v)| v) {
            merge(&mut counts, key, count);
        }
        counts.into_iter().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty() && self.unsaved.is_empty()
    }

    /// Puts counts back that could not be saved, to go with the next [`Counters::take`].
    pub fn restore(&mut self, counts: Vec<(CountKey, Count)>) {
        for (key, count) in counts {
            merge(&mut self.unsaved, key, count);
        }
    }
}

fn merge(into: &mut HashMap<CountKey, Count>, key: CountKey, count: Count) {
    let sum = into.entry(key).or_default();
    sum.allowed += count.allowed;
    sum.throttled += count.throttled;
    if sum.subject.is_empty() {
        sum.subject = count.subject;
    }
}

/// Whole seconds for a header, rounded up; at least `min`.
pub fn whole_seconds(nanos: u64, min: u64) -> u64 {
    nanos.div_ceil(NANOS_PER_SEC).max(min)
}

/// A clock that never goes backwards: the wall clock as given, or the last time it said if
/// the wall clock stepped back, so that no bucket refills twice.
#[derive(Clone, Copy, Debug, Default)]
pub struct Monotonic {
    last: u64,
}

impl Monotonic {
    pub fn now(&mut self, wall: u64) -> u64 {
        self.last = self.last.max(wall);
        self.last
    }
}

fn saturating_u64(n: u128) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = NANOS_PER_SEC;
    const T0: u64 = 1_750_000_000 * S;

    fn per_minute(requests: u64, burst: u64) -> Limit {
        Limit::new(&Rate {
            requests,
            per: Period::Minute,
            burst,
        })
    }

    /// Takes requests at `now` until one is refused; returns how many passed and the refusal.
    fn drain(full_at: &mut u64, limit: Limit, now: u64) -> (u64, Take) {
        let mut passed = 0;
        loop {
            match take(*full_at, limit, now) {
                Take::Allowed { full_at: f, .. } => {
                    *full_at = f;
                    passed += 1;
                }
                refused => return (passed, refused),
            }
        }
    }

    #[test]
    fn a_new_bucket_holds_its_burst_then_refuses_until_a_request_is_back() {
        let limit = per_minute(5, 5);
        assert_eq!(limit.interval, 12 * S);
        assert_eq!(
            take(0, limit, T0),
            Take::Allowed {
                full_at: T0 + 12 * S,
                remaining: 4,
                reset: 12 * S
            }
        );
        let mut full_at = 0;
        let (passed, refused) = drain(&mut full_at, limit, T0);
        assert_eq!(passed, 5);
        assert_eq!(
            refused,
            Take::Refused {
                retry_after: 12 * S,
                reset: 60 * S
            }
        );
        // One interval later exactly one more passes.
        assert_eq!(drain(&mut full_at, limit, T0 + 12 * S).0, 1);
        assert!(matches!(
            take(full_at, limit, T0 + 12 * S + 1),
            Take::Refused { .. }
        ));
    }

    #[test]
    fn refill_is_steady_and_burst_caps_it() {
        // 60 per minute with a burst of 10: one per second, at most 10 at once.
        let limit = per_minute(60, 10);
        let mut full_at = 0;
        assert_eq!(drain(&mut full_at, limit, T0).0, 10);
        assert_eq!(drain(&mut full_at, limit, T0 + 3 * S).0, 3);
        // A long idle refills to the burst, never beyond.
        assert_eq!(drain(&mut full_at, limit, T0 + 3_600 * S).0, 10);
        // A burst larger than N lets a quiet caller spend more at once.
        let limit = per_minute(60, 120);
        let mut full_at = 0;
        assert_eq!(drain(&mut full_at, limit, T0).0, 120);
    }

    #[test]
    fn a_refusal_takes_nothing() {
        let limit = per_minute(1, 1);
        let full_at = match take(0, limit, T0) {
            Take::Allowed { full_at, .. } => full_at,
            refused => panic!("{refused:?}"),
        };
        for _ in 0..100 {
            assert!(matches!(take(full_at, limit, T0 + S), Take::Refused { .. }));
        }
        assert!(matches!(
            take(full_at, limit, T0 + 60 * S),
            Take::Allowed { .. }
        ));
    }

    #[test]
    fn day_tiers_and_huge_numbers_do_not_overflow() {
        let limit = Limit::new(&Rate {
            requests: 1,
            per: Period::Day,
            burst: u64::MAX,
        });
        assert!(matches!(take(0, limit, T0), Take::Allowed { .. }));
        let fast = Limit::new(&Rate {
            requests: u64::MAX,
            per: Period::Second,
            burst: 1,
        });
        assert_eq!(fast.interval, 1);
        assert!(matches!(take(u64::MAX - 1, fast, T0), Take::Refused { .. }));
        assert_eq!(whole_seconds(1, 1), 1);
        assert_eq!(whole_seconds(0, 1), 1);
        assert_eq!(whole_seconds(S + 1, 1), 2);
    }

    #[test]
    fn a_changed_limit_keeps_what_was_used() {
        let old = per_minute(10, 10);
        let mut full_at = 0;
        for _ in 0..4 {
            if let Take::Allowed { full_at: f, .. } = take(full_at, old, T0) {
                full_at = f;
            }
        }
        // Four used of ten; the new tier has 100 a minute: still four used, 96 left.
        let new = per_minute(100, 100);
        let full_at = rescale(full_at, old, new, T0);
        assert_eq!(take(full_at, new, T0).remaining(), 95);
        // A bucket already full stays full.
        assert_eq!(rescale(T0 - 1, old, new, T0), T0 - 1);
    }

    fn key(kind: Kind, scope: u64) -> Key {
        Key {
            kind,
            scope,
            entry: 0,
            caller: 0,
        }
    }

    #[test]
    fn a_request_takes_from_every_bucket_or_from_none() {
        let mut buckets = Buckets::default();
        let caller = (key(Kind::Caller, 1), per_minute(5, 5));
        let api = (key(Kind::Api, 1), per_minute(3, 3));
        for left in [2, 1, 0] {
            assert_eq!(
                buckets.take(&[Some(caller), None, Some(api)], T0),
                Outcome::Allowed(Some(RateHeaders {
                    limit: 3,
                    remaining: left,
                    reset: 20 * (3 - left)
                }))
            );
        }
        // The API's bucket is empty: refused, and the caller's keeps its two.
        let refused = buckets.take(&[Some(caller), None, Some(api)], T0);
        assert_eq!(
            refused,
            Outcome::Throttled {
                by: Kind::Api,
                retry_after: 20,
                headers: RateHeaders {
                    limit: 3,
                    remaining: 0,
                    reset: 60
                }
            }
        );
        let Outcome::Allowed(Some(headers)) = buckets.take(&[Some(caller), None, None], T0) else {
            panic!("the caller's bucket was taken from by a refused request");
        };
        assert_eq!(headers.remaining, 1);
        // No bucket: allowed without headers.
        assert_eq!(buckets.take(&[None; 3], T0), Outcome::Allowed(None));
        // Full buckets go; others stay.
        buckets.retain(T0 + 30 * S, |_| true);
        assert_eq!(buckets.len(), 2);
        buckets.retain(T0 + 3_600 * S, |_| true);
        assert!(buckets.is_empty());
    }

    #[test]
    fn unsaved_buckets_are_saved_in_the_order_they_changed() {
        let mut buckets = Buckets::default();
        let limit = per_minute(100, 100);
        for scope in 1..=5 {
            buckets.take(&[None, None, Some((key(Kind::Api, scope), limit))], T0);
        }
        let first = buckets.unsaved(2);
        assert_eq!(
            first.iter().map(|(k, _)| k.scope).collect::<Vec<_>>(),
            [1, 2]
        );
        buckets.mark_saved(&first);
        // Bucket 1 changes again: it waits behind 3, 4 and 5.
        buckets.take(&[None, None, Some((key(Kind::Api, 1), limit))], T0);
        let next: Vec<u64> = buckets.unsaved(10).iter().map(|(k, _)| k.scope).collect();
        assert_eq!(next, [3, 4, 5, 1]);
        buckets.mark_saved(&buckets.unsaved(10));
        assert!(buckets.unsaved(10).is_empty());
    }

    #[test]
    fn name_keys_are_stable_and_distinct() {
        assert_eq!(name_key(&["api", "pizza"]), name_key(&["api", "pizza"]));
        assert_ne!(name_key(&["api", "pizza"]), name_key(&["api", "pizz", "a"]));
        assert_ne!(name_key(&["api", "pizza"]), name_key(&["cert", "pizza"]));
    }

    #[test]
    fn the_clock_never_goes_backwards() {
        let mut clock = Monotonic::default();
        assert_eq!(clock.now(T0), T0);
        assert_eq!(clock.now(T0 - 5 * S), T0);
        assert_eq!(clock.now(T0 + S), T0 + S);
        // A refused bucket stays refused while the wall clock steps back.
        let limit = per_minute(1, 1);
        let mut full_at = 0;
        drain(&mut full_at, limit, clock.now(T0 + S));
        assert!(matches!(
            take(full_at, limit, clock.now(T0 - 3_600 * S)),
            Take::Refused { .. }
        ));
    }
}
