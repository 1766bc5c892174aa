//! Logs for both binaries: `tracing` to stderr, filtered by `RUST_LOG` (default `info`),
//! coloured only on a terminal (log files and CI stay plain text). A second layer counts the
//! object store's retries (it logs each one at `info` and exposes no counter) whatever
//! `RUST_LOG` says, for the coordinator's Prometheus endpoint.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

static STORAGE_RETRIES: AtomicU64 = AtomicU64::new(0);

/// Object-store requests retried by this process so far.
pub fn storage_retries() -> u64 {
    STORAGE_RETRIES.load(Ordering::Relaxed)
}

/// Counts `object_store`'s "backing off ... retry n of m" events.
struct RetryCounter;

impl<S: tracing::Subscriber> Layer<S> for RetryCounter {
    fn on_event(
        &self,
        _event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        STORAGE_RETRIES.fetch_add(1, Ordering::Relaxed);
    }
}

pub fn init() {
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        );
    let retries = RetryCounter.with_filter(tracing_subscriber::filter::filter_fn(|meta| {
        meta.is_event()
            && *meta.level() == tracing::Level::INFO
            && meta.target().starts_with("object_store::client::retry")
    }));
    tracing_subscriber::registry()
        .with(fmt)
        .with(retries)
        .init();
}
