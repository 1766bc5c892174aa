//! Checkpoint storage for the trainer: a snapshot of the model and the AdamW state (no copy),
//! written as safetensors (the model under the official SimMIM names, loadable in PyTorch;
//! the moments) and uploaded in the background, then committed. What a checkpoint
//! holds and how it is committed is the protocol module's ([`simmim_proto::checkpoint`]);
//! when to save is the trainer's policy ([`crate::trainer::checkpoints`]).

use std::sync::Arc;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use simmim_model::weights::snapshot::{OptimizerPart, Snapshot};
use simmim_model::ModelError;
use simmim_proto::checkpoint::{CheckpointBytes, TrainerState};
use simmim_proto::store::RunStore;

use crate::generation::{Generation, RunLink};

/// A checkpoint whose bytes are still to be written: the trainer state, and the work that
/// turns a snapshot of the model and optimizer into `model.safetensors` and
/// `optimizer.safetensors` (run off the step loop).
pub struct Pending {
    pub trainer: TrainerState,
    pub write: WriteFiles,
}

/// Produces `model.safetensors` and `optimizer.safetensors`.
pub type WriteFiles = Box<dyn FnOnce() -> Result<(Vec<u8>, Vec<u8>), ModelError> + Send>;

impl Pending {
    /// A checkpoint of `model` and `optimizer` (its state, or its file already gathered) at
    /// `trainer`'s step. Costs the step loop no copy: the snapshot shares the tensors, which
    /// training no longer changes in place.
    pub fn snapshot<AB, M>(
        trainer: &TrainerState,
        model: &M,
        optimizer: OptimizerPart<'_, AB::InnerBackend>,
        config: &simmim_model::SimMimConfig,
    ) -> Self
    where
        AB: AutodiffBackend,
        M: AutodiffModule<AB>,
        M::InnerModule: Send + 'static,
    {
        let snapshot = Snapshot::take(model, optimizer, config);
        Self {
            trainer: trainer.clone(),
            write: Box::new(move || snapshot.into_safetensors()),
        }
    }

    /// Writes the bytes (on this thread).
    fn into_bytes(self) -> Result<CheckpointBytes, String> {
        let started = std::time::Instant::now();
        let step = self.trainer.step;
        let (model, optimizer) = (self.write)().map_err(|e| format!("step {step}: {e}"))?;
        tracing::info!(
            step,
            "checkpoint written in {:.2} s ({:.1} MB), off the step loop",
            started.elapsed().as_secs_f64(),
            (model.len() + optimizer.len()) as f64 / 1e6
        );
        Ok(CheckpointBytes {
            model: model.into(),
            optimizer: optimizer.into(),
            trainer: self.trainer,
        })
    }
}

/// Writes checkpoints in the background so the step loop only pays for serialising the state
/// off the device: the objects stream to the store (multipart for large ones) and the
/// coordinator commits them while training goes on. At most one checkpoint is in flight; a
/// periodic one that comes due while the previous is still uploading is skipped (and said
/// so), which also keeps memory bounded to one serialised checkpoint. A storage outage only
/// skips or delays checkpoints, until none has landed for `max_outage`: then the run stops.
pub struct Checkpointer {
    target: Target,
    runtime: tokio::runtime::Handle,
    in_flight: Option<tokio::task::JoinHandle<Result<Landed, String>>>,
    last_landed: std::time::Instant,
    max_outage: std::time::Duration,
}

/// A committed checkpoint and how its upload went.
#[derive(Debug)]
pub struct Landed {
    pub step: u64,
    pub manifest: String,
    pub bytes: u64,
    pub seconds: f64,
}

impl Checkpointer {
    /// `checkpoint.max_outage_minutes` of the run config bounds an outage.
    pub fn new(store: RunStore, generation: &Generation) -> Self {
        let config = &generation.config;
        let max_outage =
            std::time::Duration::from_secs_f64(config.checkpoint.max_outage_minutes * 60.0);
        Self {
            target: Target {
                store,
                link: generation.link.clone(),
                run: config.run.name.clone(),
                generation: generation.number,
            },
            runtime: generation.runtime.clone(),
            in_flight: None,
            last_landed: std::time::Instant::now(),
            max_outage,
        }
    }

