//! Where a run stands, as the coordinator reports it (`coordinator status`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub rank: u32,
    pub worker_id: String,
    pub hostname: String,
    pub device: String,
    pub step: u64,
    pub last_heartbeat_ms_ago: u64,
    pub step_seconds: f64,
    pub data_wait_share: f64,
    pub allreduce_seconds: f64,
    pub pid: u32,
    pub transport_addr: String,
    /// Step time above 1.5x the median of the ranks.
    pub straggler: bool,
}

/// A worker that registered and waits for a place in a generation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WaitingWorker {
    pub worker_id: String,
    pub hostname: String,
    pub device: String,
    pub waiting_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    pub run: String,
    pub run_url: String,
    pub state: String,
    pub generation: u64,
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    pub last_loss: Option<f64>,
    #[serde(default)]
    pub last_lr: Option<f64>,
    pub images_per_sec: Option<f64>,
    /// Rank 0's newest step: share of it spent waiting for data, and its all-reduce time.
    #[serde(default)]
    pub data_wait_share: Option<f64>,
    #[serde(default)]
    pub allreduce_seconds: Option<f64>,
    pub last_checkpoint_step: Option<u64>,
    pub restarts: u32,
    pub world_size: u32,
    /// Connections refused for a missing or wrong run token.
    pub refused_unauthenticated: u64,
    pub workers: Vec<WorkerStatus>,
    #[serde(default)]
    pub waiting: Vec<WaitingWorker>,
}
