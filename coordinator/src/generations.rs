//! The generation loop: starts the local workers, then reacts to what happens until the run
//! ends. A failed generation (a worker died, went silent or reported an error) is followed by
//! the next one, resuming from the newest committed checkpoint, up to `workers.max_restarts`;
//! a regroup (workers waiting to join, or one leaving) follows a checkpoint and costs no
//! restart; a stop signal ends the run after the next checkpoint.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use simmim_proto::{Permanent, EXIT_DO_NOT_RETRY};
use tokio::sync::mpsc;

use crate::service::{Event, Shared};
use crate::supervisor::{self, Exit, LocalWorkers};

/// Exit status of a run stopped by SIGINT/SIGTERM after its checkpoint (as a shell reports
/// a command ended by Ctrl-C).
pub const EXIT_STOPPED: i32 = 130;

/// What the loop starts from.
pub struct Launch {
    pub local_workers: usize,
    /// The URL local workers connect to.
    pub address: String,
    pub token: String,
    pub first_generation: u64,
    /// `coordinator.json`'s content, rewritten when the generation changes.
    pub info: serde_json::Value,
}

/// A generation's end: which one, why, and whether a restart could help.
struct Ended {
    generation: u64,
    message: String,
    permanent: bool,
}

/// What one turn of the loop decided.
enum Turn {
    Continue,
    Ended(Ended),
    RunOver(Result<i32>),
}

struct Loop {
    shared: Arc<Shared>,
    launch: Launch,
    logs: Vec<std::path::PathBuf>,
    alive_local: usize,
    restarts: u32,
    interrupts: u32,
    generation_began: Instant,
    written_generation: u64,
}

/// Runs the generations until the run finishes, stops, or fails.
pub async fn supervise(
    shared: Arc<Shared>,
    mut events: mpsc::UnboundedReceiver<Event>,
    launch: Launch,
) -> Result<i32> {
    let config = &shared.config;
    let log_dir = shared
        .store
        .local_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("logs");
    let mut workers = LocalWorkers::spawn(
        launch.local_workers,
        &launch.address,
        &config.workers.device,
        &log_dir,
        &launch.token,
    )?;
    let mut exits = workers.watch();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    // SIGTERM (Kubernetes deleting the pod, a scheduler's stop) is treated like Ctrl-C.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut state = Loop {
        logs: workers.logs.clone(),
        alive_local: launch.local_workers,
        restarts: 0,
        interrupts: 0,
        generation_began: Instant::now(),
        written_generation: launch.first_generation,
        shared: shared.clone(),
        launch,
    };
    loop {
        let turn = tokio::select! {
            Some(exit) = exits.recv() => state.on_exit(exit),
            Some(event) = events.recv() => state.on_event(event),
            _ = tick.tick() => state.on_tick(),
            _ = async {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            } => state.on_signal(),
        };
        match turn {
            Turn::Continue => {}
            Turn::RunOver(outcome) => return outcome,
            Turn::Ended(ended) => {
                if let Some(outcome) = state.restart(ended) {
                    return outcome;
                }
            }
        }
    }
}

impl Loop {
    fn generation(&self) -> u64 {
        self.shared
            .membership
            .lock()
            .map(|m| m.generation)
            .unwrap_or(0)
    }

    fn on_exit(&mut self, exit: Exit) -> Turn {
        self.alive_local = self.alive_local.saturating_sub(1);
        if exit.code == Some(0) {
            return Turn::Continue;
        }
        let permanent = exit.code == Some(EXIT_DO_NOT_RETRY);
        let log = self
            .logs
            .get(exit.index)
            .map(|p| supervisor::tail(p, 15))
            .unwrap_or_default();
        let (generation, member) = self
            .shared
            .membership
            .lock()
            .map(|m| {
                (
                    m.generation,
                    m.is_active(&supervisor::worker_id(exit.index)),
                )
            })
            .unwrap_or((0, false));
        tracing::warn!("local worker {} exited with {:?}", exit.index, exit.code);
        if !(member || permanent) {
            return Turn::Continue;
        }
        Turn::Ended(Ended {
            generation,
            message: format!(
                "local worker {} exited with {:?}; its log ends:\n{log}",
                exit.index, exit.code
            ),
            permanent,
        })
    }

    fn on_event(&mut self, event: Event) -> Turn {
        match event {
            Event::AllDone { step } => Turn::RunOver(Ok(finish(&self.shared, step))),
            Event::Regroup { generation } => {
                if let Ok(mut m) = self.shared.membership.lock() {
                    if m.generation == generation {
                        tracing::info!(generation, "generation stopped after a checkpoint; the next one forms with every worker present");
                        m.next_generation(Instant::now());
                        self.generation_began = Instant::now();
                    }
                }
                Turn::Continue
            }
            Event::Failed {
                generation,
                rank,
                message,
                retryable,
            } => Turn::Ended(Ended {
                generation,
                message: format!("rank {rank}: {message}"),
                permanent: !retryable,
            }),
        }
    }

