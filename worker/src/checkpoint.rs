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

/// The serialised pieces of one checkpoint.
pub struct CheckpointBytes {
    pub model: Vec<u8>,
    pub optimizer: Vec<u8>,
    pub trainer: TrainerState,
}

/// Writes the data objects and returns the manifest to commit (the coordinator writes it).
pub async fn write(
    store: &RunStore,
    run: &str,
    generation: u64,
    pieces: CheckpointBytes,
) -> Result<Manifest, StoreError> {
    let dir = Manifest::dir_for(pieces.trainer.step);
    let trainer = serde_json::to_vec_pretty(&pieces.trainer).unwrap_or_default();
    let mut files = Vec::new();
    for (name, bytes) in [
        (MODEL_FILE, pieces.model),
        (OPTIMIZER_FILE, pieces.optimizer),
        (TRAINER_FILE, trainer),
    ] {
        files.push(ManifestFile {
            path: name.to_string(),
            size: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
        });
        store
            .put(&format!("{dir}/{name}"), Bytes::from(bytes))
            .await?;
    }
    Ok(Manifest {
        format_version: FORMAT_VERSION,
        run: run.to_string(),
        step: pieces.trainer.step,
        epoch: pieces.trainer.epoch,
        epoch_offset: pieces.trainer.epoch_offset,
        samples_seen: pieces.trainer.samples_seen,
        generation,
        world_size: pieces.trainer.world_size,
        config_hash: pieces.trainer.config_hash.clone(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        files,
    })
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
