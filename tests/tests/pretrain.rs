//! One-machine pretraining through the real binaries: a run finishes with metrics, pictures
//! and checkpoints; a stopped or killed run resumes to the same weights as an uninterrupted
//! one; bad data and bad configs give clear errors.

use std::path::Path;
use std::time::Duration;

use simmim_tests::*;

const DEADLINE: Duration = Duration::from_secs(180);

fn write_config(dir: &Path, name: &str, data: &Path, epochs: u32) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, tiny_config(&dir.join("runs"), name, data, epochs, 5)).expect("config");
    path
}

#[test]
fn short_run_writes_metrics_pictures_checkpoints_and_skips_the_corrupt_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 2, 20);
    let config = write_config(dir.path(), "short", &data, 3);
    let out = coordinator(
        &["start", "--config", config.to_str().expect("utf8")],
        dir.path(),
        DEADLINE,
    );
    assert!(
        out.status.success(),
        "coordinator failed:\n{}",
        stderr(&out)
    );

    let run = dir.path().join("runs/short");
    let metrics = metrics(&run);
    // 41 files, one corrupt: 40 usable, 5 steps of 8 per epoch, 3 epochs.
    assert_eq!(metrics.len(), 15, "one metrics line per step");
    for (i, m) in metrics.iter().enumerate() {
        assert_eq!(m["step"], i as u64 + 1);
        for key in [
            "loss",
            "lr",
            "grad_norm",
            "images_per_sec",
            "data_wait_share",
        ] {
            let v = m[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} missing in {m}"));
            assert!(v.is_finite() && v >= 0.0, "{key} = {v}");
        }
    }
    let loss = |m: &serde_json::Value| m["loss"].as_f64().unwrap_or(f64::NAN);
    assert!(loss(&metrics[0]) > 0.1, "a real loss: {}", metrics[0]);
    let skipped = metrics
        .last()
        .and_then(|m| m["samples_skipped"].as_u64())
        .unwrap_or(0);
    assert!(skipped >= 1, "the corrupt file was counted: {skipped}");
    let log = std::fs::read_to_string(run.join("logs/worker-0.log")).expect("worker log");
    assert!(
        log.contains("corrupt.jpg"),
        "the corrupt file is named in the log"
    );

    for step in [5u64, 10, 15] {
        let manifest: serde_json::Value =
            serde_json::from_slice(&checkpoint_file(&run, step, "MANIFEST.json"))
                .expect("manifest");
        assert_eq!(manifest["step"], step);
        assert_eq!(manifest["files"].as_array().map(Vec::len), Some(3));
        let weights = checkpoint_file(&run, step, "model.safetensors");
        assert!(weights.len() > 10_000);
    }
    assert_eq!(
        std::fs::read_to_string(run.join("latest"))
            .expect("latest")
            .trim(),
        "checkpoints/0000000015/MANIFEST.json"
    );
    let pictures: Vec<_> = std::fs::read_dir(run.join("recon"))
        .expect("recon")
        .collect();
    assert!(
        pictures.len() >= 3,
        "a picture every 4 steps and at the end"
    );
    let png = image::open(run.join("recon/step_00000004.png"))
        .expect("png")
        .to_rgb8();
    // 4 rows of 16 px tiles enlarged to 128 px, 4 columns (original, masked, pasted, all).
    assert_eq!((png.width(), png.height()), (4 * 128 + 20, 4 * 132 + 4));

    // `coordinator status` on the finished run.
    let status = coordinator(
        &["status", "--run", run.to_str().expect("utf8")],
        dir.path(),
        DEADLINE,
    );
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && text.contains("step 15"),
        "{text}\n{}",
        stderr(&status)
    );

    // `worker reconstruct` from the run's newest checkpoint, on any image.
    let picture = dir.path().join("one.png");
    let image = data.join("class_1/img_000.jpg");
    let recon = std::process::Command::new(binary("worker"))
        .args(["reconstruct", "--checkpoint"])
        .arg(&run)
        .arg("--image")
        .arg(&image)
        .arg("--out")
        .arg(&picture)
        .output()
        .expect("worker reconstruct");
    assert!(recon.status.success(), "{}", stderr(&recon));
    assert_eq!(image::open(&picture).expect("png").width(), 4 * 128 + 20);

    // A drawn mask, as the paper's figures mask an object: the left half of the 16 px input
    // (two of the four 4 px mask units per row) is grey in the masked column, the right half
    // is the original.
    let drawn = dir.path().join("drawn.png");
    let reconstruct = |extra: &[&str], out: &Path| {
        std::process::Command::new(binary("worker"))
            .args(["reconstruct", "--checkpoint"])
            .arg(&run)
            .arg("--image")
            .arg(&image)
            .arg("--out")
            .arg(out)
            .args(extra)
            .output()
            .expect("worker reconstruct")
    };
    let recon = reconstruct(&["--mask-box", "0,0,8,16"], &drawn);
    assert!(recon.status.success(), "{}", stderr(&recon));
    let png = image::open(&drawn).expect("png").to_rgb8();
    let (tile, gap) = (128u32, 4u32);
    let masked_column = gap + tile + gap;
    for y in [gap + 5, gap + 120] {
        assert_eq!(
            png.get_pixel(masked_column + 5, y).0,
            [128, 128, 128],
            "masked left half"
        );
        assert_eq!(
            png.get_pixel(masked_column + 100, y),
            png.get_pixel(gap + 100, y),
            "visible right half is the original"
        );
    }
    // A mask PNG of another size, white on the right half, with a strategy override for the
    // random part that it replaces: the right half is grey now.
    let mask_png = dir.path().join("mask.png");
    image::GrayImage::from_fn(40, 40, |x, _| image::Luma([if x >= 20 { 255 } else { 0 }]))
        .save(&mask_png)
        .expect("mask png");
    let recon = reconstruct(
        &[
            "--mask",
            mask_png.to_str().expect("utf8"),
            "--strategy",
            "square",
        ],
        &drawn,
    );
    assert!(recon.status.success(), "{}", stderr(&recon));
    let png = image::open(&drawn).expect("png").to_rgb8();
    assert_eq!(
        png.get_pixel(masked_column + 100, gap + 5).0,
        [128, 128, 128]
    );
    // Bad mask options are named.
    for (args, named) in [
        (vec!["--mask-box", "1,2,3"], "--mask-box `1,2,3`"),
        (vec!["--strategy", "diagonal"], "`diagonal`"),
        (vec!["--mask-box", "0,0,1,1"], "covers no mask unit"),
        (vec!["--mask-patch", "6"], "mask_patch_size"),
    ] {
        let recon = reconstruct(&args, &drawn);
        assert!(!recon.status.success(), "{args:?} must fail");
        assert!(
            stderr(&recon).contains(named),
            "{args:?}: {}",
            stderr(&recon)
        );
    }
}

