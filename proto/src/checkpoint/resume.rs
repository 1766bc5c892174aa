//! Which checkpoint a run resumes from, and tidying the run directory so the run can write
//! the steps after it again.

use object_store::UpdateVersion;

use super::Committed;
use crate::manifest::Manifest;
use crate::store::{RunStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The checkpoint asked for with `--resume-from` is not there or does not verify.
    #[error("--resume-from {step}: {reason}")]
    Requested { step: u64, reason: String },
}

/// Picks the checkpoint to resume from and tidies the run directory:
/// - multipart uploads a crashed writer left are aborted;
/// - the checkpoint `latest` points at is verified (every object's size and SHA-256); if it
///   is damaged, the newest older committed checkpoint that verifies is used instead, with a
///   warning naming what is wrong (or exactly `resume_from`, when given);
/// - checkpoints newer than the chosen one (uncommitted: a manifest written but `latest`
///   never moved, or damaged) and directories without a manifest are deleted, so the run can
///   write those steps again;
/// - `latest` is pointed at the choice. Returns it with `latest`'s version.
pub async fn select_resume(
    store: &RunStore,
    resume_from: Option<u64>,
) -> Result<(Option<Committed>, Option<UpdateVersion>), ResumeError> {
    let aborted = store.abort_stale_uploads().await?;
    if aborted > 0 {
        tracing::warn!("aborted {aborted} unfinished multipart uploads left by a crash");
    }
    let pointer = store.latest_pointer().await?;
    let latest_step = pointer.as_ref().and_then(|(key, _)| Manifest::step_of(key));
    let listing = store.checkpoints().await?;
    let chosen = choose(store, &listing, latest_step, resume_from).await?;
    let keep = chosen.as_ref().map(|c| c.step);
    for &(step, has_manifest) in &listing {
        let newer = keep.is_none_or(|k| step > k);
        if newer || !has_manifest {
            tracing::warn!(
                step,
                "deleting checkpoint directory that is not in force (uncommitted or damaged)"
            );
            store.delete_checkpoint(step).await?;
        }
    }
    let mut version = pointer.as_ref().map(|(_, v)| v.clone());
    if let Some(c) = &chosen {
        if pointer.as_ref().map(|(k, _)| k) != Some(&c.manifest) {
            version = Some(store.move_latest(&c.manifest, version).await?);
        }
    }
    Ok((chosen, version))
}

/// The newest committed checkpoint that verifies, or exactly `resume_from`.
async fn choose(
    store: &RunStore,
    listing: &[(u64, bool)],
    latest_step: Option<u64>,
    resume_from: Option<u64>,
) -> Result<Option<Committed>, ResumeError> {
    let with_manifest = listing.iter().rev().filter(|(_, has)| *has);
    for &(step, _) in with_manifest {
        let committed = latest_step.is_some_and(|latest| step <= latest);
        let wanted = match resume_from {
            Some(target) => step == target,
            None => committed,
        };
        if !wanted {
            continue;
        }
        let key = Manifest::path_for(step);
        let verdict = match store.read_manifest(&key).await {
            Ok(manifest) => store.verify_checksums(&manifest).await.map(|()| manifest),
            Err(e) => Err(e),
        };
        match verdict {
            Ok(manifest) => {
                return Ok(Some(Committed {
                    step: manifest.step,
                    manifest: key,
                }))
            }
            Err(e) if resume_from.is_some() => {
                return Err(ResumeError::Requested {
                    step,
                    reason: e.to_string(),
                })
            }
            Err(e) => tracing::warn!(
                "checkpoint at step {step} is damaged ({e}); falling back to the previous one"
            ),
        }
    }
    match resume_from {
        Some(step) => Err(ResumeError::Requested {
            step,
            reason: format!("{} has no committed checkpoint at that step", store.url()),
        }),
        None => Ok(None),
    }
}
