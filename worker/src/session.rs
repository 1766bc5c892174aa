//! The worker's side of the coordinator contract: join the run, keep the heartbeat going,
//! forward metrics in the background, commit checkpoints, report the end. Joining yields a
//! plain [`Generation`] whose [`RunLink`] is this client, so the trainer knows no gRPC.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use simmim_proto::auth::{AddToken, Client};
use simmim_proto::pb::coordinator_client::CoordinatorClient;
use simmim_proto::pb::{
    DoneRequest, FailureRequest, HeartbeatRequest, MetricsReport, RegisterReply, RegisterRequest,
    StepMetrics,
};
use simmim_proto::{Manifest, Permanent, RunConfig};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::collective::setup::{self, Members};
use crate::device::Device;
use crate::generation::{BatchShape, Generation, RunLink};
use crate::host::{hostname, worker_id};

/// How long a worker keeps trying to reach the coordinator (starting before it, or while it
/// restarts): `SIMMIM_CONNECT_PATIENCE_S`, default 30 minutes.
fn connect_patience() -> Duration {
    let seconds = std::env::var("SIMMIM_CONNECT_PATIENCE_S")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(1800.0);
    Duration::from_secs_f64(seconds)
}

/// The coordinator says the run is over: nothing is left for this worker to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RunOver(pub String);

/// A stop signal arrived while this worker was not training.
#[derive(Debug, thiserror::Error)]
#[error("stopped by a signal while waiting to join")]
pub struct Terminated;

/// A worker's membership in one generation, as the coordinator sees it.
pub struct Session {
    link: Arc<CoordinatorLink>,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        for task in &self.background {
            task.abort();
        }
    }
}

/// The coordinator, as the trainer's [`RunLink`].
struct CoordinatorLink {
    client: Client,
    runtime: tokio::runtime::Handle,
    generation: u64,
    rank: u32,
    /// Set by the heartbeat when the coordinator asks the run to stop.
    stop: Arc<AtomicBool>,
    /// Set by the heartbeat when the coordinator is gone or has moved on without us.
    lost: Arc<std::sync::Mutex<Option<String>>>,
    step: Arc<AtomicU64>,
    metrics: mpsc::UnboundedSender<StepMetrics>,
    /// Metrics queued but not yet delivered.
    pending: Arc<AtomicU64>,
    /// Set by the trainer when it stopped before the end of its plan.
    stopped_early: AtomicBool,
}

impl RunLink for CoordinatorLink {
    fn report(&self, metrics: StepMetrics) {
        self.step.store(metrics.step, Ordering::Relaxed);
        self.pending.fetch_add(1, Ordering::SeqCst);
        if self.metrics.send(metrics).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn lost(&self) -> Option<String> {
        self.lost.lock().ok().and_then(|l| l.clone())
    }

    fn stopped_early(&self) {
        self.stopped_early.store(true, Ordering::Relaxed);
    }

    fn commit(
        &self,
        manifest: Manifest,
    ) -> futures::future::BoxFuture<'static, Result<String, String>> {
        let mut client = self.client.clone();
        let (generation, rank, step) = (self.generation, self.rank, manifest.step);
        Box::pin(async move {
            let request = simmim_proto::pb::CommitRequest {
                generation,
                rank,
                manifest_json: serde_json::to_string(&manifest).map_err(|e| e.to_string())?,
            };
            let reply = client.commit_checkpoint(request).await.map_err(|s| {
                format!(
                    "the coordinator did not commit step {step}: {}",
                    s.message()
                )
            })?;
            Ok(reply.into_inner().manifest)
        })
    }
}