#[test]
fn stopped_and_killed_runs_resume_to_the_same_weights_as_an_uninterrupted_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 2, 20);
    let epochs = 40; // 200 steps of about 5 ms: long enough to be killed mid-way
    let straight = write_config(dir.path(), "straight", &data, epochs);
    let out = coordinator(
        &["start", "--config", straight.to_str().expect("utf8")],
        dir.path(),
        DEADLINE,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let reference = checkpoint_file(&dir.path().join("runs/straight"), 200, "model.safetensors");
    let reference_moments = checkpoint_file(
        &dir.path().join("runs/straight"),
        200,
        "optimizer.safetensors",
    );

    // Stopped at step 7 (a checkpoint is written at the stop), then resumed.
    let stopped = write_config(dir.path(), "stopped", &data, epochs);
    let args = ["start", "--config", stopped.to_str().expect("utf8")];
    let out = coordinator(
        &[&args[..], &["--max-steps", "7"]].concat(),
        dir.path(),
        DEADLINE,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let run = dir.path().join("runs/stopped");
    assert_eq!(metrics(&run).len(), 7);
    let out = coordinator(&[&args[..], &["--resume"]].concat(), dir.path(), DEADLINE);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resuming"), "{}", stderr(&out));
    let steps: Vec<u64> = metrics(&run)
        .iter()
        .filter_map(|m| m["step"].as_u64())
        .collect();
    assert_eq!(
        steps,
        (1..=200).collect::<Vec<_>>(),
        "resumed at step 8 exactly"
    );
    assert!(
        checkpoint_file(&run, 200, "model.safetensors") == reference,
        "weights after stop + resume differ from the uninterrupted run"
    );
    assert!(checkpoint_file(&run, 200, "optimizer.safetensors") == reference_moments);

    // Killed (SIGKILL to coordinator and worker) after its first checkpoints, then restarted
    // with the same command: it resumes by itself.
    let killed = write_config(dir.path(), "killed", &data, epochs);
    let args = ["start", "--config", killed.to_str().expect("utf8")];
    let run = dir.path().join("runs/killed");
    let mut child = spawn_coordinator(&args, dir.path());
    let reached = wait_until(DEADLINE, || {
        std::fs::read_to_string(run.join("latest")).is_ok_and(|l| !l.contains("0000000005"))
    });
    kill_group(&mut child);
    assert!(reached, "no checkpoint past step 5 before the deadline");
    let out = coordinator(&args, dir.path(), DEADLINE);
    assert!(out.status.success(), "{}", stderr(&out));
    let resumed_at: u64 = stderr(&out)
        .split("from step ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the restart did not resume:\n{}", stderr(&out)));
    assert!(
        (10..200).contains(&resumed_at),
        "killed mid-way, resumed at {resumed_at}"
    );
    assert!(
        checkpoint_file(&run, 200, "model.safetensors") == reference,
        "weights after kill + restart differ from the uninterrupted run"
    );
}

