//! The gRPC face of the coordinator: translates messages and calls the membership state
//! machine, the metrics sink and the run store. Decisions about processes (restart, give up)
//! are the supervisor's; this layer only reports events to it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use simmim_proto::checkpoint::{retention, CommitError, Committer};
use simmim_proto::pb::coordinator_server::Coordinator;
use simmim_proto::pb::{
    Ack, CommitReply, CommitRequest, DoneReply, DoneRequest, FailureRequest, HeartbeatReply,
    HeartbeatRequest, MetricsReport, RegisterReply, RegisterRequest, StatusReply, StatusRequest,
};
use simmim_proto::store::RunStore;
use simmim_proto::{Manifest, RunStatus};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::membership::{Admission, Joiner, Membership, Refusal};
use crate::metrics::MetricsSink;

/// How long one register call waits for a place before the worker is told to ask again (with
/// `DeadlineExceeded`, which the worker reads as "keep your place and ask again").
const REGISTER_POLL: Duration = Duration::from_secs(20);

/// What the supervisor needs to hear about.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Failed {
        generation: u64,
        rank: u32,
        message: String,
        retryable: bool,
    },
    AllDone {
        step: u64,
    },
    /// Every member stopped after a checkpoint so the next generation can form (with the
    /// workers waiting, or without one that left): not a failure.
    Regroup {
        generation: u64,
    },
}

pub struct Shared {
    pub config: simmim_proto::RunConfig,
    /// Set when the run has ended (finished or failed): registrations are refused with it.
    pub run_over: Mutex<Option<String>>,
    pub membership: Mutex<Membership>,
    pub events: mpsc::UnboundedSender<Event>,
    pub config_yaml: String,
    pub store: RunStore,
    pub heartbeat_interval: Duration,
    /// Commits checkpoints; its newest is where a new generation resumes.
    pub committer: Committer,
    pub stop: AtomicBool,
    pub metrics: Mutex<MetricsSink>,
    pub status: Mutex<RunStatus>,
    pub counters: Counters,
}

/// Event counts for the Prometheus endpoint.
#[derive(Debug, Default)]
pub struct Counters {
    pub commits: std::sync::atomic::AtomicU64,
    pub commit_failures: std::sync::atomic::AtomicU64,
    /// Requests refused for a missing or wrong token.
    pub refused_token: std::sync::atomic::AtomicU64,
    /// Calls refused by the membership (stale generation, unknown rank).
    pub refused_membership: std::sync::atomic::AtomicU64,
}

