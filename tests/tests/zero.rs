//! Optimizer-state sharding (`train.zero: 1`) through the real binaries on loopback: N
//! sharded workers equal one worker with N times the batch, weights and AdamW moments alike,
//! each rank holding its share of the moments; and a checkpoint resumes at another world
//! size, sharded or not, to the same weights as a run that never sharded.

use std::path::{Path, PathBuf};
use std::time::Duration;

use simmim_tests::*;

const DEADLINE: Duration = Duration::from_secs(240);

/// A tiny run's config: `world` workers (1: no `workers:` bounds), sharded or not.
fn config(
    dir: &Path,
    file: &str,
    run: &str,
    data: &Path,
    micro: usize,
    world: usize,
    zero: bool,
) -> PathBuf {
    let workers = match world {
        1 => String::new(),
        n => format!("  min: {n}\n  max: {n}\n  last_call_s: 0\n"),
    };
    let mut text = tiny_config_with(&dir.join("runs"), run, data, 2, 5, micro, &workers);
    if zero {
        text = text.replace("train:\n", "train:\n  zero: 1\n");
    }
    let path = dir.join(format!("{file}.yaml"));
    std::fs::write(&path, text).expect("config");
    path
}

fn start(config: &Path, dir: &Path, extra: &[&str]) {
    let out = coordinator(
        &[
            &["start", "--config", config.to_str().expect("utf8")],
            extra,
        ]
        .concat(),
        dir,
        DEADLINE,
    );
    assert!(
        out.status.success(),
        "coordinator failed:\n{}",
        stderr(&out)
    );
}

/// The AdamW moment values each worker of `run` reported holding after its first step.
fn moment_floats(run: &Path) -> Vec<usize> {
    let mut floats = Vec::new();
    for entry in std::fs::read_dir(run.join("logs")).expect("logs") {
        let log = std::fs::read_to_string(entry.expect("entry").path()).expect("log");
        floats.extend(log.lines().filter_map(|l| {
            let value = l.split("moment_floats=").nth(1)?;
            value.split_whitespace().next()?.parse::<usize>().ok()
        }));
    }
    floats
}

fn losses(run: &Path) -> Vec<f64> {
    metrics(run)
        .iter()
        .filter_map(|m| m["loss"].as_f64())
        .collect()
}

#[test]
fn sharded_workers_match_one_worker_with_the_whole_batch_and_hold_their_share() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 2, 24); // 48 samples: 4 steps of 12 per epoch
    let one = config(dir.path(), "one", "one", &data, 12, 1, false);
    start(&one, dir.path(), &[]);
    let reference_run = dir.path().join("runs/one");
    let reference = checkpoint_file(&reference_run, 8, "model.safetensors");
    let reference_moments = checkpoint_file(&reference_run, 8, "optimizer.safetensors");
    let whole = moment_floats(&reference_run);
    assert_eq!(
        whole.len(),
        1,
        "one worker logs its optimizer state once: {whole:?}"
    );
    let whole = whole[0];
    assert!(whole > 10_000, "{whole} moment values");

    for (world, micro) in [(2usize, 6usize), (3, 4)] {
        let name = format!("zero{world}");
        let sharded = config(dir.path(), &name, &name, &data, micro, world, true);
        start(&sharded, dir.path(), &[]);
        let run = dir.path().join("runs").join(&name);
        let weights = checkpoint_file(&run, 8, "model.safetensors");
        let difference = relative_difference(&reference, &weights);
        assert!(
            difference <= 1e-5 && difference > 0.0,
            "{world} sharded workers x {micro} vs 1 x 12: relative weight difference {difference:e}"
        );
        // The checkpoint holds the whole optimizer state, in the unsharded layout.
        let moments = checkpoint_file(&run, 8, "optimizer.safetensors");
        let difference = relative_difference(&reference_moments, &moments);
        assert!(
            difference <= 1e-4,
            "{world} sharded workers: relative moment difference {difference:e}"
        );
        for (a, b) in losses(&run).iter().zip(&losses(&reference_run)) {
            assert!((a - b).abs() <= 1e-4 * b.abs(), "loss {a} vs {b}");
        }
        assert_eq!(losses(&run).len(), 8);
        // Every rank holds its share: together the whole state once, each about 1/N of it
        // (a chunk per bucket, padded to a multiple of the world).
        let shares = moment_floats(&run);
        eprintln!("world {world}: AdamW moment values per rank {shares:?}, unsharded {whole}");
        assert_eq!(shares.len(), world, "{shares:?}");
        assert_eq!(shares.iter().sum::<usize>(), whole, "{shares:?} vs {whole}");
        for share in &shares {
            assert!(
                share.abs_diff(whole / world) <= 2 * world * 16,
                "world {world}: shares {shares:?} of {whole}"
            );
        }
    }
}

