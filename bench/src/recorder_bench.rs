//! `Recorder::record` hot path: ns per call and allocations per call.

use crate::stats::{nsf, Table};
use crate::{global_allocs, thread_allocs};
use host_agent::recorder::{Outcome, Phase, Recorder, Sample};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn sample(i: u64) -> Sample {
    let mut s = Sample::new(0, i & 63 == 0, Outcome::Ok);
    s.total_us = 100 + (i & 255);
    s.set(Phase::Invoke, Duration::from_micros(80 + (i & 127)));
    s.max_rss_kib = 1024;
    s.cpu_us = 20;
    s
}

/// One measured case.
struct Case {
    what: &'static str,
    calls: u64,
    ns_per_call: f64,
    thread_allocs: u64,
    global_allocs: u64,
    dropped: u64,
}

/// Record into a queue with room: batches of `cap`, drained (untimed) between batches.
fn with_room(records: u64) -> Case {
    let cap = 1 << 16;
    let rec = Recorder::new(cap);
    let mut timed = Duration::ZERO;
    let (t0, g0) = (thread_allocs(), global_allocs());
    let mut done = 0u64;
    while done < records {
        let batch = (records - done).min(cap as u64);
        let t = Instant::now();
        for i in 0..batch {
            rec.record(black_box(sample(done + i)));
        }
        timed += t.elapsed();
        done += batch;
        while rec.pop().is_some() {}
    }
    let (t1, g1) = (thread_allocs(), global_allocs());
    Case {
        what: "queue has room (1 thread)",
        calls: records,
        ns_per_call: timed.as_nanos() as f64 / records as f64,
        thread_allocs: t1 - t0,
        global_allocs: g1 - g0,
        dropped: rec.dropped(),
    }
}

/// Record into a full queue: the drop path.
fn full(records: u64) -> Case {
    let rec = Recorder::new(1024);
    for i in 0..1024 {
        rec.record(sample(i));
    }
    let (t0, g0) = (thread_allocs(), global_allocs());
    let t = Instant::now();
    for i in 0..records {
        rec.record(black_box(sample(i)));
    }
    let el = t.elapsed();
    let (t1, g1) = (thread_allocs(), global_allocs());
    Case {
        what: "queue full (drop path)",
        calls: records,
        ns_per_call: el.as_nanos() as f64 / records as f64,
        thread_allocs: t1 - t0,
        global_allocs: g1 - g0,
        dropped: rec.dropped(),
    }
}

/// Record while another thread pops continuously (worst-case contention with the aggregator,
/// which in the agent drains every 20 ms instead).
fn with_consumer(records: u64, producers: usize) -> Case {
    let rec = Arc::new(Recorder::new(1 << 16));
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (rec, stop) = (rec.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                while rec.pop().is_some() {
                    n += 1;
                }
                std::hint::spin_loop();
            }
            n
        })
    };
    let per = records / producers as u64;
    // Producers are spawned and parked before the allocation counters are read, so thread
    // start-up is not counted; each producer counts its own thread's allocations.
    let ready = Arc::new(std::sync::Barrier::new(producers + 1));
    let go = Arc::new(std::sync::Barrier::new(producers + 1));
    let hs: Vec<_> = (0..producers)
        .map(|_| {
            let (rec, ready, go) = (rec.clone(), ready.clone(), go.clone());
            std::thread::spawn(move || {
                ready.wait();
                go.wait();
                let a0 = thread_allocs();
                let t = Instant::now();
                for i in 0..per {
                    rec.record(black_box(sample(i)));
                }
                (t.elapsed(), thread_allocs() - a0)
            })
        })
        .collect();
    ready.wait();
    let g0 = global_allocs();
    go.wait();
    let mut total = Duration::ZERO;
    let mut tallocs = 0;
    for h in hs {
        let (d, a) = h.join().unwrap_or_default();
        total += d;
        tallocs += a;
    }
    let g1 = global_allocs();
    stop.store(true, Ordering::Relaxed);
    let _ = consumer.join();
    Case {
        what: if producers == 1 {
            "1 producer + a thread popping continuously"
        } else {
            "2 producers + a thread popping continuously"
        },
        calls: per * producers as u64,
        ns_per_call: total.as_nanos() as f64 / (per * producers as u64) as f64,
        thread_allocs: tallocs,
        global_allocs: g1 - g0,
        dropped: rec.dropped(),
    }
}

/// Run the recorder benchmarks.
pub fn run(records: u64) -> Table {
    // Warm up caches and the queue's memory.
    let _ = with_room(records / 10);
    let cases = [
        with_room(records),
        full(records),
        with_consumer(records, 1),
        with_consumer(records, 2),
    ];
    let mut t = Table::new(
        "Recorder hot path: Recorder::record(sample)",
        &[
            "case",
            "calls",
            "ns/call",
            "allocs (recording threads)",
            "allocs (process)",
            "dropped",
        ],
    );
    for c in &cases {
        t.row(vec![
            c.what.to_string(),
            c.calls.to_string(),
            nsf(c.ns_per_call),
            c.thread_allocs.to_string(),
            c.global_allocs.to_string(),
            c.dropped.to_string(),
        ]);
    }
    t.note(format!(
        "Sample is {} bytes (Copy). Allocations counted by a counting global allocator in the bench \
         binary, on the recording thread and process-wide, over the timed calls.",
        std::mem::size_of::<Sample>()
    ));
    t.note("With 2 producers, ns/call is per-thread time (sum of both threads' time / calls).");
    t
}