impl Session {
    /// Registers with the coordinator at `url` (waiting for a place), forms the transport
    /// with the generation's other ranks, and starts the heartbeat and metrics tasks.
    pub fn join(
        runtime: &tokio::runtime::Runtime,
        url: &str,
        device: Device,
    ) -> Result<(Self, Generation)> {
        let handle = runtime.handle().clone();
        let token = simmim_proto::auth::token_from_env().map_err(|e| anyhow!(e))?;
        let channel = runtime.block_on(connect(url))?;
        let mut client = CoordinatorClient::with_interceptor(
            channel,
            AddToken::new(token.as_deref()).map_err(|e| anyhow!(e))?,
        );
        let listener = setup::listener(url)?;
        let request = RegisterRequest {
            worker_id: worker_id(),
            hostname: hostname(),
            pid: std::process::id(),
            device: device.to_string(),
            transport_addr: listener.address().to_string(),
        };
        let joined = runtime.block_on(register(&mut client, request, url))?;
        let config = RunConfig::from_yaml(&joined.run_config_yaml, "the coordinator's run config")?;
        let (metrics, queue) = mpsc::unbounded_channel();
        let link = Arc::new(CoordinatorLink {
            client: client.clone(),
            runtime: handle.clone(),
            generation: joined.generation,
            rank: joined.rank,
            stop: Arc::new(AtomicBool::new(false)),
            lost: Arc::new(std::sync::Mutex::new(None)),
            step: Arc::new(AtomicU64::new(joined.resume.as_ref().map_or(0, |r| r.step))),
            metrics,
            pending: Arc::new(AtomicU64::new(0)),
            stopped_early: AtomicBool::new(false),
        });
        let background = vec![
            runtime.spawn(forward_metrics(
                client.clone(),
                joined.generation,
                joined.rank,
                queue,
                link.pending.clone(),
            )),
            runtime.spawn(heartbeat(
                client,
                joined.clone(),
                Duration::from_secs_f64(config.workers.heartbeat_timeout_s),
                link.stop.clone(),
                link.lost.clone(),
                link.step.clone(),
            )),
        ];
        let members = Members {
            rank: joined.rank as usize,
            peers: &joined.peers,
            token: token.as_deref().unwrap_or_default().as_bytes(),
            generation: joined.generation,
            heartbeat_timeout_s: config.workers.heartbeat_timeout_s,
        };
        let collective = setup::form(listener, members, device)?;
        let batch = BatchShape {
            micro_batch: joined.micro_batch as usize,
            accumulation: joined.accumulation as usize,
            reference_global_batch: joined.reference_global_batch,
            lr_scale: joined.lr_scale,
        };
        let generation = Generation::new(
            joined.generation,
            config,
            joined.run_url,
            batch,
            joined.resume.map(|r| r.manifest),
            handle,
            link.clone(),
            collective,
        );
        Ok((Self { link, background }, generation))
    }

    /// Reports the end of this generation's plan; `Ok(true)` means the run goes on and this
    /// worker registers again.
    pub fn done(&self, final_step: u64) -> Result<bool> {
        let link = &self.link;
        // Let queued metrics go out first (bounded wait).
        let deadline = Instant::now() + Duration::from_secs(5);
        while link.pending.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let request = DoneRequest {
            generation: link.generation,
            rank: link.rank,
            final_step,
            stopped_early: link.stopped_early.load(Ordering::Relaxed),
        };
        let reply = link
            .runtime
            .block_on(link.client.clone().report_done(request))
            .map_err(|s| anyhow!("reporting the end: {}", s.message()))?;
        Ok(reply.into_inner().rejoin)
    }

    pub fn fail(&self, message: &str, retryable: bool) {
        let link = &self.link;
        let request = FailureRequest {
            generation: link.generation,
            rank: link.rank,
            message: message.to_string(),
            retryable,
        };
        let mut client = link.client.clone();
        let _ = link.runtime.block_on(async move {
            tokio::time::timeout(Duration::from_secs(5), client.report_failure(request)).await
        });
    }
}

