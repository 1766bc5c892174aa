//! The worker's side of the coordinator contract: join the run, keep the heartbeat going,
//! forward metrics in the background, commit checkpoints, report the end.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use simmim_proto::auth::{AddToken, Client};
use simmim_proto::pb::coordinator_client::CoordinatorClient;
use simmim_proto::pb::{
    DoneRequest, FailureRequest, HeartbeatRequest, MetricsReport, RegisterReply, RegisterRequest,
    StepMetrics,
};
use simmim_proto::RunConfig;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::collective::{io_timeout, Collective, Ring, RingListener, Solo};

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

pub struct Session {
    pub client: Client,
    pub runtime: tokio::runtime::Handle,
    pub joined: RegisterReply,
    pub config: RunConfig,
    /// Set by the heartbeat when the coordinator asks the run to stop.
    pub stop: Arc<AtomicBool>,
    /// Set by the heartbeat when the coordinator is gone or has moved on without us.
    pub lost: Arc<std::sync::Mutex<Option<String>>>,
    pub step: Arc<AtomicU64>,
    metrics: mpsc::UnboundedSender<StepMetrics>,
    /// Metrics queued but not yet delivered.
    pending: Arc<AtomicU64>,
    /// This generation's gradient transport.
    pub collective: std::sync::Mutex<Box<dyn Collective>>,
    /// Set by the train loop when it stopped before the end of its plan.
    pub stopped_early: AtomicBool,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        for task in &self.background {
            task.abort();
        }
    }
}

/// Where this worker's transport listens and what address it announces: the coordinator's
/// loopback means a local run; otherwise `SIMMIM_ADVERTISE_HOST` (a pod IP or DNS name) or the
/// host name. `SIMMIM_TRANSPORT_PORT` pins the port (default: any free one).
fn transport_listener(coordinator_url: &str) -> Result<RingListener> {
    let local = coordinator_url.contains("127.0.0.1") || coordinator_url.contains("localhost");
    let port = match std::env::var("SIMMIM_TRANSPORT_PORT") {
        Ok(p) => p
            .parse()
            .map_err(|_| anyhow!("SIMMIM_TRANSPORT_PORT=`{p}` is not a port number"))?,
        Err(_) => 0,
    };
    let (bind, advertise) = if local {
        ("127.0.0.1".to_string(), "127.0.0.1".to_string())
    } else {
        let advertise = std::env::var("SIMMIM_ADVERTISE_HOST").unwrap_or_else(|_| hostname());
        ("0.0.0.0".to_string(), advertise)
    };
    RingListener::bind(&bind, port, &advertise)
        .with_context(|| format!("binding the gradient transport on {bind}:{port}"))
}