    /// The periodic checks: workers waiting (regroup), silent ranks, a generation that does
    /// not form.
    fn on_tick(&mut self) -> Turn {
        let config = &self.shared.config;
        let timeout = Duration::from_secs_f64(config.workers.heartbeat_timeout_s);
        let rejoin_timeout = Duration::from_secs_f64(config.workers.rejoin_timeout_s);
        let (generation, silent, formed) = self
            .shared
            .membership
            .lock()
            .map(|mut m| {
                let now = Instant::now();
                if m.should_grow(now) {
                    m.regroup = true;
                    tracing::info!(
                        generation = m.generation,
                        waiting = m.waiting.len(),
                        "workers are waiting: the generation stops after a checkpoint of its next step and regroups"
                    );
                }
                (m.generation, m.silent(now, timeout), m.world.is_some())
            })
            .unwrap_or_default();
        if generation != self.written_generation {
            self.written_generation = generation;
            self.launch.info["generation"] = serde_json::json!(generation);
            let store = self.shared.store.clone();
            let bytes = Bytes::from(self.launch.info.to_string());
            tokio::spawn(async move {
                if let Err(e) = store.put("coordinator.json", bytes).await {
                    tracing::warn!("cannot update coordinator.json: {e}");
                }
            });
        }
        let local = self.launch.local_workers;
        let all_local_gone =
            local > 0 && self.alive_local == 0 && generation > self.launch.first_generation;
        if let Some(rank) = silent.first() {
            Turn::Ended(Ended {
                generation,
                message: format!(
                    "rank {rank} sent no heartbeat for {:.0} s",
                    timeout.as_secs_f64()
                ),
                permanent: false,
            })
        } else if !formed && (self.generation_began.elapsed() > rejoin_timeout || all_local_gone) {
            Turn::RunOver(Err(anyhow!(
                "generation {generation} did not form: fewer than workers.min = {} workers joined within {:.0} s",
                config.workers.min,
                rejoin_timeout.as_secs_f64()
            )))
        } else {
            Turn::Continue
        }
    }

    /// The first signal stops the run after the next checkpoint; a second aborts it.
    fn on_signal(&mut self) -> Turn {
        self.interrupts += 1;
        if self.interrupts > 1 {
            return Turn::RunOver(Ok(EXIT_STOPPED));
        }
        eprintln!(
            "\ncoordinator: stopping after the next checkpoint (a second signal aborts without it)"
        );
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Ok(mut s) = self.shared.status.lock() {
            s.state = "stopping".into();
        }
        Turn::Continue
    }

    /// Starts the next generation after a failed one; `Some` ends the run instead.
    fn restart(&mut self, ended: Ended) -> Option<Result<i32>> {
        if ended.generation != self.generation() {
            return None; // already handled: that generation has ended
        }
        if ended.permanent {
            return Some(Err(Permanent(ended.message).into()));
        }
        let max = self.shared.config.workers.max_restarts;
        if self.restarts >= max {
            return Some(Err(anyhow!(
                "giving up after {} restarts (workers.max_restarts = {max}); last failure: {}",
                self.restarts,
                ended.message
            )));
        }
        self.restarts += 1;
        let resume_step = self.shared.committer.committed().map_or(0, |c| c.step);
        tracing::warn!(
            "generation {} ended ({}); restart {}/{max}: the survivors rejoin and resume from step {resume_step}",
            ended.generation,
            ended.message,
            self.restarts,
        );
        if let Ok(mut m) = self.shared.membership.lock() {
            m.next_generation(Instant::now());
        }
        if let Ok(mut s) = self.shared.status.lock() {
            s.restarts = self.restarts;
        }
        self.generation_began = Instant::now();
        None
    }
}

fn finish(shared: &Shared, step: u64) -> i32 {
    let status = shared.snapshot();
    let stopped = shared.stop.load(Ordering::Relaxed);
    eprintln!(
        "coordinator: run {} {} at step {step}; last loss {}; checkpoint at step {}; results in {}{}",
        shared.config.run.name,
        if stopped { "stopped" } else { "finished" },
        status.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
        status.last_checkpoint_step.map_or("-".into(), |s| s.to_string()),
        shared.store.url(),
        if stopped { "; the same command resumes it" } else { "" }
    );
    if stopped {
        EXIT_STOPPED
    } else {
        0
    }
}

/// After the run: tell connected workers, stop local processes, flush the TensorBoard file
/// and record the final state in `coordinator.json`.
pub async fn wind_down(shared: &Shared, outcome: &Result<i32>) {
    let state = match outcome {
        Ok(0) => "finished",
        Ok(EXIT_STOPPED) => "stopped",
        Ok(_) => "interrupted",
        Err(_) => "failed",
    };
    if let Ok(mut over) = shared.run_over.lock() {
        *over = Some(format!("the run has {state}"));
    }
    // Let workers that are still connected hear the end before their processes are stopped.
    tokio::time::sleep(Duration::from_millis(200)).await;
    supervisor::kill_all();
    let tensorboard_written = shared
        .metrics
        .lock()
        .ok()
        .and_then(|mut sink| sink.finish(state == "finished" || state == "stopped"));
    if let Some(written) = tensorboard_written {
        if tokio::time::timeout(Duration::from_secs(30), written)
            .await
            .is_err()
        {
            tracing::warn!("TensorBoard: the last event file was not written within 30 s");
        }
    }
    if let Ok(mut s) = shared.status.lock() {
        s.state = state.into();
    }
    let generation = shared.membership.lock().map(|m| m.generation).unwrap_or(0);
    let info = serde_json::json!({ "state": state, "generation": generation });
    if let Err(e) = shared
        .store
        .put("coordinator.json", Bytes::from(info.to_string()))
        .await
    {
        tracing::warn!("cannot record the end in coordinator.json: {e}");
    }
}
