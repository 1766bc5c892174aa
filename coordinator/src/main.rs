//! `coordinator`: parses the command line, dispatches, and maps errors to exit codes.

mod generations;
mod membership;
mod metrics;
mod prometheus;
mod service;
mod start;
mod status;
mod supervisor;
mod tensorboard;

use std::time::Duration;

use clap::{Parser, Subcommand};
use simmim_proto::{Permanent, EXIT_DO_NOT_RETRY};

/// The simmim-rs coordinator: runs SimMIM pretraining with local and remote workers.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start (or resume) a run. Without --config: the embedded demo (small Swin, CIFAR-10, CPU).
    Start(start::StartArgs),
    /// Where a run stands: its newest checkpoint, last metrics and, if it is running, its workers.
    Status {
        /// The run directory or URL (e.g. ./runs/demo, s3://bucket/runs/demo).
        #[arg(long)]
        run: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Follow the run live (refreshing), until it ends.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
        /// Seconds between refreshes with --watch.
        #[arg(long, default_value_t = 2.0)]
        every: f64,
    },
}

fn main() {
    simmim_proto::logging::init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("coordinator: error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Cmd::Start(args) => start::start(args).await,
            Cmd::Status {
                run,
                watch: true,
                every,
                ..
            } => status::watch(&run, Duration::from_secs_f64(every.max(0.1))).await,
            Cmd::Status { run, json, .. } => status::print(&run, json).await.map(|()| 0),
        }
    });
    supervisor::kill_all();
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("coordinator: error: {e:#}");
            let code = if e.downcast_ref::<Permanent>().is_some() {
                EXIT_DO_NOT_RETRY
            } else {
                1
            };
            std::process::exit(code);
        }
    }
}