#[test]
fn bad_configs_and_missing_data_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 2, 4);
    let good = tiny_config(&dir.path().join("runs"), "bad", &data, 1, 5);
    let cases = [
        (
            good.replace("micro_batch: 8", "micro_batch: 0"),
            "train.micro_batch",
        ),
        (
            good.replace("micro_batch: 8", "micro_bach: 8"),
            "micro_bach",
        ),
        (
            good.replace("mask_ratio: 0.6", "mask_ratio: 1.6"),
            "model.config.mask_ratio",
        ),
        (
            good.replace("window_size: 4", "window_size: 4\n      depths: [1]"),
            "depths",
        ),
        (
            good.replace(&data.display().to_string(), "/no/such/dataset"),
            "/no/such/dataset",
        ),
        ("run: [unclosed".to_string(), "bad.yaml"),
    ];
    for (text, expected) in cases {
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, &text).expect("write");
        let out = coordinator(
            &["start", "--config", path.to_str().expect("utf8")],
            dir.path(),
            DEADLINE,
        );
        let err = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "config errors exit with 2 (do not retry): {err}"
        );
        assert!(
            err.contains(expected),
            "the error names `{expected}`:\n{err}"
        );
    }
    let out = coordinator(
        &[
            "start",
            "--config",
            dir.path().join("absent.yaml").to_str().expect("utf8"),
        ],
        dir.path(),
        DEADLINE,
    );
    assert!(stderr(&out).contains("absent.yaml") && !out.status.success());
}

#[test]
fn a_batch_larger_than_the_dataset_stops_the_worker_with_a_named_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 1, 3);
    let config = tiny_config(&dir.path().join("runs"), "tiny", &data, 1, 5);
    let path = dir.path().join("tiny.yaml");
    std::fs::write(&path, config).expect("write");
    let out = coordinator(
        &["start", "--config", path.to_str().expect("utf8")],
        dir.path(),
        DEADLINE,
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("fewer than one global batch"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_tls_coordinator_trains_and_refuses_plaintext() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A CA and a certificate it signed for localhost / 127.0.0.1.
    let (cert, key, ca) = make_certificate(dir.path(), "DNS:localhost,IP:127.0.0.1");
    let data = synthetic_image_folder(dir.path(), 2, 8);
    let config = tiny_config(&dir.path().join("runs"), "tls", &data, 2, 5)
        + &format!(
            "tls:\n  cert: {}\n  key: {}\n",
            cert.display(),
            key.display()
        );
    let path = dir.path().join("tls.yaml");
    std::fs::write(&path, config).expect("write");
    let run = dir.path().join("runs/tls");
    let env = [("SIMMIM_TLS_CA".to_string(), ca.display().to_string())];
    let args = ["start", "--config", path.to_str().expect("utf8")];
    let mut child =
        spawn_coordinator_with_env(&args, dir.path(), &env, &dir.path().join("tls.log"));
    // While it runs, a plaintext client cannot talk to it.
    assert!(wait_until(DEADLINE, || coordinator_info(&run).is_some()));
    let (address, _) = coordinator_info(&run).expect("coordinator.json");
    assert!(address.starts_with("https://"), "{address}");
    let plain = address.replace("https://", "http://");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let plaintext = runtime.block_on(async {
        let channel = tonic::transport::Channel::from_shared(plain)
            .expect("url")
            .connect()
            .await?;
        let mut client = simmim_proto::pb::coordinator_client::CoordinatorClient::new(channel);
        client
            .status(simmim_proto::pb::StatusRequest {})
            .await
            .map(|_| ())
            .map_err(|s| Box::new(s) as Box<dyn std::error::Error>)?;
        Ok::<_, Box<dyn std::error::Error>>(())
    });
    assert!(plaintext.is_err(), "a plaintext client got an answer");
    let finished = wait_until(
        DEADLINE,
        || matches!(child.try_wait(), Ok(Some(status)) if status.success()),
    );
    kill_group(&mut child);
    assert!(finished, "the TLS run did not finish");
    assert_eq!(
        metrics(&run).len(),
        4,
        "2 epochs of 2 steps through the TLS endpoint"
    );
}

#[test]
fn sigterm_stops_the_run_after_a_checkpoint_of_its_last_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 2, 20);
    let path = dir.path().join("stop.yaml");
    // 400 steps, no periodic checkpoint before the end: only the stop writes one.
    std::fs::write(
        &path,
        tiny_config(&dir.path().join("runs"), "stop", &data, 80, 5)
            .replace("every_steps: 5", "every_steps: 1000"),
    )
    .expect("write");
    let run = dir.path().join("runs/stop");
    let child = start_in_background(&path, dir.path());
    assert!(
        wait_until(DEADLINE, || metrics(&run).len() >= 20),
        "no progress"
    );
    let _ = std::process::Command::new("kill")
        .args(["-s", "TERM", &child.id().to_string()])
        .status();
    let out = wait_with_deadline(child, DEADLINE);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{log}");
    assert!(
        log.contains("stopped at step") && log.contains("resumes"),
        "{log}"
    );
    let last = metrics(&run)
        .last()
        .and_then(|m| m["step"].as_u64())
        .expect("metrics");
    assert!(last < 400, "it stopped early");
    let latest = std::fs::read_to_string(run.join("latest")).expect("latest");
    assert_eq!(
        latest.trim(),
        format!("checkpoints/{last:010}/MANIFEST.json"),
        "no step lost"
    );
}