    /// Hands a checkpoint over. `must` (the end of the run, a stop) waits for the previous
    /// upload and for this one, retrying it until `max_outage`; otherwise a busy uploader means
    /// this checkpoint is skipped.
    pub fn submit(&mut self, pending: Pending, must: bool) -> anyhow::Result<()> {
        self.reap(false)?;
        if self.in_flight.is_some() {
            if must {
                self.reap(true)?;
            } else {
                tracing::warn!(
                    step = pending.trainer.step,
                    "checkpoint skipped: the previous one is still uploading"
                );
                return Ok(());
            }
        }
        if must {
            let upload = Upload {
                target: self.target.clone(),
                pieces: pending.into_bytes().map_err(anyhow::Error::msg)?,
            };
            let started = std::time::Instant::now();
            loop {
                match self.runtime.block_on(upload.clone_task()) {
                    Ok(landed) => {
                        self.landed(landed);
                        return Ok(());
                    }
                    Err(e) if started.elapsed() < self.max_outage => {
                        tracing::warn!("final checkpoint not written ({e}); retrying in 5 s");
                        std::thread::sleep(std::time::Duration::from_secs(5));
                    }
                    Err(e) => anyhow::bail!(
                        "no checkpoint could be written for {:?}: {e}",
                        self.max_outage
                    ),
                }
            }
        }
        let target = self.target.clone();
        self.in_flight = Some(self.runtime.spawn(async move {
            let pieces = tokio::task::spawn_blocking(move || pending.into_bytes())
                .await
                .map_err(|e| format!("the checkpoint writer stopped: {e}"))??;
            Upload { target, pieces }.run().await
        }));
        Ok(())
    }

    /// Collects a finished upload (waiting for it with `wait`); fails the run when nothing has
    /// landed for longer than `max_outage`.
    pub fn reap(&mut self, wait: bool) -> anyhow::Result<()> {
        let finished = self.in_flight.as_ref().is_some_and(|h| h.is_finished());
        // Take the handle only when collecting it: an upload still running stays in flight
        // (dropping its handle would detach it, and its landing would never reset the clock).
        let collect = if wait || finished {
            self.in_flight.take()
        } else {
            None
        };
        if let Some(handle) = collect {
            match self.runtime.block_on(handle) {
                Ok(Ok(landed)) => self.landed(landed),
                Ok(Err(e)) => tracing::warn!("checkpoint not written: {e}"),
                Err(e) => tracing::warn!("checkpoint upload task failed: {e}"),
            }
        }
        if self.last_landed.elapsed() > self.max_outage {
            anyhow::bail!(
                "no checkpoint could be written to {} for {:.0} minutes (checkpoint.max_outage_minutes)",
                self.target.store.url(),
                self.max_outage.as_secs_f64() / 60.0
            );
        }
        Ok(())
    }

    fn landed(&mut self, landed: Landed) {
        self.last_landed = std::time::Instant::now();
        tracing::info!(
            step = landed.step,
            "checkpoint committed: {} ({:.1} MB in {:.2} s, {:.0} MB/s, in the background)",
            self.target.store.url_of(&landed.manifest),
            landed.bytes as f64 / 1e6,
            landed.seconds,
            landed.bytes as f64 / 1e6 / landed.seconds.max(1e-9)
        );
    }
}

/// One checkpoint's upload and commit, cheap to clone (the buffers are shared) so a failed
/// attempt can be retried from the same bytes.
#[derive(Clone)]
struct Upload {
    target: Target,
    pieces: CheckpointBytes,
}

/// Where checkpoints go: the run directory, and who commits them.
#[derive(Clone)]
struct Target {
    store: RunStore,
    link: Arc<dyn RunLink>,
    run: String,
    generation: u64,
}

impl Upload {
    fn clone_task(
        &self,
    ) -> impl std::future::Future<Output = Result<Landed, String>> + Send + 'static {
        let this = self.clone();
        async move { this.run().await }
    }

    async fn run(self) -> Result<Landed, String> {
        let started = std::time::Instant::now();
        let step = self.pieces.trainer.step;
        let manifest = self
            .pieces
            .write(&self.target.store, &self.target.run, self.target.generation)
            .await
            .map_err(|e| e.to_string())?;
        let bytes = manifest.files.iter().map(|f| f.size).sum();
        let key = self
            .target
            .link
            .commit(manifest)
            .await
            .map_err(|e| format!("step {step} was not committed: {e}"))?;
        Ok(Landed {
            step,
            manifest: key,
            bytes,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}
