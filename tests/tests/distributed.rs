//! Data-parallel training through the real binaries on loopback: N workers equal one worker
//! with N times the batch; a killed worker ends its generation and the survivors finish from
//! the last checkpoint with every sample of an epoch used at most once; restarts are bounded;
//! stale and unauthenticated peers are refused without disturbing the run.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use simmim_proto::pb::coordinator_client::CoordinatorClient;
use simmim_proto::pb::{HeartbeatRequest, RegisterRequest};
use simmim_tests::*;

const DEADLINE: Duration = Duration::from_secs(240);

fn run_config(
    dir: &Path,
    name: &str,
    data: &Path,
    epochs: u32,
    micro: usize,
    workers: &str,
) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    let text = tiny_config_with(&dir.join("runs"), name, data, epochs, 5, micro, workers);
    std::fs::write(&path, text).expect("config");
    path
}

fn start(config: &Path, dir: &Path) -> std::process::Output {
    let out = coordinator(
        &["start", "--config", config.to_str().expect("utf8")],
        dir,
        DEADLINE,
    );
    assert!(
        out.status.success(),
        "coordinator failed:\n{}",
        stderr(&out)
    );
    out
}

#[test]
fn n_workers_match_one_worker_with_n_times_the_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 2, 24); // 48 usable samples
    let one = run_config(dir.path(), "one", &data, 2, 16, "");
    start(&one, dir.path());
    let reference = checkpoint_file(&dir.path().join("runs/one"), 6, "model.safetensors");
    for (world, micro) in [(2usize, 8usize), (4, 4)] {
        let name = format!("world{world}");
        let workers = format!("  min: {world}\n  max: {world}\n  last_call_s: 0\n");
        let config = run_config(dir.path(), &name, &data, 2, micro, &workers);
        start(&config, dir.path());
        let run = dir.path().join("runs").join(&name);
        let weights = checkpoint_file(&run, 6, "model.safetensors");
        let difference = relative_difference(&reference, &weights);
        assert!(
            difference <= 1e-5,
            "{world} workers x {micro} vs 1 x 16: relative difference {difference:e}"
        );
        assert!(
            difference > 0.0 || world == 1,
            "the runs really were different processes"
        );
        let losses: Vec<f64> = metrics(&run)
            .iter()
            .filter_map(|m| m["loss"].as_f64())
            .collect();
        let reference_losses: Vec<f64> = metrics(&dir.path().join("runs/one"))
            .iter()
            .filter_map(|m| m["loss"].as_f64())
            .collect();
        for (a, b) in losses.iter().zip(&reference_losses) {
            assert!((a - b).abs() <= 1e-4 * b.abs(), "loss {a} vs {b}");
        }
    }
}

/// Kills the process of `rank` (found through `coordinator status`) and returns its pid.
pub(crate) fn kill_rank(run: &Path, rank: u64) -> u64 {
    let mut pid = None;
    assert!(wait_until(DEADLINE, || {
        pid = live_status(run).and_then(|s| {
            s["workers"]
                .as_array()?
                .iter()
                .find(|w| w["rank"] == rank && w["step"].as_u64().unwrap_or(0) > 0)
                .and_then(|w| w["pid"].as_u64())
        });
        pid.is_some()
    }));
    let pid = pid.expect("pid");
    let status = std::process::Command::new("kill")
        .args(["-s", "KILL", &pid.to_string()])
        .status();
    assert!(status.is_ok_and(|s| s.success()), "kill {pid}");
    pid
}

pub(crate) fn wait_for_checkpoint(run: &Path, past: u64) {
    assert!(
        wait_until(DEADLINE, || {
            std::fs::read_to_string(run.join("latest"))
                .ok()
                .and_then(|l| simmim_proto::Manifest::step_of(l.trim()))
                .is_some_and(|step| step > past)
        }),
        "no checkpoint past step {past}"
    );
}

