//! Checkpoint contents: the model under the official SimMIM names (loadable in PyTorch), the
//! AdamW moments, and `trainer.json` (step, epoch, data cursor). There is no RNG state to
//! save: every random draw is a function of the seed and the step or sample, so resuming at
//! step `s` reproduces an uninterrupted run exactly.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use simmim_proto::manifest::{Manifest, ManifestFile, FORMAT_VERSION};
use simmim_proto::store::{sha256_hex, RunStore, StoreError};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINER_FILE: &str = "trainer.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    /// The data cursor: epoch, and samples of its order consumed.
    pub epoch: u64,
    #[serde(default)]
    pub epoch_offset: u64,
    pub samples_seen: u64,
    pub world_size: u32,
    pub micro_batch: usize,
    pub accumulation: usize,
    pub seed: u64,
    pub samples_skipped: u64,
    pub config_hash: String,
    pub randomness: String,
}

/// The model (official names) and the AdamW state as safetensors bytes, the two made on two
/// threads: this copy off the device is the only part of a checkpoint the step loop waits for.
pub fn serialise<B, M>(
    model: &M,
    config: &simmim_model::SimMimConfig,
    optimizer: &simmim_model::AdamW<B::InnerBackend>,
) -> Result<(Vec<u8>, Vec<u8>), simmim_model::ModelError>
where
    B: burn::tensor::backend::AutodiffBackend,
    M: burn::module::AutodiffModule<B> + Sync,
{
    use simmim_model::weights::{state_dict, to_safetensors};
    std::thread::scope(|scope| {
        let weights = scope.spawn(|| to_safetensors(&state_dict::<B, M>(model, config), config));
        let moments = to_safetensors(&optimizer.state_dict::<B, M>(model), config);
        let weights = weights
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok((weights?, moments?))
    })
}

/// The serialised pieces of one checkpoint.
pub struct CheckpointBytes {
    pub model: Vec<u8>,
    pub optimizer: Vec<u8>,
    pub trainer: TrainerState,
}

/// The model weights of a run's newest committed checkpoint (or the one at `step`), checked
/// against its manifest; the optimizer state is not read.
pub async fn read_model(
    store: &RunStore,
    step: Option<u64>,
) -> Result<(Manifest, Bytes), StoreError> {
    let key = match step {
        Some(step) => Manifest::path_for(step),
        None => match store.latest_pointer().await? {
            Some((key, _)) => key,
            None => {
                return Err(StoreError::Invalid {
                    url: store.url().to_string(),
                    reason: "no committed checkpoint (no `latest`)".into(),
                })
            }
        },
    };
    let manifest = store.read_manifest(&key).await?;
    let model = store.read_checked(&manifest, MODEL_FILE).await?;
    Ok((manifest, model))
}

/// Reads a committed checkpoint, verifying every object against its manifest.
pub async fn read(
    store: &RunStore,
    manifest_key: &str,
) -> Result<(Manifest, CheckpointBytes), StoreError> {
    let manifest = store.read_manifest(manifest_key).await?;
    let model = store.read_checked(&manifest, MODEL_FILE).await?.to_vec();
    let optimizer = store
        .read_checked(&manifest, OPTIMIZER_FILE)
        .await?
        .to_vec();
    let trainer_bytes = store.read_checked(&manifest, TRAINER_FILE).await?;
    let trainer: TrainerState =
        serde_json::from_slice(&trainer_bytes).map_err(|e| StoreError::Invalid {
            url: store.url_of(&format!(
                "{}/{TRAINER_FILE}",
                Manifest::dir_for(manifest.step)
            )),
            reason: e.to_string(),
        })?;
    Ok((
        manifest,
        CheckpointBytes {
            model,
            optimizer,
            trainer,
        },
    ))
}

