//! Watching a run: TensorBoard event files read back with TensorBoard's own reader, the
//! Prometheus endpoint checked with promtool while training, and `status --watch`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use simmim_tests::*;

const DEADLINE: Duration = Duration::from_secs(300);

fn tools_python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-tools/bin/python")
}

/// `tests/tools/check_tensorboard.py` over `logdir` and `metrics`: its output, and whether it
/// passed.
fn check_tensorboard(logdir: &Path, metrics: &Path, extra: &[&str]) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/check_tensorboard.py");
    let out = Command::new(tools_python())
        .arg(script)
        .arg("--logdir")
        .arg(logdir)
        .arg("--metrics")
        .arg(metrics)
        .args(extra)
        .output()
        .expect("python from .venv-tools (scripts/test.sh installs tensorboard there)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).expect("config");
    path
}

fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.to_string_lossy().contains("tfevents"));
    files.sort();
    files
}

#[test]
fn tensorboard_files_match_metrics_through_a_crash_and_resume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 2, 24);
    let config = write(
        dir.path(),
        "tb",
        &tiny_config(dir.path().join("runs").as_path(), "tb", &data, 3, 4),
    );
    let args = ["start", "--config", config.to_str().expect("utf8")];
    let run = dir.path().join("runs/tb");

    // A crash at the commit of step 8 (manifest written, `latest` not moved): the run resumes
    // from step 4 and trains steps 5.. again, so the first files hold points the second run
    // replaces.
    let log = dir.path().join("crash.log");
    let env = [(
        "SIMMIM_FAULT".to_string(),
        "exit-before-latest@8".to_string(),
    )];
    let mut child = spawn_coordinator_with_env(&args, dir.path(), &env, &log);
    let crashed = wait_until(DEADLINE, || matches!(child.try_wait(), Ok(Some(_))));
    kill_group(&mut child);
    assert!(crashed, "the coordinator did not crash");
    let before: Vec<u64> = metrics(&run)
        .iter()
        .filter_map(|m| m["step"].as_u64())
        .collect();
    assert!(before.contains(&8), "steps before the crash: {before:?}");

    let out = coordinator(&args, dir.path(), DEADLINE);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("from step 4"), "{}", stderr(&out));
    let steps: Vec<u64> = metrics(&run)
        .iter()
        .filter_map(|m| m["step"].as_u64())
        .collect();
    let last = *steps.last().expect("metrics");
    assert!(last >= 12, "{steps:?}");

    let tb = run.join("tb");
    assert_eq!(
        event_files(&tb).len(),
        2,
        "one file per coordinator process"
    );
    let (passed, report) = check_tensorboard(
        &tb,
        &run.join("metrics.jsonl"),
        &[
            "--min-images",
            "3",
            "--hparam",
            "train.base_lr=0.02",
            "--hparam",
            "model.config.encoder.type=swin",
            "--hparam",
            "output.tensorboard=True",
        ],
    );
    assert!(passed, "{report}");

    // A damaged record: TensorBoard's reader stops there silently, and the check says which
    // steps went missing.
    let damaged = dir.path().join("damaged");
    std::fs::create_dir_all(&damaged).expect("dir");
    let files = event_files(&tb);
    for file in &files {
        let mut bytes = std::fs::read(file).expect("event file");
        if file == files.last().expect("a file") {
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x40;
        }
        std::fs::write(damaged.join(file.file_name().expect("name")), bytes).expect("copy");
    }
    let (passed, report) = check_tensorboard(&damaged, &run.join("metrics.jsonl"), &[]);
    assert!(!passed, "a damaged file passed:\n{report}");
    assert!(report.contains("steps missing"), "{report}");

    // The coordinator names the damage when it opens the run again.
    std::fs::remove_dir_all(&tb).expect("rm tb");
    std::fs::rename(&damaged, &tb).expect("swap in the damaged files");
    let out = coordinator(&args, dir.path(), DEADLINE);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("checksum does not match") || stderr(&out).contains("is cut short"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn tensorboard_files_roll_on_object_storage() {
    let s3 = S3Server::start("tb-bucket");
    let env = s3.env();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 2, 24);
    let root = "s3://tb-bucket/runs";
    let text = tiny_config(Path::new(root), "tb", &data, 2, 4);
    let config = write(dir.path(), "tb", &text);
    let out = coordinator_with_env(
        &["start", "--config", config.to_str().expect("utf8")],
        dir.path(),
        DEADLINE,
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // Download the run's tb/ objects and metrics.jsonl to read them locally.
    let local = dir.path().join("download");
    std::fs::create_dir_all(local.join("tb")).expect("dir");
    for (key, value) in &env {
        // Only this test reads the AWS_* variables in this process.
        std::env::set_var(key, value);
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let keys = runtime.block_on(async {
        let store = simmim_proto::store::RunStore::open("s3://tb-bucket/runs/tb").expect("store");
        let keys = store.list("tb").await.expect("list tb/");
        for key in &keys {
            let bytes = store.get(key).await.expect("get");
            std::fs::write(local.join(key), &bytes).expect("write");
        }
        let metrics = store.get("metrics.jsonl").await.expect("metrics.jsonl");
        std::fs::write(local.join("metrics.jsonl"), &metrics).expect("write");
        keys
    });
    // One file per commit (steps 4, 8, 12) and the last one: rolled, never rewritten.
    assert!(keys.len() >= 3, "{keys:?}");
    let (passed, report) = check_tensorboard(
        &local.join("tb"),
        &local.join("metrics.jsonl"),
        &["--min-images", "2"],
    );
    assert!(passed, "{report}");
}

/// Parses text format 0.0.4 samples without labels: `name value`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

fn scrape(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    (head.starts_with("HTTP/1.1 200") && head.contains("version=0.0.4")).then(|| body.to_string())
}

#[test]
fn prometheus_endpoint_passes_promtool_and_moves_and_status_watch_follows_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic_image_folder(dir.path(), 2, 20);
    let text = tiny_config_with(
        dir.path().join("runs").as_path(),
        "prom",
        &data,
        300,
        10,
        8,
        "  min: 2\n  max: 2\n",
    );
    let config = write(dir.path(), "prom", &text);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let listen = format!("127.0.0.1:{port}");
    let log = dir.path().join("coordinator.log");
    let mut child = spawn_coordinator_with_env(
        &[
            "start",
            "--config",
            config.to_str().expect("utf8"),
            "--metrics-listen",
            &listen,
        ],
        dir.path(),
        &[],
        &log,
    );
    let run = dir.path().join("runs/prom");
    let watch = Command::new(binary("coordinator"))
        .args(["status", "--watch", "--every", "0.5", "--run"])
        .arg(&run)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("status --watch");

    let mut first = None;
    let started = wait_until(DEADLINE, || {
        first = scrape(port).filter(|t| sample(t, "simmim_step").is_some_and(|s| s >= 5.0));
        first.is_some()
    });
    assert!(started, "no scrape with training under way");
    let first = first.expect("scrape");
    let mut second = None;
    let moved = wait_until(DEADLINE, || {
        second = scrape(port).filter(|t| {
            sample(t, "simmim_step").unwrap_or(0.0)
                >= sample(&first, "simmim_step").unwrap_or(0.0) + 20.0
                && sample(t, "simmim_checkpoint_commits_total").unwrap_or(0.0) >= 1.0
        });
        second.is_some()
    });
    assert!(moved, "the step did not move by 20 between scrapes");
    let second = second.expect("a second scrape");

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/test.sh installs Debian's prometheus)");
    {
        use std::io::Write;
        let mut stdin = promtool.stdin.take().expect("stdin");
        stdin.write_all(second.as_bytes()).expect("write");
    }
    let checked = promtool.wait_with_output().expect("promtool");
    assert!(
        checked.status.success(),
        "promtool: {}{}\n{second}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    for name in [
        "simmim_loss",
        "simmim_learning_rate",
        "simmim_images_per_second",
        "simmim_data_wait_share",
        "simmim_allreduce_seconds",
        "simmim_generation",
        "simmim_workers_present",
        "simmim_workers_waiting",
        "simmim_restarts_total",
        "simmim_checkpoint_commits_total",
        "simmim_checkpoint_commit_failures_total",
        "simmim_checkpoint_committed_step",
        "simmim_storage_retries_total",
    ] {
        assert!(sample(&second, name).is_some(), "{name} missing:\n{second}");
    }
    assert_eq!(sample(&second, "simmim_workers_present"), Some(2.0));
    assert!(sample(&second, "simmim_images_per_second").unwrap_or(0.0) > 0.0);
    assert!(
        sample(&second, "simmim_checkpoint_commits_total").unwrap_or(0.0) >= 1.0,
        "{second}"
    );
    assert!(sample(&second, "simmim_checkpoint_committed_step").unwrap_or(-1.0) >= 10.0);
    for rank in ["0", "1"] {
        for family in [
            "simmim_rank_step_seconds",
            "simmim_rank_heartbeat_age_seconds",
        ] {
            assert!(
                second.contains(&format!("{family}{{rank=\"{rank}\"")),
                "{family} for rank {rank}:\n{second}"
            );
        }
    }
    assert!(second.contains("simmim_refused_requests_total{reason=\"token\"}"));

    let ended = wait_until(DEADLINE, || matches!(child.try_wait(), Ok(Some(_))));
    kill_group(&mut child);
    assert!(ended, "the run did not end");
    let watched = wait_with_deadline(watch, Duration::from_secs(60));
    let screen = String::from_utf8_lossy(&watched.stdout).into_owned();
    assert!(
        watched.status.success(),
        "status --watch: {screen}{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    assert!(screen.contains("prom: finished"), "{screen}");
    assert!(screen.contains("ETA"), "{screen}");
    assert!(
        screen
            .lines()
            .any(|l| l.trim_start().starts_with("1  local-")),
        "a line per rank:\n{screen}"
    );
}
