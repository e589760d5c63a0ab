//! `courier` with an allocation census: the same command line (`courier-census
//! serve ...`), the same allocator underneath (mimalloc), and a count of the
//! live heap by allocation size, printed to stderr every `CENSUS_EVERY`
//! seconds (5 by default) as the change since the first print.
//!
//! What it is for: saying what an idle connection costs, per component. Start
//! it, let the first print pass (the baseline), open connections (the load
//! generator's `idle` scenario), read a print taken while they are held: each
//! size whose count grew by about one per connection is a per-connection
//! allocation, and the size names the component (a task's cell is its
//! future's size plus tokio's header; see `docs/BENCHMARKS.md`, "Idle
//! connections, by component"). `CENSUS_TRACE=<size>[,<size>...]` prints the
//! call stack of one allocation in `CENSUS_TRACE_EVERY` (1,000) of each such
//! size, to find what makes it.
//!
//! The counting costs two atomic additions per allocation and free: use it to
//! count, not to time.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Sizes up to this are counted one by one; larger ones by power of two.
const EXACT: usize = 8192;
const LARGE: usize = 48;

static EXACT_LIVE: [AtomicI64; EXACT + 1] = [const { AtomicI64::new(0) }; EXACT + 1];
static LARGE_LIVE: [AtomicI64; LARGE] = [const { AtomicI64::new(0) }; LARGE];
static LARGE_BYTES: [AtomicI64; LARGE] = [const { AtomicI64::new(0) }; LARGE];
/// Bytes ever allocated, by the same classes: what passed through.
static EXACT_MADE: [AtomicI64; EXACT + 1] = [const { AtomicI64::new(0) }; EXACT + 1];
static LARGE_MADE: [AtomicI64; LARGE] = [const { AtomicI64::new(0) }; LARGE];
/// Sizes whose allocations are traced (0: none), and how often.
static TRACED: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
static TRACE_EVERY: AtomicU64 = AtomicU64::new(1000);
static TRACE_SEEN: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Set while this thread traces: the trace's own allocations are not
    /// traced again.
    static TRACING: Cell<bool> = const { Cell::new(false) };
}

struct Census;

fn counted(size: usize, by: i64) {
    if size <= EXACT {
        EXACT_LIVE[size].fetch_add(by, Ordering::Relaxed);
        if by > 0 {
            EXACT_MADE[size].fetch_add(size as i64, Ordering::Relaxed);
        }
    } else {
        let class = (usize::BITS - size.leading_zeros()) as usize;
        let class = class.min(LARGE - 1);
        LARGE_LIVE[class].fetch_add(by, Ordering::Relaxed);
        LARGE_BYTES[class].fetch_add(by * size as i64, Ordering::Relaxed);
        if by > 0 {
            LARGE_MADE[class].fetch_add(size as i64, Ordering::Relaxed);
        }
    }
}

fn maybe_trace(size: usize) {
    let size = size as u64;
    if !TRACED.iter().any(|t| t.load(Ordering::Relaxed) == size) {
        return;
    }
    let every = TRACE_EVERY.load(Ordering::Relaxed).max(1);
    if !TRACE_SEEN
        .fetch_add(1, Ordering::Relaxed)
        .is_multiple_of(every)
    {
        return;
    }
    let _ = TRACING.try_with(|t| {
        if t.replace(true) {
            return;
        }
        let bt = std::backtrace::Backtrace::force_capture().to_string();
        let frames: Vec<&str> = bt
            .lines()
            .map(str::trim)
            .filter(|l| {
                !l.starts_with("at ")
                    && (l.contains("courier") || l.contains("tokio") || l.contains("mailbox"))
            })
            .take(14)
            .collect();
        eprintln!("census trace: {size} bytes\n    {}", frames.join("\n    "));
        t.set(false);
    });
}

