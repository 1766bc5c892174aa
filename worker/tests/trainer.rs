//! The trainer without a coordinator: a solo generation on a [`LocalLink`] trains, commits
//! checkpoints through the protocol module, and a run stopped and resumed ends exactly where
//! an uninterrupted one does.

use std::path::Path;
use std::sync::Arc;

use burn::backend::Autodiff;
use burn_flex::Flex;
use simmim_proto::checkpoint::layout::read_model;
use simmim_proto::checkpoint::{CheckpointBytes, MODEL_FILE};
use simmim_proto::store::{location_url, RunStore};
use simmim_proto::{Manifest, RunConfig};
use simmim_worker::generation::LocalLink;
use simmim_worker::trainer::pretrain::Pretrain;
use simmim_worker::trainer::train;

type B = Autodiff<Flex>;

/// Two classes of 16 small PNGs with a gradient and a per-image colour.
fn image_folder(root: &Path) -> std::path::PathBuf {
    let dir = root.join("images");
    for class in 0..2u8 {
        let class_dir = dir.join(format!("c{class}"));
        std::fs::create_dir_all(&class_dir).expect("class dir");
        for i in 0..16u8 {
            let image = image::RgbImage::from_fn(20, 20, |x, y| {
                image::Rgb([
                    (x as u8) * 12,
                    (y as u8) * 12,
                    i.wrapping_mul(15) ^ (class * 128),
                ])
            });
            image
                .save(class_dir.join(format!("{i:02}.png")))
                .expect("png");
        }
    }
    dir
}

fn config(root: &Path, data: &Path, max_steps: Option<u64>) -> RunConfig {
    let max = max_steps.map_or("null".to_string(), |s| s.to_string());
    let yaml = format!(
        r#"run:
  name: solo
  root: {root}
  seed: 5
model:
  config:
    encoder:
      type: swin
      img_size: 16
      patch_size: 2
      embed_dim: 16
      depths: [1, 1]
      num_heads: [1, 2]
      window_size: 4
    mask_patch_size: 4
    mask_ratio: 0.6
data:
  train: {data}
  loader_threads: 1
train:
  epochs: 2
  warmup_epochs: 0.5
  micro_batch: 4
  accumulation: 2
  compute_threads: 1
  max_steps: {max}
  base_lr: 0.02
  warmup_lr: 0.0001
  min_lr: 0.0001
checkpoint:
  every_steps: 3
  every_minutes: null
output:
  recon_every_steps: 0
workers:
  min: 1
  max: 1
"#,
        root = root.display(),
        data = data.display()
    );
    let config = RunConfig::from_yaml(&yaml, "test config").expect("config");
    config.validate().expect("valid config");
    config
}

/// Runs one solo generation of `config` on the run directory; returns the link and the step.
fn run(config: RunConfig, runtime: &tokio::runtime::Runtime) -> (Arc<LocalLink>, u64) {
    let url = simmim_proto::store::run_url(&config.run.root, &config.run.name).expect("url");
    let store = RunStore::open(url.as_str()).expect("store");
    let link = Arc::new(runtime.block_on(LocalLink::open(store)).expect("link"));
    let generation = link.solo(config, url.to_string(), runtime.handle().clone());
    let task = Pretrain::new(&generation).expect("task");
    let step = train::<B, _>(&generation, task, Default::default()).expect("train");
    (link, step)
}

fn final_model(root: &Path, runtime: &tokio::runtime::Runtime) -> (Manifest, Vec<u8>) {
    let url = location_url(&root.join("solo").display().to_string()).expect("url");
    let store = RunStore::open(url.as_str()).expect("store");
    let (manifest, model) = runtime.block_on(read_model(&store, None)).expect("model");
    (manifest, model.to_vec())
}

#[test]
fn a_solo_run_commits_and_a_resumed_run_ends_where_an_uninterrupted_one_does() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let tmp = tempfile::tempdir().expect("tmp");
    let data = image_folder(tmp.path());

    // Uninterrupted: 32 images, global batch 8 -> 4 steps an epoch, 8 in all.
    let whole = tmp.path().join("whole");
    let (link, step) = run(config(&whole, &data, None), &runtime);
    assert_eq!(step, 8);
    let reported = link.reported();
    assert_eq!(
        reported.iter().map(|m| m.step).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    assert!(reported.iter().all(|m| m.loss.is_finite() && m.loss > 0.0));
    assert!(!link.was_stopped_early());
    let (manifest, whole_model) = final_model(&whole, &runtime);
    assert_eq!(
        (manifest.step, manifest.epoch, manifest.samples_seen),
        (8, 2, 64)
    );
    // The trainer state in the checkpoint is the position the manifest was derived from.
    let url = location_url(&whole.join("solo").display().to_string()).expect("url");
    let store = RunStore::open(url.as_str()).expect("store");
    // Checkpoints were due at steps 3 and 6. A background checkpoint is skipped when the
    // previous one is still uploading (the writer never queues them), which happens on a busy
    // machine: check the newest one that landed, against the position of its step.
    let kept = [(6, (6, 1, 16)), (3, (3, 0, 24))]
        .into_iter()
        .find_map(|(step, position)| {
            let read = runtime.block_on(CheckpointBytes::read(&store, &Manifest::path_for(step)));
            read.ok().map(|(_, pieces)| (pieces, position))
        });
    let (pieces, position) = kept.expect("checkpoint 6 or 3 is kept and verifies");
    assert_eq!(
        (
            pieces.trainer.step,
            pieces.trainer.epoch,
            pieces.trainer.epoch_offset
        ),
        position
    );
    assert!(manifest.files.iter().any(|f| f.path == MODEL_FILE));

    // Interrupted at step 5 (max_steps), then resumed from its final checkpoint.
    let split = tmp.path().join("split");
    let (first, step) = run(config(&split, &data, Some(5)), &runtime);
    assert_eq!(step, 5);
    assert_eq!(first.reported().len(), 5);
    let (second, step) = run(config(&split, &data, None), &runtime);
    assert_eq!(step, 8);
    assert_eq!(
        second.reported().iter().map(|m| m.step).collect::<Vec<_>>(),
        vec![6, 7, 8]
    );
    for (resumed, straight) in second.reported().iter().zip(&reported[5..]) {
        let gap = (resumed.loss - straight.loss).abs() / straight.loss;
        assert!(
            gap < 1e-5,
            "step {}: loss {} vs {}",
            resumed.step,
            resumed.loss,
            straight.loss
        );
    }
    let (manifest, split_model) = final_model(&split, &runtime);
    assert_eq!(manifest.step, 8);
    assert_eq!(split_model.len(), whole_model.len());
}
