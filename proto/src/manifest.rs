//! The commit record of a checkpoint. A checkpoint exists only once its manifest is written:
//! the data objects come first, the manifest last, so a crash in between leaves the previous
//! checkpoint in force.

use serde::{Deserialize, Serialize};

pub const MANIFEST_FILE: &str = "MANIFEST.json";
pub const LATEST_FILE: &str = "latest";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    /// Relative to the checkpoint directory.
    pub path: String,
    pub size: u64,
    /// Hex SHA-256 of the object's bytes.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub run: String,
    /// Optimizer steps completed; training resumes at this global step.
    pub step: u64,
    /// The data cursor: the epoch, and how many of its ordered samples are consumed.
    pub epoch: u64,
    #[serde(default)]
    pub epoch_offset: u64,
    /// Samples trained on so far, over all ranks.
    pub samples_seen: u64,
    pub generation: u64,
    pub world_size: u32,
    /// Hash of the resolved run config's training-relevant fields; a resume under another
    /// config is refused rather than silently mixing runs.
    pub config_hash: String,
    pub created_unix_ms: u64,
    pub files: Vec<ManifestFile>,
}

impl Manifest {
    /// Directory of checkpoint `step`, relative to the run directory; zero-padded so the
    /// object listing sorts by step.
    pub fn dir_for(step: u64) -> String {
        format!("checkpoints/{step:010}")
    }

    pub fn path_for(step: u64) -> String {
        format!("{}/{MANIFEST_FILE}", Self::dir_for(step))
    }

    /// The step of a key under `checkpoints/<step>/` (a manifest, a data object, `latest`'s
    /// content).
    pub fn step_of(key: &str) -> Option<u64> {
        key.strip_prefix("checkpoints/")?
            .split('/')
            .next()?
            .parse()
            .ok()
    }
}