unsafe impl GlobalAlloc for Census {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        counted(layout.size(), 1);
        maybe_trace(layout.size());
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        counted(layout.size(), 1);
        maybe_trace(layout.size());
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        counted(layout.size(), -1);
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        counted(layout.size(), -1);
        counted(new_size, 1);
        maybe_trace(new_size);
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Census = Census;

/// Allocations by size class: (size, or a large class's lower bound; live
/// count; live bytes; bytes ever allocated).
fn snapshot() -> Vec<(usize, i64, i64, i64)> {
    let mut rows: Vec<(usize, i64, i64, i64)> = EXACT_LIVE
        .iter()
        .zip(&EXACT_MADE)
        .enumerate()
        .map(|(size, (n, made))| {
            let n = n.load(Ordering::Relaxed);
            (size, n, n * size as i64, made.load(Ordering::Relaxed))
        })
        .collect();
    rows.extend((0..LARGE).map(|c| {
        (
            1usize << c.saturating_sub(1),
            LARGE_LIVE[c].load(Ordering::Relaxed),
            LARGE_BYTES[c].load(Ordering::Relaxed),
            LARGE_MADE[c].load(Ordering::Relaxed),
        )
    }));
    rows
}

fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn report(every: Duration) {
    let started = Instant::now();
    std::thread::sleep(every);
    let base = snapshot();
    let base_rss = resident_bytes();
    let total = |s: &[(usize, i64, i64, i64)]| s.iter().map(|r| r.2).sum::<i64>();
    let made = |s: &[(usize, i64, i64, i64)]| s.iter().map(|r| r.3).sum::<i64>();
    eprintln!(
        "census baseline at {:.0} s: {} live bytes, resident {} bytes",
        started.elapsed().as_secs_f64(),
        total(&base),
        base_rss
    );
    loop {
        std::thread::sleep(every);
        let now = snapshot();
        let mut grown: Vec<(usize, i64, i64, i64)> = now
            .iter()
            .zip(&base)
            .map(|(n, b)| (n.0, n.1 - b.1, n.2 - b.2, n.3 - b.3))
            .filter(|r| r.1 != 0 || r.3 != 0)
            .collect();
        grown.sort_by_key(|r| -r.2.abs());
        let rss = resident_bytes();
        let mut out = format!(
            "census at {:.0} s: live bytes {:+}, resident {:+}, allocated {:+} (since the baseline); by size, largest live change first:\n",
            started.elapsed().as_secs_f64(),
            total(&now) - total(&base),
            rss as i64 - base_rss as i64,
            made(&now) - made(&base),
        );
        let label = |size: usize| {
            if size > EXACT {
                format!(">={size}")
            } else {
                size.to_string()
            }
        };
        for (size, n, bytes, _) in grown.iter().filter(|r| r.1 != 0).take(20) {
            out.push_str(&format!(
                "    {:>8} B x {n:+8} = {bytes:+11} B\n",
                label(*size)
            ));
        }
        grown.sort_by_key(|r| -r.3);
        out.push_str("  allocated since the baseline, most bytes first:\n");
        for (size, _, _, made) in grown.iter().take(12) {
            out.push_str(&format!("    {:>8} B: {made:+12} B\n", label(*size)));
        }
        eprint!("{out}");
    }
}

fn main() -> anyhow::Result<()> {
    let every = std::env::var("CENSUS_EVERY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    if let Ok(sizes) = std::env::var("CENSUS_TRACE") {
        for (slot, size) in TRACED.iter().zip(sizes.split(',')) {
            slot.store(size.trim().parse().unwrap_or(0), Ordering::Relaxed);
        }
    }
    if let Some(n) = std::env::var("CENSUS_TRACE_EVERY")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        TRACE_EVERY.store(n, Ordering::Relaxed);
    }
    std::thread::Builder::new()
        .name("census".into())
        .spawn(move || report(Duration::from_secs(every)))?;
    courier_broker::cli::main()
}
