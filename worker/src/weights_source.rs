//! Where fine-tuning and the probe take weights from: a run (its newest checkpoint), one
//! checkpoint directory, or a file (`.safetensors`, or an official PyTorch `.pth`), on a local
//! disk or in object storage.

use anyhow::{anyhow, Context, Result};
use simmim_model::weights::{read_state_dict, state_dict_from_safetensors, StateDict};
use simmim_model::SimMimConfig;
use simmim_proto::store::{location_url, RunStore};
use simmim_proto::Manifest;

use simmim_proto::checkpoint::layout::read_model;

/// The weights at `location` and, when the source records it, the model config they were
/// made with.
pub fn read_weights(
    location: &str,
    runtime: &tokio::runtime::Handle,
) -> Result<(StateDict, Option<SimMimConfig>)> {
    let is_file = [".pth", ".pt", ".bin", ".safetensors"]
        .iter()
        .any(|ext| location.ends_with(ext));
    if is_file {
        let (dir, file) = location.rsplit_once('/').unwrap_or((".", location));
        let store = RunStore::open(location_url(dir)?.as_str())?;
        let bytes = runtime
            .block_on(store.get(file))
            .with_context(|| format!("reading weights {location}"))?;
        if location.ends_with(".safetensors") {
            let config = simmim_model::weights::config_from_safetensors(&bytes)?;
            return Ok((state_dict_from_safetensors(&bytes)?, config));
        }
        // The PyTorch reader wants a file: a local one is read in place, a remote one goes
        // through a temporary copy.
        let local = location.strip_prefix("file://").unwrap_or(location);
        if std::path::Path::new(local).is_file() {
            return Ok((read_state_dict(std::path::Path::new(local))?, None));
        }
        let temp = std::env::temp_dir().join(format!("simmim-weights-{}.pth", std::process::id()));
        std::fs::write(&temp, &bytes).with_context(|| format!("writing {}", temp.display()))?;
        let state = read_state_dict(&temp);
        let _ = std::fs::remove_file(&temp);
        return Ok((state?, None));
    }
    // `<run>/checkpoints/<step>`: that checkpoint; anything else: a run's newest.
    let trimmed = location.trim_end_matches('/');
    let (run, step) = match trimmed.rsplit_once("/checkpoints/") {
        Some((run, step)) => (
            run,
            Some(
                step.parse::<u64>()
                    .map_err(|_| anyhow!("{location}: `{step}` is not a checkpoint step"))?,
            ),
        ),
        None => (trimmed, None),
    };
    let store = RunStore::open(location_url(run)?.as_str())?;
    let (manifest, bytes): (Manifest, bytes::Bytes) = runtime
        .block_on(read_model(&store, step))
        .with_context(|| format!("reading the model of {location}"))?;
    tracing::info!("weights: step {} of {}", manifest.step, store.url());
    let config = simmim_model::weights::config_from_safetensors(&bytes)?;
    Ok((state_dict_from_safetensors(&bytes)?, config))
}
