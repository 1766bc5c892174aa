//! The gRPC face of the coordinator: translates messages and calls the membership state
//! machine, the metrics sink and the run store. Decisions about processes (restart, give up)
//! are the supervisor's; this layer only reports events to it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use simmim_proto::manifest::LATEST_FILE;
use simmim_proto::pb::coordinator_server::Coordinator;
use simmim_proto::pb::{
    Ack, CommitReply, CommitRequest, DoneRequest, FailureRequest, HeartbeatReply, HeartbeatRequest,
    MetricsReport, RegisterReply, RegisterRequest, ResumePoint, StatusReply, StatusRequest,
};
use simmim_proto::store::RunStore;
use simmim_proto::{Manifest, RunStatus};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::membership::{Membership, Refusal};
use crate::metrics::MetricsSink;

/// What the supervisor needs to hear about.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Failed {
        rank: u32,
        message: String,
        retryable: bool,
    },
    AllDone {
        step: u64,
    },
}

pub struct Shared {
    pub membership: Mutex<Membership>,
    pub events: mpsc::UnboundedSender<Event>,
    pub config_yaml: String,
    pub run_name: String,
    pub store: RunStore,
    pub heartbeat_interval: Duration,
    pub resume: Mutex<Option<ResumePoint>>,
    pub stop: AtomicBool,
    pub metrics: Mutex<MetricsSink>,
    pub status: Mutex<RunStatus>,
}

pub struct Service {
    pub shared: std::sync::Arc<Shared>,
}

fn refused(r: Refusal) -> Status {
    Status::failed_precondition(r.to_string())
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
        let (generation, rank) = {
            let mut m = locked(&self.shared.membership);
            let rank = m
                .register(&req.worker_id, &req.hostname, &req.device, Instant::now())
                .map_err(refused)?;
            (m.generation, rank)
        };
        tracing::info!(rank, generation, worker = %req.worker_id, host = %req.hostname, "worker registered");
        // Wait for the generation to form (all workers present, or the minimum after the
        // last call); bounded so a client that gives up does not leave a task behind.
        let deadline = Instant::now() + Duration::from_secs(600);
        let world = loop {
            {
                let mut m = locked(&self.shared.membership);
                if m.generation != generation {
                    return Err(refused(Refusal::Stale {
                        sent: generation,
                        current: m.generation,
                    }));
                }
                if let Some(world) = m.try_form(Instant::now()) {
                    break world;
                }
            }
            if Instant::now() > deadline {
                return Err(Status::deadline_exceeded(
                    "the generation did not form in time",
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Ok(Response::new(RegisterReply {
            generation,
            rank,
            world_size: world,
            run_config_yaml: self.shared.config_yaml.clone(),
            run_url: self.shared.store.url().to_string(),
            resume: locked(&self.shared.resume).clone(),
            heartbeat_interval_ms: self.shared.heartbeat_interval.as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let req = request.into_inner();
        locked(&self.shared.membership)
            .heartbeat(req.generation, req.rank, req.step, Instant::now())
            .map_err(refused)?;
        Ok(Response::new(HeartbeatReply {
            stop: self.shared.stop.load(Ordering::Relaxed),
        }))
    }

    async fn report_metrics(
        &self,
        request: Request<MetricsReport>,
    ) -> Result<Response<Ack>, Status> {
        let req = request.into_inner();
        {
            let mut m = locked(&self.shared.membership);
            m.check(req.generation, req.rank).map_err(refused)?;
            if let (Some(member), Some(last)) = (m.members.get_mut(&req.rank), req.steps.last()) {
                member.step = member.step.max(last.step);
                member.step_seconds = last.step_seconds;
                member.data_wait_share = last.data_wait_share;
                member.last_heartbeat = Instant::now();
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
                status.images_per_sec = Some(step.images_per_sec);
            }
        }
        Ok(Response::new(Ack {}))
    }

    async fn commit_checkpoint(
        &self,
        request: Request<CommitRequest>,
    ) -> Result<Response<CommitReply>, Status> {
        let req = request.into_inner();
        locked(&self.shared.membership)
            .check(req.generation, req.rank)
            .map_err(refused)?;
        let manifest: Manifest = serde_json::from_str(&req.manifest_json)
            .map_err(|e| Status::invalid_argument(format!("not a manifest: {e}")))?;
        let store = &self.shared.store;
        store
            .verify_sizes(&manifest)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let key = Manifest::path_for(manifest.step);
        let json =
            serde_json::to_vec_pretty(&manifest).map_err(|e| Status::internal(e.to_string()))?;
        let created = store
            .put_new(&key, Bytes::from(json))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if !created {
            return Err(Status::already_exists(format!(
                "checkpoint {} is already committed",
                store.url_of(&key)
            )));
        }
        store
            .put(LATEST_FILE, Bytes::from(key.clone()))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        locked(&self.shared.status).last_checkpoint_step = Some(manifest.step);
        locked(&self.shared.metrics).flush();
        tracing::info!(
            step = manifest.step,
            "checkpoint committed: {}",
            store.url_of(&key)
        );
        Ok(Response::new(CommitReply { manifest: key }))
    }

    async fn report_done(&self, request: Request<DoneRequest>) -> Result<Response<Ack>, Status> {
        let req = request.into_inner();
        let all = locked(&self.shared.membership)
            .mark_done(req.generation, req.rank)
            .map_err(refused)?;
        if all {
            let _ = self.shared.events.send(Event::AllDone {
                step: req.final_step,
            });
        }
        Ok(Response::new(Ack {}))
    }

    async fn report_failure(
        &self,
        request: Request<FailureRequest>,
    ) -> Result<Response<Ack>, Status> {
        let req = request.into_inner();
        locked(&self.shared.membership)
            .check(req.generation, req.rank)
            .map_err(refused)?;
        let _ = self.shared.events.send(Event::Failed {
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

impl Shared {
    pub fn snapshot(&self) -> RunStatus {
        let mut status = locked(&self.status).clone();
        let m = locked(&self.membership);
        let now = Instant::now();
        status.generation = m.generation;
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
            })
            .collect();
        status
    }
}