/// Writes checkpoints in the background so the step loop only pays for serialising the state
/// off the device: the objects stream to the store (multipart for large ones) and the
/// coordinator commits them while training goes on. At most one checkpoint is in flight; a
/// periodic one that comes due while the previous is still uploading is skipped (and said
/// so), which also keeps memory bounded to one serialised checkpoint. A storage outage only
/// skips or delays checkpoints, until none has landed for `max_outage`: then the run stops.
pub struct Checkpointer {
    store: RunStore,
    runtime: tokio::runtime::Handle,
    client: simmim_proto::auth::Client,
    run: String,
    generation: u64,
    rank: u32,
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
    /// `checkpoint.max_outage_minutes` of the session's config bounds an outage.
    pub fn new(store: RunStore, session: &crate::session::Session) -> Self {
        let max_outage =
            std::time::Duration::from_secs_f64(session.config.checkpoint.max_outage_minutes * 60.0);
        Self {
            store,
            runtime: session.runtime.clone(),
            client: session.client.clone(),
            run: session.config.run.name.clone(),
            generation: session.joined.generation,
            rank: session.joined.rank,
            in_flight: None,
            last_landed: std::time::Instant::now(),
            max_outage,
        }
    }

    /// Hands a checkpoint over. `must` (the end of the run, a stop) waits for the previous
    /// upload and for this one, retrying it until `max_outage`; otherwise a busy uploader means
    /// this checkpoint is skipped.
    pub fn submit(&mut self, pieces: CheckpointBytes, must: bool) -> anyhow::Result<()> {
        self.reap(false)?;
        if self.in_flight.is_some() {
            if must {
                self.reap(true)?;
            } else {
                tracing::warn!(
                    step = pieces.trainer.step,
                    "checkpoint skipped: the previous one is still uploading"
                );
                return Ok(());
            }
        }
        let upload = self.upload(pieces);
        if must {
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
        self.in_flight = Some(self.runtime.spawn(upload.clone_task()));
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
                self.store.url(),
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
            self.store.url_of(&landed.manifest),
            landed.bytes as f64 / 1e6,
            landed.seconds,
            landed.bytes as f64 / 1e6 / landed.seconds.max(1e-9)
        );
    }

    fn upload(&self, pieces: CheckpointBytes) -> Upload {
        Upload {
            store: self.store.clone(),
            client: self.client.clone(),
            run: self.run.clone(),
            generation: self.generation,
            rank: self.rank,
            model: Bytes::from(pieces.model),
            optimizer: Bytes::from(pieces.optimizer),
            trainer: pieces.trainer,
        }
    }
}

/// One checkpoint's upload and commit, cheap to clone (the buffers are shared) so a failed
/// attempt can be retried from the same bytes.
#[derive(Clone)]
struct Upload {
    store: RunStore,
    client: simmim_proto::auth::Client,
    run: String,
    generation: u64,
    rank: u32,
    model: Bytes,
    optimizer: Bytes,
    trainer: TrainerState,
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
        let step = self.trainer.step;
        let dir = Manifest::dir_for(step);
        let trainer = Bytes::from(serde_json::to_vec_pretty(&self.trainer).unwrap_or_default());
        let pieces = [
            (MODEL_FILE, self.model.clone()),
            (OPTIMIZER_FILE, self.optimizer.clone()),
            (TRAINER_FILE, trainer),
        ];
        let files: Vec<ManifestFile> = pieces
            .iter()
            .map(|(name, data)| ManifestFile {
                path: name.to_string(),
                size: data.len() as u64,
                sha256: sha256_hex(data),
            })
            .collect();
        let bytes = files.iter().map(|f| f.size).sum();
        // All objects at once: each large one is itself a multipart upload.
        let uploads = pieces.into_iter().map(|(name, data)| {
            let store = self.store.clone();
            let key = format!("{dir}/{name}");
            async move { store.put_large(&key, data).await }
        });
        futures::future::try_join_all(uploads)
            .await
            .map_err(|e| e.to_string())?;
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            run: self.run.clone(),
            step,
            epoch: self.trainer.epoch,
            epoch_offset: self.trainer.epoch_offset,
            samples_seen: self.trainer.samples_seen,
            generation: self.generation,
            world_size: self.trainer.world_size,
            config_hash: self.trainer.config_hash.clone(),
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            files,
        };
        let request = simmim_proto::pb::CommitRequest {
            generation: self.generation,
            rank: self.rank,
            manifest_json: serde_json::to_string(&manifest).map_err(|e| e.to_string())?,
        };
        let reply = self
            .client
            .clone()
            .commit_checkpoint(request)
            .await
            .map_err(|s| {
                format!(
                    "the coordinator did not commit step {step}: {}",
                    s.message()
                )
            })?;
        Ok(Landed {
            step,
            manifest: reply.into_inner().manifest,
            bytes,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}