/// NCCL between GPU workers (set up over the ring, which then closes), unless
/// `SIMMIM_COLLECTIVE=ring` keeps the TCP ring; CPU workers keep the ring.
#[cfg(feature = "cuda")]
fn gpu_transport(
    mut ring: Box<dyn Collective>,
    device: &str,
    timeout: Duration,
) -> Result<Box<dyn Collective>> {
    use crate::collective::nccl::{share_unique_id, Nccl};
    let Some(rest) = device.strip_prefix("cuda") else {
        return Ok(ring);
    };
    if std::env::var("SIMMIM_COLLECTIVE").is_ok_and(|v| v == "ring") {
        tracing::info!("SIMMIM_COLLECTIVE=ring: gradients stay on the TCP ring");
        return Ok(ring);
    }
    let ordinal: usize = rest.trim_start_matches(':').parse().unwrap_or(0);
    let started = Instant::now();
    let id = share_unique_id(ring.as_mut())?;
    let nccl = Nccl::connect(ordinal, ring.rank(), ring.world(), id, timeout)?;
    tracing::info!(
        rank = ring.rank(),
        world = ring.world(),
        "NCCL communicator formed on cuda:{ordinal} in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(Box::new(nccl))
}

#[cfg(not(feature = "cuda"))]
fn gpu_transport(
    ring: Box<dyn Collective>,
    _device: &str,
    _timeout: Duration,
) -> Result<Box<dyn Collective>> {
    Ok(ring)
}

impl Session {
    pub fn join(runtime: &tokio::runtime::Runtime, url: &str, device: &str) -> Result<Self> {
        let handle = runtime.handle().clone();
        let token = simmim_proto::auth::token_from_env().map_err(|e| anyhow!(e))?;
        let channel = runtime.block_on(connect(url))?;
        let mut client = CoordinatorClient::with_interceptor(
            channel,
            AddToken::new(token.as_deref()).map_err(|e| anyhow!(e))?,
        );
        let listener = transport_listener(url)?;
        let request = RegisterRequest {
            worker_id: worker_id(),
            hostname: hostname(),
            pid: std::process::id(),
            device: device.to_string(),
            transport_addr: listener.address().to_string(),
        };
        let joined = runtime.block_on(register(&mut client, request, url))?;
        let config = RunConfig::from_yaml(&joined.run_config_yaml, "the coordinator's run config")?;
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(std::sync::Mutex::new(None));
        let step = Arc::new(AtomicU64::new(joined.resume.as_ref().map_or(0, |r| r.step)));
        let (metrics, queue) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicU64::new(0));
        let background = vec![
            runtime.spawn(forward_metrics(
                client.clone(),
                joined.generation,
                joined.rank,
                queue,
                pending.clone(),
            )),
            runtime.spawn(heartbeat(
                client.clone(),
                joined.clone(),
                Duration::from_secs_f64(config.workers.heartbeat_timeout_s),
                stop.clone(),
                lost.clone(),
                step.clone(),
            )),
        ];
        let collective: Box<dyn Collective> = if joined.world_size <= 1 {
            Box::new(Solo)
        } else {
            let started = Instant::now();
            let ring = Ring::establish(
                listener,
                joined.rank as usize,
                &joined.peers,
                token.as_deref().unwrap_or_default().as_bytes(),
                joined.generation,
                io_timeout(config.workers.heartbeat_timeout_s),
            )?;
            tracing::info!(
                rank = joined.rank,
                world = joined.world_size,
                "gradient ring formed in {:.2} s",
                started.elapsed().as_secs_f64()
            );
            gpu_transport(
                Box::new(ring),
                device,
                io_timeout(config.workers.heartbeat_timeout_s),
            )?
        };
        Ok(Self {
            client,
            runtime: handle,
            joined,
            config,
            stop,
            lost,
            step,
            metrics,
            pending,
            collective: std::sync::Mutex::new(collective),
            stopped_early: AtomicBool::new(false),
            background,
        })
    }

    pub fn report(&self, metrics: StepMetrics) {
        self.step.store(metrics.step, Ordering::Relaxed);
        self.pending.fetch_add(1, Ordering::SeqCst);
        if self.metrics.send(metrics).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
        }
    }

    pub fn lost_reason(&self) -> Option<String> {
        self.lost.lock().ok().and_then(|l| l.clone())
    }

    /// Reports the end of this generation's plan; `Ok(true)` means the run goes on and this
    /// worker registers again.
    pub fn done(&self, final_step: u64) -> Result<bool> {
        // Let queued metrics go out first (bounded wait).
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.pending.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let request = DoneRequest {
            generation: self.joined.generation,
            rank: self.joined.rank,
            final_step,
            stopped_early: self.stopped_early.load(Ordering::Relaxed),
        };
        let reply = self
            .runtime
            .block_on(self.client.clone().report_done(request))
            .map_err(|s| anyhow!("reporting the end: {}", s.message()))?;
        Ok(reply.into_inner().rejoin)
    }

    pub fn fail(&self, message: &str, retryable: bool) {
        let request = FailureRequest {
            generation: self.joined.generation,
            rank: self.joined.rank,
            message: message.to_string(),
            retryable,
        };
        let mut client = self.client.clone();
        let _ = self.runtime.block_on(async move {
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
                    return Err(crate::train::Permanent(format!(
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

/// `SIMMIM_WORKER_ID`; in a Kubernetes Indexed Job `index-<JOB_COMPLETION_INDEX>`, so a
/// replacement pod takes over its predecessor's place; else host and process id.
fn worker_id() -> String {
    if let Ok(id) = std::env::var("SIMMIM_WORKER_ID") {
        return id;
    }
    if let Ok(index) = std::env::var("JOB_COMPLETION_INDEX") {
        return format!("index-{index}");
    }
    format!("{}-{}", hostname(), std::process::id())
}

pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "localhost".into())
}