/// Registers, asking again while the coordinator has no place yet (a generation is running,
/// or forming without room) or cannot be reached (it restarts); never gives up on a refusal a
/// retry can fix. Ends when the run is over, on a wrong token, or on a stop signal.
async fn register(
    client: &mut Client,
    request: RegisterRequest,
    url: &str,
) -> Result<RegisterReply> {
    let patience = connect_patience();
    let mut unreachable_since: Option<Instant> = None;
    let mut said_waiting = false;
    loop {
        if crate::shutdown::requested() {
            return Err(Terminated.into());
        }
        match client.register(request.clone()).await {
            Ok(reply) => return Ok(reply.into_inner()),
            Err(status) => match status.code() {
                tonic::Code::Aborted => return Err(RunOver(status.message().to_string()).into()),
                tonic::Code::Unauthenticated | tonic::Code::InvalidArgument => {
                    return Err(Permanent(format!(
                        "the coordinator at {url} refused registration: {}",
                        status.message()
                    ))
                    .into())
                }
                // The coordinator kept this worker's place and ends each long poll so.
                tonic::Code::DeadlineExceeded => {
                    unreachable_since = None;
                    if !said_waiting {
                        said_waiting = true;
                        tracing::info!("waiting for a place in the next generation");
                    }
                }
                _ => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > patience {
                        return Err(anyhow!(
                            "the coordinator at {url} did not take this worker for {patience:?}: {}",
                            status.message()
                        ));
                    }
                    tracing::info!(
                        "registration not taken ({}); asking again",
                        status.message()
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
        }
    }
}

async fn connect(url: &str) -> Result<Channel> {
    let endpoint = simmim_proto::auth::endpoint(url)
        .map_err(|e| anyhow!(e))?
        .connect_timeout(Duration::from_secs(5));
    let started = Instant::now();
    let patience = connect_patience();
    loop {
        if crate::shutdown::requested() {
            return Err(Terminated.into());
        }
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) if started.elapsed() < patience => {
                tracing::debug!("coordinator at {url} not reachable yet: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => {
                return Err(anyhow!(
                    "cannot reach the coordinator at {url} for {patience:?}: {e}"
                ))
            }
        }
    }
}

/// Sends queued step metrics in batches, in order.
async fn forward_metrics(
    mut client: Client,
    generation: u64,
    rank: u32,
    mut queue: mpsc::UnboundedReceiver<StepMetrics>,
    pending: Arc<AtomicU64>,
) {
    while let Some(first) = queue.recv().await {
        let mut steps = vec![first];
        while let Ok(more) = queue.try_recv() {
            steps.push(more);
        }
        let count = steps.len() as u64;
        let report = MetricsReport {
            generation,
            rank,
            steps,
        };
        if let Err(status) = client.report_metrics(report).await {
            tracing::warn!("metrics not delivered: {}", status.message());
        }
        pending.fetch_sub(count, Ordering::SeqCst);
    }
}

async fn heartbeat(
    mut client: Client,
    joined: RegisterReply,
    timeout: Duration,
    stop: Arc<AtomicBool>,
    lost: Arc<std::sync::Mutex<Option<String>>>,
    step: Arc<AtomicU64>,
) {
    let interval = Duration::from_millis(joined.heartbeat_interval_ms.max(100));
    let mut last_ok = Instant::now();
    loop {
        // A stop signal is voted at the next step, not the next heartbeat.
        let slept = Instant::now();
        while slept.elapsed() < interval {
            if crate::shutdown::requested() {
                stop.store(true, Ordering::Relaxed);
            }
            tokio::time::sleep(interval.min(Duration::from_millis(100))).await;
        }
        let request = HeartbeatRequest {
            generation: joined.generation,
            rank: joined.rank,
            step: step.load(Ordering::Relaxed),
        };
        match tokio::time::timeout(timeout, client.heartbeat(request)).await {
            Ok(Ok(reply)) => {
                last_ok = Instant::now();
                if reply.into_inner().stop {
                    stop.store(true, Ordering::Relaxed);
                }
            }
            Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
                set_lost(
                    &lost,
                    format!(
                        "the coordinator ended this worker's generation: {}",
                        status.message()
                    ),
                );
                return;
            }
            _ if last_ok.elapsed() > timeout => {
                set_lost(
                    &lost,
                    format!(
                        "no answer from the coordinator for {:.0} s",
                        timeout.as_secs_f64()
                    ),
                );
                return;
            }
            _ => {}
        }
    }
}

fn set_lost(lost: &std::sync::Mutex<Option<String>>, reason: String) {
    if let Ok(mut slot) = lost.lock() {
        slot.get_or_insert(reason);
    }
}