pub struct Service {
    pub shared: std::sync::Arc<Shared>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks would be a bug in this file; the data is
    // still consistent for reading, so keep serving rather than poisoning the whole run.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        let req = request.into_inner();
        let joiner = Joiner {
            worker_id: req.worker_id.clone(),
            hostname: req.hostname.clone(),
            device: req.device.clone(),
            pid: req.pid,
            transport_addr: req.transport_addr.clone(),
        };
        // Wait for a place: in the forming generation (all workers present, or the minimum
        // after the last call), or, while a generation runs, in the next one (the running one
        // is asked to regroup when it has room). The call is bounded so a client that gives up
        // leaves no task behind; the worker asks again and keeps its place in the queue.
        let deadline = Instant::now() + REGISTER_POLL;
        let mut announced = false;
        let (generation, rank, world, peers) = loop {
            if let Some(reason) = locked(&self.shared.run_over).clone() {
                return Err(Status::aborted(format!("the run has ended: {reason}")));
            }
            let admission = {
                let mut m = locked(&self.shared.membership);
                match m.ask(&joiner, Instant::now()) {
                    Admission::Member { rank } => {
                        let world = m.world.unwrap_or_default();
                        break (m.generation, rank, world, m.peers());
                    }
                    other => other,
                }
            };
            if let Admission::Left { generation, rank } = admission {
                tracing::warn!(
                    generation,
                    rank,
                    worker = %req.worker_id,
                    "a member registered anew: it has left its generation, which ends"
                );
                let _ = self.shared.events.send(Event::Failed {
                    generation,
                    rank,
                    message: format!(
                        "worker {} (rank {rank}) left the generation and registered again",
                        req.worker_id
                    ),
                    retryable: true,
                });
            } else if !announced {
                announced = true;
                tracing::info!(worker = %req.worker_id, host = %req.hostname, "worker waiting to join");
            }
            if Instant::now() > deadline {
                return Err(Status::deadline_exceeded(
                    "still waiting for a place in a generation; ask again",
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        tracing::info!(rank, generation, worker = %req.worker_id, host = %req.hostname, "worker admitted");
        let (accumulation, lr_scale, note) = self.shared.config.batch_for_world(world as usize);
        if let (Some(note), 0) = (note, rank) {
            tracing::warn!(generation, "{note}");
        }
        if rank == 0 {
            locked(&self.shared.status).world_size = world;
            tracing::info!(generation, world, "generation formed");
        }
        Ok(Response::new(RegisterReply {
            generation,
            rank,
            world_size: world,
            peers,
            micro_batch: self.shared.config.train.micro_batch as u32,
            accumulation: accumulation as u32,
            lr_scale,
            reference_global_batch: self.shared.config.reference_global_batch() as u64,
            run_config_yaml: self.shared.config_yaml.clone(),
            run_url: self.shared.store.url().to_string(),
            resume: self.shared.committer.committed().map(Into::into),
            heartbeat_interval_ms: self.shared.heartbeat_interval.as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let req = request.into_inner();
        let regroup = {
            let mut m = locked(&self.shared.membership);
            m.heartbeat(req.generation, req.rank, req.step, Instant::now())
                .map_err(|r| self.refused(r))?;
            m.regroup
        };
        Ok(Response::new(HeartbeatReply {
            stop: self.shared.stop.load(Ordering::Relaxed) || regroup,
        }))
    }

    async fn report_metrics(
        &self,
        request: Request<MetricsReport>,
    ) -> Result<Response<Ack>, Status> {
        let req = request.into_inner();
        {
            let mut m = locked(&self.shared.membership);
            m.check(req.generation, req.rank)
                .map_err(|r| self.refused(r))?;
            if let (Some(member), Some(last)) = (m.members.get_mut(&req.rank), req.steps.last()) {
                member.step = member.step.max(last.step);
                member.step_seconds = last.step_seconds;
                member.data_wait_share = last.data_wait_share;
                member.allreduce_seconds = last.allreduce_seconds;
                member.last_heartbeat = Instant::now();
            }
        }
        if req.steps.iter().any(|s| !s.sample_ids.is_empty()) {
            let mut sink = locked(&self.shared.metrics);
            for step in &req.steps {
                sink.record_samples(req.generation, req.rank, step);
            }
        }
        if req.rank == 0 {
            let mut sink = locked(&self.shared.metrics);
            let mut status = locked(&self.shared.status);
            for step in &req.steps {
                sink.record(req.generation, step);
                status.step = step.step;
                status.epoch = step.epoch;
                status.total_steps = step.end_step;
                status.last_loss = Some(step.loss);
                status.last_lr = Some(step.lr);
                status.images_per_sec = Some(step.images_per_sec);
                status.data_wait_share = Some(step.data_wait_share);
                status.allreduce_seconds = Some(step.allreduce_seconds);
            }
        }
        Ok(Response::new(Ack {}))
    }

    async fn commit_checkpoint(
        &self,
        request: Request<CommitRequest>,
    ) -> Result<Response<CommitReply>, Status> {
        let outcome = self.commit(request.into_inner()).await;
        let counter = match &outcome {
            Ok(_) => &self.shared.counters.commits,
            Err(_) => &self.shared.counters.commit_failures,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        outcome
    }

    async fn report_done(
        &self,
        request: Request<DoneRequest>,
    ) -> Result<Response<DoneReply>, Status> {
        let req = request.into_inner();
        let all = locked(&self.shared.membership)
            .mark_done(req.generation, req.rank)
            .map_err(|r| self.refused(r))?;
        // A generation that stopped early without the run being stopped (a regroup to admit
        // waiting workers, or a worker leaving on SIGTERM) is followed by the next one.
        let rejoin = req.stopped_early && !self.shared.stop.load(Ordering::Relaxed);
        if all {
            let event = if rejoin {
                Event::Regroup {
                    generation: req.generation,
                }
            } else {
                Event::AllDone {
                    step: req.final_step,
                }
            };
            let _ = self.shared.events.send(event);
        }
        Ok(Response::new(DoneReply { rejoin }))
    }

    async fn report_failure(
        &self,
        request: Request<FailureRequest>,
    ) -> Result<Response<Ack>, Status> {
        let req = request.into_inner();
        locked(&self.shared.membership)
            .check(req.generation, req.rank)
            .map_err(|r| self.refused(r))?;
        let _ = self.shared.events.send(Event::Failed {
            generation: req.generation,
            rank: req.rank,
            message: req.message,
            retryable: req.retryable,
        });
        Ok(Response::new(Ack {}))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        let json = serde_json::to_string(&self.shared.snapshot())
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(StatusReply { status_json: json }))
    }
}

impl Service {
    fn refused(&self, r: Refusal) -> Status {
        self.shared
            .counters
            .refused_membership
            .fetch_add(1, Ordering::Relaxed);
        Status::failed_precondition(r.to_string())
    }

    /// Commits a checkpoint the workers have written (the protocol is
    /// [`simmim_proto::checkpoint::Committer`]'s), then applies retention in the background.
    async fn commit(&self, req: CommitRequest) -> Result<Response<CommitReply>, Status> {
        locked(&self.shared.membership)
            .check(req.generation, req.rank)
            .map_err(|r| self.refused(r))?;
        let manifest: Manifest = serde_json::from_str(&req.manifest_json)
            .map_err(|e| Status::invalid_argument(format!("not a manifest: {e}")))?;
        let committed = self
            .shared
            .committer
            .commit(&manifest)
            .await
            .map_err(|e| match e {
                CommitError::Unavailable(m) => Status::unavailable(m),
                CommitError::Conflict(m) => Status::already_exists(m),
                CommitError::Incomplete(m) => Status::failed_precondition(m),
                CommitError::AnotherWriter(m) => Status::aborted(m),
            })?;
        locked(&self.shared.status).last_checkpoint_step = Some(committed.step);
        let (store, policy) = (
            self.shared.store.clone(),
            self.shared.config.checkpoint.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = retention::apply(&store, &policy, committed.step).await {
                tracing::warn!("checkpoint retention: {e}");
            }
        });
        locked(&self.shared.metrics).flush();
        tracing::info!(
            step = committed.step,
            "checkpoint committed: {}",
            self.shared.store.url_of(&committed.manifest)
        );
        Ok(Response::new(CommitReply {
            manifest: committed.manifest,
        }))
    }
}

impl Shared {
    pub fn snapshot(&self) -> RunStatus {
        let now = Instant::now();
        let mut status = locked(&self.status).clone();
        status.refused_unauthenticated = self.counters.refused_token.load(Ordering::Relaxed);
        let m = locked(&self.membership);
        status.generation = m.generation;
        status.waiting = m
            .waiting
            .iter()
            .map(|w| simmim_proto::status::WaitingWorker {
                worker_id: w.joiner.worker_id.clone(),
                hostname: w.joiner.hostname.clone(),
                device: w.joiner.device.clone(),
                waiting_ms: now.duration_since(w.since).as_millis() as u64,
            })
            .collect();
        let mut times: Vec<f64> = m.members.values().map(|w| w.step_seconds).collect();
        times.sort_by(f64::total_cmp);
        let median = times.get(times.len() / 2).copied().unwrap_or(0.0);
        status.workers = m
            .members
            .values()
            .map(|w| simmim_proto::status::WorkerStatus {
                rank: w.rank,
                worker_id: w.worker_id.clone(),
                hostname: w.hostname.clone(),
                device: w.device.clone(),
                step: w.step,
                last_heartbeat_ms_ago: now.duration_since(w.last_heartbeat).as_millis() as u64,
                step_seconds: w.step_seconds,
                data_wait_share: w.data_wait_share,
                allreduce_seconds: w.allreduce_seconds,
                pid: w.pid,
                transport_addr: w.transport_addr.clone(),
                straggler: m.members.len() > 1 && median > 0.0 && w.step_seconds > 1.5 * median,
            })
            .collect();
        status
    }
}

/// The gRPC interceptor that admits only requests carrying the run token.
pub fn require_token(
    token: String,
    shared: std::sync::Arc<Shared>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let presented = request
            .metadata()
            .get(simmim_proto::auth::TOKEN_HEADER)
            .map(|v| v.as_bytes().to_vec());
        match presented {
            Some(p) if simmim_proto::auth::same_token(&p, token.as_bytes()) => Ok(request),
            other => {
                let n = shared
                    .counters
                    .refused_token
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                tracing::warn!(
                    refused = n,
                    peer = ?request.remote_addr(),
                    "refused a request with {} run token",
                    if other.is_some() { "a wrong" } else { "no" }
                );
                Err(Status::unauthenticated(
                    "missing or wrong run token: set SIMMIM_TOKEN or SIMMIM_TOKEN_FILE to the coordinator's",
                ))
            }
        }
    }
}