#[test]
fn a_checkpoint_resumes_at_another_world_size_sharded_or_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 2, 24);
    // (run, first three steps on 3 workers sharded?, the rest on 2 workers sharded?)
    let legs = [
        ("plain", false, false),
        ("zero_to_zero", true, true),
        ("zero_to_plain", true, false),
        ("plain_to_zero", false, true),
    ];
    for (run, first, second) in legs {
        let three = config(dir.path(), &format!("{run}-3"), run, &data, 4, 3, first);
        start(&three, dir.path(), &["--max-steps", "3"]);
        let two = config(dir.path(), &format!("{run}-2"), run, &data, 4, 2, second);
        start(&two, dir.path(), &[]);
    }
    let runs = dir.path().join("runs");
    let last = metrics(&runs.join("plain"))
        .last()
        .and_then(|m| m["step"].as_u64())
        .expect("the plain run's last step");
    assert!(last > 3, "the second leg ran: last step {last}");
    let reference = checkpoint_file(&runs.join("plain"), last, "model.safetensors");
    let reference_moments = checkpoint_file(&runs.join("plain"), last, "optimizer.safetensors");
    for (run, _, _) in &legs[1..] {
        let weights = checkpoint_file(&runs.join(run), last, "model.safetensors");
        let difference = relative_difference(&reference, &weights);
        assert!(
            difference <= 1e-5,
            "{run}: relative weight difference {difference:e} against never sharded"
        );
        let moments = checkpoint_file(&runs.join(run), last, "optimizer.safetensors");
        let difference = relative_difference(&reference_moments, &moments);
        assert!(
            difference <= 1e-4,
            "{run}: relative moment difference {difference:e}"
        );
    }
}

#[test]
fn a_killed_worker_ends_a_sharded_generation_and_the_next_one_shards_again() {
    use crate::distributed::{kill_rank, wait_for_checkpoint};
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 3, 40); // 120 samples
    let workers = "  min: 2\n  max: 3\n  last_call_s: 1\n  max_restarts: 2\n";
    let mut text = tiny_config_with(&dir.path().join("runs"), "kill", &data, 30, 5, 4, workers);
    text = text.replace("train:\n", "train:\n  zero: 1\n");
    let config = dir.path().join("kill.yaml");
    std::fs::write(&config, text).expect("config");
    let run = dir.path().join("runs/kill");
    let coordinator = start_in_background(&config, dir.path());
    wait_for_checkpoint(&run, 0);
    kill_rank(&run, 1);
    let out = wait_with_deadline(coordinator, DEADLINE);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("restart 1/2"), "{log}");
    // Each generation laid its shards out anew: every rank of each logged its share.
    let generations: std::collections::BTreeSet<u64> = metrics(&run)
        .iter()
        .filter_map(|m| m["generation"].as_u64())
        .collect();
    assert!(generations.len() >= 2, "generations {generations:?}");
    let shares = moment_floats(&run);
    eprintln!("moment shares logged per rank and generation: {shares:?}");
    assert!(shares.len() >= 4, "moment shares logged: {shares:?}");
    // The last checkpoint holds the whole optimizer state at its step.
    let last = metrics(&run)
        .last()
        .and_then(|m| m["step"].as_u64())
        .expect("last step");
    let moments = tensors(&checkpoint_file(&run, last, "optimizer.safetensors"));
    let weights = tensors(&checkpoint_file(&run, last, "model.safetensors"));
    for name in [
        "decoder.0.weight",
        "encoder.patch_embed.proj.weight",
        "encoder.norm.bias",
    ] {
        let sq = &moments[&format!("{name}.exp_avg_sq")];
        assert_eq!(sq.len(), weights[name].len(), "{name}");
        assert!(sq.iter().all(|v| v.is_finite() && *v >= 0.0), "{name}");
        assert!(
            sq.iter().any(|v| *v > 0.0),
            "{name}: moments were gathered, not zeros"
        );
    }
}
