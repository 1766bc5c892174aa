//! Checkpoints on a real S3-compatible server (moto_server on 127.0.0.1): a killed run
//! resumes to the same weights; crashes inside a commit leave the previous checkpoint in
//! force; damaged objects are detected and the previous checkpoint used; a storage outage
//! pauses checkpoints, not training.

use std::path::Path;
use std::time::{Duration, Instant};

use simmim_tests::*;

const DEADLINE: Duration = Duration::from_secs(240);

fn s3_config(
    dir: &Path,
    server: &S3Server,
    name: &str,
    data: &Path,
    epochs: u32,
) -> (std::path::PathBuf, String) {
    let root = format!("s3://{}/runs", server.bucket);
    let text = tiny_config(Path::new(&root), name, data, epochs, 5)
        .replace("every_minutes: null", "every_minutes: null\n  keep_last: 3");
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).expect("config");
    (path, format!("{root}/{name}"))
}

fn start_ok(config: &Path, dir: &Path, env: &[(String, String)], extra: &[&str]) -> String {
    let mut args = vec!["start", "--config", config.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    let out = coordinator_with_env(&args, dir, DEADLINE, env);
    assert!(
        out.status.success(),
        "coordinator failed:\n{}",
        stderr(&out)
    );
    stderr(&out)
}

/// The newest committed checkpoint before `step` (every 5 steps), asked of the store
/// through `worker export --step`.
fn newest_before(step: u64, url: &str, env: &[(String, String)], dir: &Path) -> u64 {
    (1..step / 5)
        .rev()
        .map(|k| k * 5)
        .find(|&candidate| {
            std::process::Command::new(binary("worker"))
                .args(["export", "--format", "safetensors", "--step"])
                .arg(candidate.to_string())
                .args(["--checkpoint", url, "--out"])
                .arg(dir.join("probe.safetensors"))
                .envs(env.iter().map(|(k, v)| (k, v)))
                .output()
                .is_ok_and(|out| out.status.success())
        })
        .expect("a committed checkpoint before the damaged one")
}

fn resumed_from(log: &str) -> Option<u64> {
    log.split("from step ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[test]
fn killed_and_crashed_runs_on_s3_resume_to_the_same_weights() {
    let server = S3Server::start("simmim-test");
    let env = server.env();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 2, 20);
    let epochs = 40; // 200 steps

    let (straight, straight_url) = s3_config(dir.path(), &server, "straight", &data, epochs);
    start_ok(&straight, dir.path(), &env, &[]);
    assert_eq!(latest_step(&straight_url, &env), Some(200));
    let reference = exported_weights(&straight_url, None, &env, dir.path());

    // SIGKILL to the coordinator and its worker mid-run; the same command resumes.
    let (killed, killed_url) = s3_config(dir.path(), &server, "killed", &data, epochs);
    let args = ["start", "--config", killed.to_str().expect("utf8")];
    let mut child =
        spawn_coordinator_with_env(&args, dir.path(), &env, &dir.path().join("killed.log"));
    let reached = wait_until(DEADLINE, || {
        latest_step(&killed_url, &env).is_some_and(|s| s >= 10)
    });
    kill_group(&mut child);
    assert!(reached, "no checkpoint on S3 before the deadline");
    let log = start_ok(&killed, dir.path(), &env, &[]);
    let resumed = resumed_from(&log).unwrap_or_else(|| panic!("did not resume:\n{log}"));
    assert!(
        (10..200).contains(&resumed),
        "killed mid-way, resumed at {resumed}"
    );
    assert!(
        exported_weights(&killed_url, None, &env, dir.path()) == reference,
        "weights after kill + resume differ"
    );

    // A crash after the data objects, before the manifest; and one after the manifest,
    // before `latest` moved: either way the previous checkpoint stays in force.
    for fault in ["exit-before-manifest", "exit-before-latest"] {
        let name = format!("crash-{}", fault.trim_start_matches("exit-"));
        let (config, url) = s3_config(dir.path(), &server, &name, &data, epochs);
        let args = ["start", "--config", config.to_str().expect("utf8")];
        let log_path = dir.path().join(format!("{name}.log"));
        let mut env_fault = env.clone();
        env_fault.push(("SIMMIM_FAULT".into(), format!("{fault}@50")));
        let mut child = spawn_coordinator_with_env(&args, dir.path(), &env_fault, &log_path);
        let crashed = wait_until(DEADLINE, || matches!(child.try_wait(), Ok(Some(_))));
        kill_group(&mut child);
        assert!(crashed, "{fault}: the coordinator did not crash");
        let crash_log = std::fs::read_to_string(&log_path).expect("log");
        let crashed_at: u64 = crash_log
            .split("injected fault ")
            .nth(1)
            .and_then(|rest| rest.split("at step ").nth(1))
            .and_then(|rest| rest.split(':').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{fault}: no injected fault in the log:\n{crash_log}"));
        let before = latest_step(&url, &env).expect("a checkpoint before the crash");
        assert!(
            before < crashed_at,
            "{fault}: latest is {before}, the crash was at {crashed_at}"
        );
        let log = start_ok(&config, dir.path(), &env, &[]);
        assert_eq!(
            resumed_from(&log),
            Some(before),
            "{fault}: resumed from the previous checkpoint:\n{log}"
        );
        assert!(
            exported_weights(&url, None, &env, dir.path()) == reference,
            "{fault}: final weights differ"
        );
    }
}

#[test]
fn damaged_checkpoints_are_detected_and_the_previous_one_is_used() {
    let server = S3Server::start("simmim-damage");
    let env = server.env();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 2, 20);
    let (config, url) = s3_config(dir.path(), &server, "damaged", &data, 8); // 40 steps
    start_ok(&config, dir.path(), &env, &[]);
    let reference = exported_weights(&url, None, &env, dir.path());

    // Same size, other bytes: only the checksum can tell. The previous committed checkpoint
    // is 35 unless the run skipped it (a periodic checkpoint due while the one before is
    // still uploading is skipped): ask the store which it is.
    let previous = newest_before(40, &url, &env, dir.path());
    let model = exported_weights(&url, Some(40), &env, dir.path());
    let mut altered = model.clone();
    let last = altered.len() - 1;
    altered[last] ^= 0x55;
    server.overwrite(
        "runs/damaged/checkpoints/0000000040/model.safetensors",
        &altered,
    );
    let log = start_ok(&config, dir.path(), &env, &[]);
    assert!(
        log.contains("checkpoint at step 40 is damaged") && log.contains("sha256"),
        "{log}"
    );
    assert_eq!(resumed_from(&log), Some(previous), "{log}");
    assert!(
        exported_weights(&url, None, &env, dir.path()) == reference,
        "re-trained from {previous} to the same weights"
    );

    // Truncated.
    let previous = newest_before(40, &url, &env, dir.path());
    server.overwrite(
        "runs/damaged/checkpoints/0000000040/optimizer.safetensors",
        b"trunc",
    );
    let log = start_ok(&config, dir.path(), &env, &[]);
    assert!(log.contains("damaged"), "{log}");
    assert_eq!(resumed_from(&log), Some(previous), "{log}");

    // Retention kept the newest 3 committed checkpoints.
    let out = std::process::Command::new(binary("worker"))
        .args([
            "export",
            "--format",
            "safetensors",
            "--step",
            "20",
            "--checkpoint",
            &url,
            "--out",
        ])
        .arg(dir.path().join("gone.safetensors"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("export");
    assert!(
        !out.status.success(),
        "checkpoint 20 should have been deleted by retention"
    );
}

#[test]
fn a_storage_outage_pauses_checkpoints_not_training() {
    let server = S3Server::start("simmim-outage");
    let mut env = server.env();
    env.push(("SIMMIM_TOKEN".into(), "outage-test-token".into()));
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 3, 40);
    let (config, url) = s3_config(dir.path(), &server, "outage", &data, 60); // 900 steps
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "start",
        "--config",
        config.to_str().expect("utf8"),
        "--listen",
        &listen,
    ];
    let log_path = dir.path().join("outage.log");
    let mut child = spawn_coordinator_with_env(&args, dir.path(), &env, &log_path);
    assert!(
        wait_until(DEADLINE, || latest_step(&url, &env).is_some_and(|s| s >= 5)),
        "no first checkpoint"
    );

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let live_step = || {
        runtime.block_on(async {
            let channel = tonic::transport::Channel::from_shared(format!("http://{listen}"))
                .ok()?
                .connect()
                .await
                .ok()?;
            let mut client =
                simmim_proto::pb::coordinator_client::CoordinatorClient::with_interceptor(
                    channel,
                    simmim_proto::auth::AddToken::new(Some("outage-test-token")).ok()?,
                );
            let reply = client
                .status(simmim_proto::pb::StatusRequest {})
                .await
                .ok()?
                .into_inner();
            let status: serde_json::Value = serde_json::from_str(&reply.status_json).ok()?;
            status["step"].as_u64()
        })
    };
    let before = live_step().expect("live status");
    server.pause(true);
    // Out for as long as 50 steps take (ten checkpoint attempts at one every 5 steps), at
    // most 30 s: a stalled run fails the assertion below at the bound.
    let outage_end = Instant::now() + Duration::from_secs(30);
    let mut during = before;
    while during < before + 50 && Instant::now() < outage_end {
        std::thread::sleep(Duration::from_millis(200));
        during = live_step().expect("live status during the outage");
    }
    server.pause(false);
    assert!(
        during >= before + 50,
        "training stalled during the outage: step {before} -> {during}"
    );

    let finished = wait_until(DEADLINE, || matches!(child.try_wait(), Ok(Some(_))));
    kill_group(&mut child);
    let log = std::fs::read_to_string(&log_path).expect("log");
    assert!(finished, "the run did not finish:\n{log}");
    let final_step = latest_step(&url, &env).expect("a checkpoint after the outage");
    assert_eq!(
        final_step, 900,
        "the final checkpoint landed after the outage:\n{log}"
    );
}
