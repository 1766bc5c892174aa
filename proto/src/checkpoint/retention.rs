//! Which committed checkpoints to keep: the newest `keep_last`, and every one whose step is a
//! multiple of `keep_every_steps`. Each checkpoint owns its objects, so deleting one (manifest
//! first, so it stops existing before its data goes) never touches another.

use crate::run_config::CheckpointSection;
use crate::store::{RunStore, StoreError};

/// The steps to delete among `committed` (any order), never `newest`.
pub fn doomed(committed: &[u64], policy: &CheckpointSection, newest: u64) -> Vec<u64> {
    let mut steps = committed.to_vec();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    steps
        .iter()
        .enumerate()
        .filter(|(i, &step)| {
            *i >= policy.keep_last
                && step != newest
                && policy
                    .keep_every_steps
                    .is_none_or(|m| !step.is_multiple_of(m))
        })
        .map(|(_, &step)| step)
        .collect()
}

pub async fn apply(
    store: &RunStore,
    policy: &CheckpointSection,
    newest: u64,
) -> Result<(), StoreError> {
    let committed: Vec<u64> = store
        .checkpoints()
        .await?
        .into_iter()
        .filter(|&(step, has_manifest)| has_manifest && step <= newest)
        .map(|(step, _)| step)
        .collect();
    for step in doomed(&committed, policy, newest) {
        store.delete_checkpoint(step).await?;
        tracing::info!(
            step,
            "deleted checkpoint (retention: keep_last {}, keep_every_steps {:?})",
            policy.keep_last,
            policy.keep_every_steps
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_and_the_multiples() {
        let policy = CheckpointSection {
            keep_last: 2,
            keep_every_steps: Some(100),
            ..Default::default()
        };
        let mut doomed = doomed(&[50, 100, 150, 200, 250, 300], &policy, 300);
        doomed.sort_unstable();
        assert_eq!(doomed, vec![50, 150]);
        let only_last = CheckpointSection {
            keep_last: 1,
            ..Default::default()
        };
        assert_eq!(doomed_sorted(&[10, 20, 30], &only_last, 30), vec![10, 20]);
    }

    fn doomed_sorted(c: &[u64], p: &CheckpointSection, n: u64) -> Vec<u64> {
        let mut d = doomed(c, p, n);
        d.sort_unstable();
        d
    }
}