/// Background checkpoints that land reset the outage clock: a run much longer than
/// `checkpoint.max_outage_minutes` whose checkpoints keep landing trains through in one
/// generation (an upload handle dropped before it finished once made every run fail its
/// generation each `max_outage_minutes`, losing the steps since the last checkpoint).
#[test]
fn landed_background_checkpoints_keep_a_long_run_in_one_generation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 2, 20);
    // 0.03 minutes: the outage limit is 1.8 s, the run takes several times that.
    let config = tiny_config(&dir.path().join("runs"), "long", &data, 120, 3).replace(
        "  every_minutes: null\n",
        "  every_minutes: null\n  max_outage_minutes: 0.03\n",
    );
    let path = dir.path().join("long.yaml");
    std::fs::write(&path, config).expect("config");
    let started = std::time::Instant::now();
    let out = coordinator(
        &["start", "--config", path.to_str().expect("utf8")],
        dir.path(),
        DEADLINE,
    );
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "coordinator failed:\n{}",
        stderr(&out)
    );
    let run = dir.path().join("runs/long");
    let metrics = metrics(&run);
    assert_eq!(metrics.len(), 600, "5 steps x 120 epochs");
    assert!(
        metrics.iter().all(|m| m["generation"] == 0),
        "the run never restarted"
    );
    assert!(
        seconds > 2.0 * 1.8,
        "the run outlasted the outage limit ({seconds:.1} s)"
    );
    let log = std::fs::read_to_string(run.join("logs/worker-0.log")).expect("worker log");
    let landed = log.matches("checkpoint committed").count();
    assert!(landed > 100, "periodic checkpoints are collected: {landed}");
}

#[test]
fn a_square_mask_and_smooth_l1_on_all_pixels_train_and_mask_stats_reports_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 2, 20);
    let path = dir.path().join("square.yaml");
    let text = tiny_config(&dir.path().join("runs"), "square", &data, 1, 5).replace(
        "    mask_ratio: 0.6\n",
        "    mask_ratio: 0.6\n    mask: {strategy: square, ratio: 0.5}\n    \
         loss: {kind: smooth_l1, beta: 0.5, area: all}\n",
    );
    std::fs::write(&path, &text).expect("config");
    let config = path.to_str().expect("utf8");
    let out = coordinator(&["start", "--config", config], dir.path(), DEADLINE);
    assert!(out.status.success(), "{}", stderr(&out));
    let metrics = metrics(&dir.path().join("runs/square"));
    assert_eq!(metrics.len(), 5);
    assert!(metrics
        .iter()
        .all(|m| m["loss"].as_f64().is_some_and(f64::is_finite)));

    // 16 px, 4 px units: 4x4 units, ratio 0.5 -> 8 units -> a 3x3 square (9 of 16: 0.5625).
    let stats = std::process::Command::new(binary("worker"))
        .args(["mask-stats", "--config", config, "--samples", "8"])
        .output()
        .expect("worker mask-stats");
    let text_out = String::from_utf8_lossy(&stats.stdout);
    assert!(stats.status.success(), "{}", stderr(&stats));
    assert!(
        text_out.contains("square strategy, mask patch 4 px, ratio 0.5 asked, 0.562 masked"),
        "{text_out}"
    );

    // A block mask needs 5x5 units; the error names the field.
    std::fs::write(&path, text.replace("strategy: square", "strategy: block")).expect("config");
    let stats = std::process::Command::new(binary("worker"))
        .args(["mask-stats", "--config", config])
        .output()
        .expect("worker mask-stats");
    assert!(!stats.status.success());
    assert!(
        stderr(&stats).contains("mask.strategy"),
        "{}",
        stderr(&stats)
    );
}

