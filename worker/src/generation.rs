//! One generation of the run as the trainer sees it: who this rank is, the world, the batch
//! shape, where to resume, and the gradient transport; plus a [`RunLink`] for what goes back
//! to whoever runs the run. No gRPC here: the coordinator client ([`crate::session`]) is one
//! link, [`LocalLink`] (commits with the protocol module directly) is another, so the trainer
//! runs and is tested without a coordinator.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};
use futures::future::BoxFuture;
use simmim_proto::checkpoint::{select_resume, Committer};
use simmim_proto::pb::StepMetrics;
use simmim_proto::store::RunStore;
use simmim_proto::{Manifest, RunConfig};

use crate::collective::{Collective, Solo};

/// What the trainer tells the run, and hears from it.
pub trait RunLink: Send + Sync {
    /// One optimizer step's numbers.
    fn report(&self, metrics: StepMetrics);
    /// The run asks this generation to stop after a checkpoint (a stop, a regroup, a signal).
    fn stop_requested(&self) -> bool;
    /// Why this generation is over without us (the coordinator is gone or moved on).
    fn lost(&self) -> Option<String>;
    /// The trainer stopped before the end of its plan.
    fn stopped_early(&self);
    /// Commits a written checkpoint; the manifest key on success.
    fn commit(&self, manifest: Manifest) -> BoxFuture<'static, Result<String, String>>;
}

/// The batch shape of a generation: accumulation is adjusted so the global batch stays as
/// configured when the world size allows it.
#[derive(Debug, Clone, Copy)]
pub struct BatchShape {
    pub micro_batch: usize,
    pub accumulation: usize,
    /// The configured global batch, the unit of the schedule's steps.
    pub reference_global_batch: u64,
    /// The factor applied to the configured learning rates.
    pub lr_scale: f64,
}

pub struct Generation {
    pub number: u64,
    pub rank: usize,
    pub world: usize,
    pub config: RunConfig,
    pub run_url: String,
    pub batch: BatchShape,
    /// The committed manifest to resume from; `None` on a fresh run.
    pub resume: Option<String>,
    pub runtime: tokio::runtime::Handle,
    pub link: Arc<dyn RunLink>,
    collective: Mutex<Box<dyn Collective>>,
}

impl Generation {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        number: u64,
        config: RunConfig,
        run_url: String,
        batch: BatchShape,
        resume: Option<String>,
        runtime: tokio::runtime::Handle,
        link: Arc<dyn RunLink>,
        collective: Box<dyn Collective>,
    ) -> Self {
        Self {
            number,
            rank: collective.rank(),
            world: collective.world(),
            config,
            run_url,
            batch,
            resume,
            runtime,
            link,
            collective: Mutex::new(collective),
        }
    }

    /// Runs `f` with the transport (one user at a time).
    pub fn with_collective<R>(
        &self,
        f: impl FnOnce(&mut dyn Collective) -> Result<R, crate::collective::CollectiveError>,
    ) -> Result<R> {
        let mut collective = self
            .collective
            .lock()
            .map_err(|_| anyhow!("the gradient transport's lock is poisoned"))?;
        Ok(f(collective.as_mut())?)
    }

    /// Sums `values` over all ranks (counts, gathered features); every rank gets the total.
    pub fn sum_over_ranks(&self, values: &mut [f32]) -> Result<()> {
        if self.world <= 1 {
            return Ok(());
        }
        self.with_collective(|c| c.all_reduce_sum(values))
    }
}

/// A run with no coordinator: one rank, checkpoints committed straight to the run directory
/// with the protocol's [`Committer`], metrics kept in memory.
pub struct LocalLink {
    committer: Arc<Committer>,
    stop: AtomicBool,
    stopped_early: AtomicBool,
    reported: Mutex<Vec<StepMetrics>>,
}

impl LocalLink {
    /// A link on the run directory `store`, continuing from its newest committed checkpoint
    /// (selected, and the directory tidied, as the coordinator does at start).
    pub async fn open(store: RunStore) -> Result<Self> {
        let (committed, version) = select_resume(&store, None).await?;
        Ok(Self {
            committer: Arc::new(Committer::new(store, committed, version)),
            stop: AtomicBool::new(false),
            stopped_early: AtomicBool::new(false),
            reported: Mutex::new(Vec::new()),
        })
    }

    /// A solo generation of `config` on this link, resuming from its newest commit.
    pub fn solo(
        self: &Arc<Self>,
        config: RunConfig,
        run_url: String,
        runtime: tokio::runtime::Handle,
    ) -> Generation {
        let (accumulation, lr_scale, _) = config.batch_for_world(1);
        let batch = BatchShape {
            micro_batch: config.train.micro_batch,
            accumulation,
            reference_global_batch: config.reference_global_batch() as u64,
            lr_scale,
        };
        let resume = self.committer.committed().map(|c| c.manifest);
        Generation::new(
            0,
            config,
            run_url,
            batch,
            resume,
            runtime,
            self.clone(),
            Box::new(Solo),
        )
    }

    /// Asks the trainer to stop after its next step (as a coordinator's stop would).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    pub fn was_stopped_early(&self) -> bool {
        self.stopped_early.load(Ordering::Relaxed)
    }

    /// Every step reported so far.
    pub fn reported(&self) -> Vec<StepMetrics> {
        self.reported.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl RunLink for LocalLink {
    fn report(&self, metrics: StepMetrics) {
        if let Ok(mut reported) = self.reported.lock() {
            reported.push(metrics);
        }
    }
    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
    fn lost(&self) -> Option<String> {
        None
    }
    fn stopped_early(&self) {
        self.stopped_early.store(true, Ordering::Relaxed);
    }
    fn commit(&self, manifest: Manifest) -> BoxFuture<'static, Result<String, String>> {
        let committer = self.committer.clone();
        Box::pin(async move {
            committer
                .commit(&manifest)
                .await
                .map(|c| c.manifest)
                .map_err(|e| e.to_string())
        })
    }
}
