//! SIGTERM and SIGINT: what Kubernetes sends a pod it deletes or preempts, and Ctrl-C. The
//! first one asks the running generation to stop after a checkpoint of its current step
//! (through the same stop vote the coordinator's stop uses), then the worker exits with
//! [`EXIT_TERMINATED`]; nothing trained is lost. A second one exits at once.

use std::sync::atomic::{AtomicBool, Ordering};

/// 128 + SIGTERM, as a shell reports it: not a success, so a Job replaces the pod.
pub const EXIT_TERMINATED: i32 = 143;

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Whether a stop signal has arrived.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::Relaxed)
}

/// Listens for the signals on `runtime` for the rest of the process.
pub fn install(runtime: &tokio::runtime::Runtime) {
    runtime.spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::warn!("cannot listen for SIGTERM; a stop signal ends the worker at once");
            return;
        };
        let mut received = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            received += 1;
            if received > 1 {
                eprintln!("worker: second stop signal: exiting without a checkpoint");
                std::process::exit(EXIT_TERMINATED);
            }
            tracing::warn!(
                "stop signal: the generation stops after a checkpoint of its current step, then this worker exits"
            );
            REQUESTED.store(true, Ordering::Relaxed);
        }
    });
}