/// `encoder.type: swinv2` end to end, with activation checkpointing: the real binaries
/// pretrain it, and its checkpoint holds the official SwinV2 keys (what PyTorch's
/// `SwinTransformerV2ForSimMIM` loads strictly).
#[test]
fn a_swinv2_encoder_pretrains_and_checkpoints_under_the_official_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 2, 20);
    let path = dir.path().join("v2.yaml");
    let text = tiny_config(&dir.path().join("runs"), "v2", &data, 1, 5)
        .replace("      type: swin\n", "      type: swinv2\n")
        .replace("train:\n", "train:\n  activation_checkpointing: blocks\n");
    std::fs::write(&path, &text).expect("config");
    let out = coordinator(
        &["start", "--config", path.to_str().expect("utf8")],
        dir.path(),
        DEADLINE,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let run = dir.path().join("runs/v2");
    let metrics = metrics(&run);
    assert_eq!(metrics.len(), 5);
    assert!(metrics
        .iter()
        .all(|m| m["loss"].as_f64().is_some_and(|l| l.is_finite() && l > 0.1)));
    let weights = checkpoint_file(&run, 5, "model.safetensors");
    let tensors = safetensors::SafeTensors::deserialize(&weights).expect("safetensors");
    let names: Vec<String> = tensors.names().into_iter().cloned().collect();
    for key in [
        "encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight",
        "encoder.layers.0.blocks.0.attn.cpb_mlp.2.weight",
        "encoder.layers.0.blocks.0.attn.logit_scale",
        "encoder.layers.0.blocks.0.attn.q_bias",
        "encoder.layers.0.blocks.0.attn.relative_coords_table",
        "encoder.layers.0.downsample.norm.weight",
    ] {
        assert!(names.iter().any(|n| n == key), "{key} missing: {names:?}");
    }
    assert!(!names
        .iter()
        .any(|n| n.contains("relative_position_bias_table")));
}

/// `worker plan-memory`: SwinV2-G at batch 64 fits an 80 GB card only with activation
/// checkpointing; ZeRO-1 over 8 ranks divides its moments by 8; an unknown preset is a named
/// error.
#[test]
fn plan_memory_says_what_fits_where() {
    let out = std::process::Command::new(binary("worker"))
        .args([
            "plan-memory",
            "--preset",
            "swin_base,swinv2_giant",
            "--batch",
            "64",
            "--ranks",
            "8",
        ])
        .output()
        .expect("worker plan-memory");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let sharded_row = |model: &str, checkpointing: &str, sharding: &str| {
        text.lines()
            .find(|l| {
                l.starts_with(&format!("| {model} |"))
                    && l.contains(&format!("| {checkpointing} | {sharding} |"))
            })
            .unwrap_or_else(|| panic!("no {model} {checkpointing} {sharding} row:\n{text}"))
            .to_string()
    };
    let row = |model: &str, checkpointing: &str| sharded_row(model, checkpointing, "whole");
    assert!(
        row("swinv2_giant", "none").ends_with("| no | no |"),
        "{text}"
    );
    assert!(
        row("swinv2_giant", "blocks").ends_with("| fits | fits |"),
        "{text}"
    );
    assert!(row("swin_base", "none").contains("| 90 M |"), "{text}");
    // 3,010 M parameters: 24.1 GB of moments whole, 3.0 GB a rank over 8.
    assert!(row("swinv2_giant", "blocks").contains("| 24.1 |"), "{text}");
    let sharded = sharded_row("swinv2_giant", "blocks", "ZeRO-1 over 8");
    assert!(
        sharded.contains("| 3.0 |") && sharded.contains("| 41.1 |"),
        "{text}"
    );
    let bad = std::process::Command::new(binary("worker"))
        .args(["plan-memory", "--preset", "swin_huge"])
        .output()
        .expect("worker plan-memory");
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("unknown preset swin_huge"),
        "{}",
        stderr(&bad)
    );
}
