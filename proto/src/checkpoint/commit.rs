//! Making a written checkpoint the run's newest: verify its objects, create its manifest
//! (create-if-absent, so a crash or a retry never overwrites one), move `latest` under a
//! conditional update. One committer per run (the coordinator's); commits are serialised and
//! never go backwards.

use std::sync::Mutex;

use bytes::Bytes;
use object_store::UpdateVersion;

use super::faults;
use crate::manifest::Manifest;
use crate::store::RunStore;

/// A committed checkpoint: its step and its manifest's key (what `latest` holds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub step: u64,
    pub manifest: String,
}

/// Why a commit was refused; each maps to one gRPC status in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The store did not answer or failed; the same commit may be retried.
    #[error("{0}")]
    Unavailable(String),
    /// The step is not newer than the committed one, or is committed with other contents.
    #[error("{0}")]
    Conflict(String),
    /// An object the manifest names is missing or has the wrong size.
    #[error("{0}")]
    Incomplete(String),
    /// `latest` was moved by a writer that is not this committer (a second coordinator).
    #[error("{0}")]
    AnotherWriter(String),
}

#[derive(Default)]
struct Pointer {
    committed: Option<Committed>,
    /// The version of `latest` this committer last read or wrote.
    version: Option<UpdateVersion>,
    /// Every manifest key this committer has pointed `latest` at.
    written: Vec<String>,
}

pub struct Committer {
    store: RunStore,
    pointer: Mutex<Pointer>,
    serial: futures::lock::Mutex<()>,
}

impl Committer {
    /// A committer continuing from `committed` (what resume selection chose), with `latest`
    /// read at `version`.
    pub fn new(
        store: RunStore,
        committed: Option<Committed>,
        version: Option<UpdateVersion>,
    ) -> Self {
        let written = committed.iter().map(|c| c.manifest.clone()).collect();
        Self {
            store,
            pointer: Mutex::new(Pointer {
                committed,
                version,
                written,
            }),
            serial: futures::lock::Mutex::new(()),
        }
    }

    /// The newest committed checkpoint: where a new generation resumes.
    pub fn committed(&self) -> Option<Committed> {
        self.pointer().committed.clone()
    }

    fn pointer(&self) -> std::sync::MutexGuard<'_, Pointer> {
        // The data is consistent for reading even if a holder panicked.
        self.pointer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits the checkpoint `manifest` describes. A retry of the commit already in force
    /// (its reply was lost) is answered again rather than refused, so a worker does not retry
    /// its final checkpoint until the outage limit.
    pub async fn commit(&self, manifest: &Manifest) -> Result<Committed, CommitError> {
        let _serial = self.serial.lock().await;
        let store = &self.store;
        let key = Manifest::path_for(manifest.step);
        let committed = self.committed().map(|c| c.step);
        if committed == Some(manifest.step) {
            let stored = store
                .read_manifest(&key)
                .await
                .map_err(|e| CommitError::Unavailable(e.to_string()))?;
            if &stored == manifest {
                return Ok(Committed {
                    step: manifest.step,
                    manifest: key,
                });
            }
        }
        if let Some(c) = committed.filter(|&c| manifest.step <= c) {
            return Err(CommitError::Conflict(format!(
                "step {} is not newer than the committed step {c}",
                manifest.step
            )));
        }
        store
            .verify_sizes(manifest)
            .await
            .map_err(|e| CommitError::Incomplete(e.to_string()))?;
        self.create_manifest(&key, manifest).await?;
        faults::maybe_exit("exit-before-latest", manifest.step);
        let version = self.move_latest(&key).await?;
        let done = Committed {
            step: manifest.step,
            manifest: key.clone(),
        };
        let mut pointer = self.pointer();
        pointer.version = Some(version);
        pointer.committed = Some(done.clone());
        pointer.written.push(key);
        Ok(done)
    }

    async fn create_manifest(&self, key: &str, manifest: &Manifest) -> Result<(), CommitError> {
        let store = &self.store;
        let json = serde_json::to_vec_pretty(manifest)
            .map_err(|e| CommitError::Incomplete(format!("cannot serialise the manifest: {e}")))?;
        faults::maybe_exit("exit-before-manifest", manifest.step);
        let created = store
            .put_new(key, Bytes::from(json.clone()))
            .await
            .map_err(|e| CommitError::Unavailable(e.to_string()))?;
        if !created {
            // A request that timed out here may still have been applied by the store: the
            // same manifest already there is this commit, done; another one is a conflict.
            let existing = store
                .get(key)
                .await
                .map_err(|e| CommitError::Unavailable(e.to_string()))?;
            if existing.as_ref() != json.as_slice() {
                return Err(CommitError::Conflict(format!(
                    "checkpoint {} is already committed with other contents",
                    store.url_of(key)
                )));
            }
        }
        Ok(())
    }

    /// Moves `latest` with a conditional update. When the version check fails, `latest` is
    /// read again: if it already names `key` (this very write, applied late after a timeout),
    /// the commit stands; if it names an earlier manifest this committer wrote, the update is
    /// retried against the fresh version; anything else means another writer.
    async fn move_latest(&self, key: &str) -> Result<UpdateVersion, CommitError> {
        let store = &self.store;
        let seen = self.pointer().version.clone();
        let first = match store.move_latest(key, seen).await {
            Ok(version) => return Ok(version),
            Err(first) => first,
        };
        let current = store
            .latest_pointer()
            .await
            .map_err(|e| CommitError::Unavailable(e.to_string()))?;
        if let Some((pointer, version)) = &current {
            if pointer == key {
                tracing::info!(
                    "`latest` already names {key} (a timed-out write the store applied)"
                );
                return Ok(version.clone());
            }
        }
        let ours = current
            .as_ref()
            .is_some_and(|(pointer, _)| self.pointer().written.contains(pointer));
        if !ours {
            tracing::error!("{first}");
            return Err(CommitError::AnotherWriter(first.to_string()));
        }
        let fresh = current.map(|(_, version)| version);
        store
            .move_latest(key, fresh)
            .await
            .map_err(|e| CommitError::Unavailable(e.to_string()))
    }
}