#[test]
fn a_killed_worker_ends_its_generation_and_the_survivors_finish_with_each_sample_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 3, 40); // 120 usable samples
    let workers = "  min: 2\n  max: 3\n  last_call_s: 1\n  max_restarts: 2\n";
    let config = run_config(dir.path(), "kill", &data, 60, 4, workers);
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .expect("read")
            .replace("recon_images: 4", "recon_images: 4\n  log_samples: true"),
    )
    .expect("write");
    let run = dir.path().join("runs/kill");
    let coordinator = start_in_background(&config, dir.path());
    wait_for_checkpoint(&run, 0);
    kill_rank(&run, 1);

    // A worker of the ended generation is refused and told why.
    let (address, token) = coordinator_info(&run).expect("coordinator.json");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    assert!(wait_until(DEADLINE, || live_status(&run)
        .is_some_and(|s| s["generation"] == 1)));
    let stale = runtime.block_on(async {
        let channel = tonic::transport::Channel::from_shared(address.clone())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut client = CoordinatorClient::with_interceptor(
            channel,
            simmim_proto::auth::AddToken::new(Some(&token)).expect("token"),
        );
        client
            .heartbeat(HeartbeatRequest {
                generation: 0,
                rank: 2,
                step: 1,
            })
            .await
    });
    let status = stale.expect_err("stale heartbeat refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("generation 0 has ended"),
        "{}",
        status.message()
    );

    let out = wait_with_deadline(coordinator, DEADLINE);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stderr(&out);
    assert!(log.contains("restart 1/2"), "{log}");

    // The final history: a generation's steps replace those an earlier one ran past its
    // resume point. Within it, each epoch uses each sample at most once.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("samples.jsonl"))
        .expect("samples.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let mut first_step: BTreeMap<u64, u64> = BTreeMap::new();
    for l in &lines {
        let (g, s) = (
            l["generation"].as_u64().expect("g"),
            l["step"].as_u64().expect("s"),
        );
        let e = first_step.entry(g).or_insert(s);
        *e = (*e).min(s);
    }
    assert!(first_step.len() >= 2, "a second generation ran");
    let kept = |g: u64, s: u64| first_step.range(g + 1..).all(|(_, &resumed)| s < resumed);
    let mut per_epoch: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for l in &lines {
        let (g, s) = (
            l["generation"].as_u64().expect("g"),
            l["step"].as_u64().expect("s"),
        );
        if kept(g, s) {
            let ids = l["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_u64().expect("id") as u32);
            per_epoch
                .entry(l["epoch"].as_u64().expect("epoch"))
                .or_default()
                .extend(ids);
        }
    }
    for (epoch, ids) in &per_epoch {
        let unique: HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "epoch {epoch} used a sample twice");
    }
    let full_epochs = per_epoch.len() - 1;
    for ids in per_epoch.values().take(full_epochs) {
        assert!(
            ids.len() >= 120 - 12,
            "an epoch covered {} of 120 samples",
            ids.len()
        );
    }
    let world_after: Vec<u64> = metrics(&run)
        .iter()
        .filter_map(|m| m["generation"].as_u64())
        .collect();
    assert!(world_after.contains(&1));
}

#[test]
fn restarts_are_bounded_and_the_failure_is_clear() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 3, 40);
    let workers = "  min: 1\n  max: 3\n  last_call_s: 1\n  max_restarts: 1\n";
    let config = run_config(dir.path(), "bounded", &data, 100, 4, workers);
    let run = dir.path().join("runs/bounded");
    let coordinator = start_in_background(&config, dir.path());
    wait_for_checkpoint(&run, 0);
    kill_rank(&run, 2);
    assert!(wait_until(DEADLINE, || live_status(&run)
        .is_some_and(|s| s["generation"] == 1 && s["world_size"] == 2)));
    kill_rank(&run, 1);
    let out = wait_with_deadline(coordinator, DEADLINE);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("giving up after 1 restarts"), "{log}");
}

#[test]
fn intruders_without_the_token_are_refused_and_garbage_does_not_disturb_training() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 3, 40);
    let workers = "  min: 2\n  max: 2\n  last_call_s: 0\n";
    let config = run_config(dir.path(), "guarded", &data, 30, 4, workers);
    let run = dir.path().join("runs/guarded");
    let coordinator = start_in_background(&config, dir.path());
    wait_for_checkpoint(&run, 0);
    let (address, _token) = coordinator_info(&run).expect("coordinator.json");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    for token in [None, Some("wrong-token")] {
        let refused = runtime.block_on(async {
            let channel = tonic::transport::Channel::from_shared(address.clone())
                .expect("url")
                .connect()
                .await
                .expect("connect");
            let mut client = CoordinatorClient::with_interceptor(
                channel,
                simmim_proto::auth::AddToken::new(token).expect("token"),
            );
            client
                .register(RegisterRequest {
                    worker_id: "intruder".into(),
                    ..Default::default()
                })
                .await
        });
        let status = refused.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("token"));
    }
    // The health service (what Kubernetes probes) answers without a token.
    let health = runtime.block_on(async {
        let channel = tonic::transport::Channel::from_shared(address.clone())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
    });
    assert_eq!(
        health.expect("health check").into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // Garbage to the coordinator's port and to every worker's transport port.
    let port = address.rsplit(':').next().expect("port");
    let mut targets = vec![format!("127.0.0.1:{port}")];
    if let Some(status) = live_status(&run) {
        for w in status["workers"].as_array().into_iter().flatten() {
            targets.push(w["transport_addr"].as_str().unwrap_or_default().to_string());
        }
    }
    for target in &targets {
        if let Ok(mut stream) = std::net::TcpStream::connect(target) {
            let _ = stream.write_all(&[0x5a; 4096]);
            let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04garbage");
        }
    }
    let out = wait_with_deadline(coordinator, DEADLINE);
    assert!(
        out.status.success(),
        "training was disturbed:\n{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("refused a request with no run token"),
        "{}",
        stderr(&out)
    );
    let steps = metrics(&run).len();
    assert_eq!(steps, 30 * 15, "the run finished all its steps");
}
