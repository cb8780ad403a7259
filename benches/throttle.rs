//! The cost of the throttling check per request, and the memory of a bucket.
//!
//!     cargo bench --bench throttle
//!
//! Times are medians of several rounds, each reported with its ratio to a reference measured in
//! the same run: one lookup of a 64-bit key in a `HashMap` of the same size, the least any
//! per-caller state can cost. Memory is counted by a global allocator that tallies live bytes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use certgate::model::{Period, Rate};
use certgate::throttle::{Buckets, Key, Kind, Limit, NANOS_PER_SEC};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const T0: u64 = 1_750_000_000 * NANOS_PER_SEC;
const ROUNDS: usize = 7;

fn caller_key(kind: Kind, i: u64) -> Key {
    Key {
        kind,
        scope: 7,
        entry: i,
        caller: i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
    }
}

/// Median nanoseconds per call of `f` over `calls` calls.
fn time(calls: u64, mut f: impl FnMut(u64)) -> f64 {
    let mut rounds: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            for i in 0..calls {
                f(i);
            }
            started.elapsed().as_nanos() as f64 / calls as f64
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[ROUNDS / 2]
}

fn main() {
    let gold = Limit::new(&Rate {
        requests: 5000,
        per: Period::Minute,
        burst: 5000,
    });
    let api = Limit::new(&Rate {
        requests: 1_000_000,
        per: Period::Second,
        burst: 1_000_000,
    });
    println!("throttling check per request (median of {ROUNDS} rounds)");
    for callers in [1_000u64, 100_000] {
        let mut reference: HashMap<u64, u64> = (0..callers).map(|i| (i, i)).collect();
        let mut buckets = Buckets::default();
        let calls = 2_000_000;
        let lookup = time(calls, |i| {
            let v = reference.get_mut(&(i % callers)).unwrap();
            *v = black_box(v.wrapping_add(1));
        });
        let one = time(calls, |i| {
            let now = T0 + i * 1_000;
            black_box(buckets.take(
                &[
                    Some((caller_key(Kind::Caller, i % callers), gold)),
                    None,
                    None,
                ],
                now,
            ));
        });
        let three = time(calls, |i| {
            let now = T0 + i * 1_000;
            let c = i % callers;
            let wants = [
                Some((caller_key(Kind::Caller, c), gold)),
                Some((caller_key(Kind::Resource, c), gold)),
                Some((caller_key(Kind::Api, 0), api)),
            ];
            black_box(buckets.take(&wants, now));
        });
        println!(
            "  {callers:>7} callers: HashMap<u64> lookup {lookup:.1} ns; one bucket {one:.1} ns \
             ({:.1}x); caller + resource + API buckets {three:.1} ns ({:.1}x)",
            one / lookup,
            three / lookup
        );
    }

    let before = LIVE.load(Ordering::Relaxed);
    let mut buckets = Buckets::default();
    let n = 100_000u64;
    for i in 0..n {
        buckets.take(&[Some((caller_key(Kind::Caller, i), gold)), None, None], T0);
    }
    let after = LIVE.load(Ordering::Relaxed);
    println!(
        "memory: {n} buckets take {} KiB, {:.0} bytes a bucket (key {} + bucket {} bytes, the \
         rest is the hash table's room)",
        (after - before) / 1024,
        (after - before) as f64 / n as f64,
        std::mem::size_of::<Key>(),
        std::mem::size_of::<certgate::throttle::Bucket>()
    );

    // Saving: what one persist tick costs the loop, at most a batch of 500 buckets.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut store = certgate::store::Store::create(
        &dir.path().join("bench.db"),
        &certgate::store::InitOptions::default(),
    )
    .expect("a store");
    let batch = buckets.unsaved(500);
    let floor = time(20, |_| store.save_throttling(&[], &[], T0).expect("save"));
    let save = time(20, |_| {
        store.save_throttling(&batch, &[], T0).expect("save")
    });
    println!(
        "saving {} buckets: {:.2} ms a tick ({:.0}x an empty save, {:.2} ms)",
        batch.len(),
        save / 1e6,
        save / floor,
        floor / 1e6
    );

    // Full buckets are dropped.
    buckets.retain(T0 + 3_600 * NANOS_PER_SEC, |_| true);
    assert!(buckets.is_empty());
}
