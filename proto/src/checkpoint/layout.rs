//! What a checkpoint holds: the model under the official SimMIM names (loadable in PyTorch),
//! the AdamW moments, and `trainer.json`, the one record of where the run stands. The
//! manifest, the registration's resume point and the data loader's cursor are all derived from
//! [`TrainerState`], so the position has one shape. There is no RNG state to save: every
//! random draw is a function of the seed and the step or sample.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::manifest::{Manifest, ManifestFile, FORMAT_VERSION};
use crate::plan::{Cursor, DataPlan};
use crate::store::{sha256_hex, RunStore, StoreError};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINER_FILE: &str = "trainer.json";

/// Where training stands after `step` optimizer steps, and the plan that got it there.
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

impl TrainerState {
    /// The start of a run under `plan`.
    pub fn start(plan: &DataPlan, config_hash: &str) -> Self {
        Self {
            step: 0,
            epoch: 0,
            epoch_offset: 0,
            samples_seen: 0,
            world_size: plan.world_size as u32,
            micro_batch: plan.micro_batch,
            accumulation: plan.accumulation,
            seed: plan.seed,
            samples_skipped: 0,
            config_hash: config_hash.to_string(),
            randomness: "every draw derives from (seed, epoch, sample id); nothing else to restore"
                .into(),
        }
    }

    /// A resumed state continued under `plan` (the world may have changed size): the
    /// position is kept, the plan's fields are the new generation's.
    pub fn under(mut self, plan: &DataPlan) -> Self {
        self.world_size = plan.world_size as u32;
        self.micro_batch = plan.micro_batch;
        self.accumulation = plan.accumulation;
        self.seed = plan.seed;
        self.set_cursor(plan.settle(self.cursor()));
        self
    }

    pub fn cursor(&self) -> Cursor {
        Cursor {
            epoch: self.epoch,
            offset: self.epoch_offset,
        }
    }

    pub fn set_cursor(&mut self, cursor: Cursor) {
        self.epoch = cursor.epoch;
        self.epoch_offset = cursor.offset;
    }

    /// One optimizer step of `plan` done.
    pub fn advance(&mut self, plan: &DataPlan) {
        self.step += 1;
        self.samples_seen += plan.global_batch() as u64;
        self.set_cursor(plan.advance(self.cursor()));
    }

    /// The commit record of this state's checkpoint, holding `files`.
    pub fn manifest(&self, run: &str, generation: u64, files: Vec<ManifestFile>) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            run: run.to_string(),
            step: self.step,
            epoch: self.epoch,
            epoch_offset: self.epoch_offset,
            samples_seen: self.samples_seen,
            generation,
            world_size: self.world_size,
            config_hash: self.config_hash.clone(),
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            files,
        }
    }
}

/// The serialised pieces of one checkpoint (shared buffers: a retried upload re-sends them).
#[derive(Clone)]
pub struct CheckpointBytes {
    pub model: Bytes,
    pub optimizer: Bytes,
    pub trainer: TrainerState,
}

impl CheckpointBytes {
    /// Writes the three objects of this checkpoint (each large one a multipart upload, all at
    /// once) and returns the manifest that commits them. Nothing is in force until a
    /// [`super::Committer`] writes that manifest.
    pub async fn write(
        &self,
        store: &RunStore,
        run: &str,
        generation: u64,
    ) -> Result<Manifest, StoreError> {
        let dir = Manifest::dir_for(self.trainer.step);
        let trainer =
            serde_json::to_vec_pretty(&self.trainer).map_err(|e| StoreError::Invalid {
                url: store.url_of(&format!("{dir}/{TRAINER_FILE}")),
                reason: format!("cannot serialise the trainer state: {e}"),
            })?;
        let pieces = [
            (MODEL_FILE, self.model.clone()),
            (OPTIMIZER_FILE, self.optimizer.clone()),
            (TRAINER_FILE, Bytes::from(trainer)),
        ];
        let files = pieces
            .iter()
            .map(|(name, data)| ManifestFile {
                path: name.to_string(),
                size: data.len() as u64,
                sha256: sha256_hex(data),
            })
            .collect();
        let uploads = pieces.into_iter().map(|(name, data)| {
            let key = format!("{dir}/{name}");
            async move { store.put_large(&key, data).await }
        });
        futures::future::try_join_all(uploads).await?;
        Ok(self.trainer.manifest(run, generation, files))
    }

    /// Reads a committed checkpoint, verifying every object against its manifest.
    pub async fn read(
        store: &RunStore,
        manifest_key: &str,
    ) -> Result<(Manifest, Self), StoreError> {
        let manifest = store.read_manifest(manifest_key).await?;
        let model = store.read_checked(&manifest, MODEL_FILE).await?;
        let optimizer = store.read_checked(&manifest, OPTIMIZER_FILE).await?;
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
            Self {
                model,
                optimizer,
                trainer,
            },
        ))
    }
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
