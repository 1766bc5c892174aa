//! The CPU image, run: `scripts/image.sh` builds it offline (a debootstrap base, this
//! workspace's release binaries), then a coordinator, two workers and an S3 server (moto, in a
//! container of the same base with the host's virtual environment mounted) train the demo
//! model on a private Docker network, run root on S3, token on. One worker container is
//! killed and started again, the other is disconnected from the network and reconnected. The
//! run must finish, every checkpoint on S3 must match its manifest with `latest` at the last
//! step, and `worker export` in a fresh container must read the final checkpoint.
//! Containers and the network are removed when the test ends, pass or fail.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use simmim_tests::{binary, latest_step, wait_until};

const TOKEN: &str = "container-test-token";
const BUCKET: &str = "runs";
const RUN: &str = "containers";
/// 4,096 CIFAR-10 images, 64 per step (2 workers x 32): 64 steps an epoch, 2 epochs.
const END_STEP: u64 = 128;

/// `docker` with `args`; its stdout, or a panic naming the command and its stderr.
fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("docker: {e} (the container tests need a Docker Engine)"));
    assert!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Everything this test starts, removed on drop whatever happened.
struct Cluster {
    prefix: String,
    network: String,
    containers: Vec<String>,
    dir: tempfile::TempDir,
    s3_port: u16,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for name in &self.containers {
            let _ = Command::new("docker")
                .args(["rm", "-f", "-v", name])
                .output();
        }
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
    }
}

impl Cluster {
    fn name(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    /// `docker run -d` of `image` as `role` on the network, with `extra` arguments before the
    /// image and `command` after it.
    fn run(&mut self, role: &str, extra: &[String], image: &str, command: &[&str]) {
        let name = self.name(role);
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            &self.network,
            "--network-alias",
            &name,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend_from_slice(extra);
        args.push(image.to_string());
        args.extend(command.iter().map(|s| s.to_string()));
        self.containers.push(name);
        docker(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// The S3 and token environment of the run's processes, as `-e` arguments.
    fn env_args(&self, extra: &[(&str, String)]) -> Vec<String> {
        let endpoint = format!("http://{}:5000", self.name("s3"));
        let mut env = vec![
            ("AWS_ACCESS_KEY_ID", "testing".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", endpoint),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            ("SIMMIM_TOKEN", TOKEN.to_string()),
            ("RUST_LOG", "info".to_string()),
        ];
        env.extend(extra.iter().cloned());
        env.into_iter()
            .flat_map(|(k, v)| ["-e".to_string(), format!("{k}={v}")])
            .collect()
    }

    /// The same S3 server seen from this host (its published port).
    fn host_env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "testing".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            (
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", self.s3_port),
            ),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn committed(&self) -> Option<u64> {
        latest_step(&format!("s3://{BUCKET}/{RUN}"), &self.host_env())
    }

    fn wait_for_step(&self, step: u64, within: Duration) {
        assert!(
            wait_until(within, || self.committed().is_some_and(|s| s >= step)),
            "no checkpoint at step {step} or later within {within:?}; coordinator log:\n{}",
            self.logs("coordinator")
        );
    }

    /// The last 40 lines of a container's log.
    fn logs(&self, role: &str) -> String {
        self.log_lines(role, "40")
    }

    fn log_lines(&self, role: &str, tail: &str) -> String {
        let out = Command::new("docker")
            .args(["logs", "--tail", tail, &self.name(role)])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default();
        out
    }
}

/// A plain HTTP request to moto on `port` (it checks no signatures but wants the header);
/// returns the status and the body.
fn s3_request(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// Every object under `prefix`, with its size (one ListObjectsV2 page is plenty here).
fn list(port: u16, prefix: &str) -> Vec<(String, u64)> {
    let (status, body) = s3_request(
        port,
        "GET",
        &format!("/{BUCKET}?list-type=2&max-keys=1000&prefix={prefix}"),
    )
    .expect("listing the bucket");
    assert_eq!(status, 200, "listing: {body}");
    let tag = |item: &str, name: &str| -> Option<String> {
        let start = item.find(&format!("<{name}>"))? + name.len() + 2;
        let end = item[start..].find(&format!("</{name}>"))? + start;
        Some(item[start..end].to_string())
    };
    body.split("<Contents>")
        .skip(1)
        .filter_map(|item| Some((tag(item, "Key")?, tag(item, "Size")?.parse().ok()?)))
        .collect()
}

fn get(port: u16, key: &str) -> String {
    let (status, body) =
        s3_request(port, "GET", &format!("/{BUCKET}/{key}")).expect("reading an object");
    assert_eq!(status, 200, "{key}: {body}");
    body
}

/// The run config: the demo model on 4,096 CIFAR-10 images, two workers (one may go).
fn config(path: &Path) {
    let yaml = format!(
        r#"run:
  name: {RUN}
  root: s3://{BUCKET}
  seed: 0
model:
  config:
    encoder:
      type: swin
      img_size: 32
      patch_size: 2
      embed_dim: 48
      depths: [2, 2, 2]
      num_heads: [3, 6, 12]
      window_size: 4
    mask_patch_size: 8
    mask_ratio: 0.6
data:
  train: /data/train
  limit: 4096
  loader_threads: 1
train:
  epochs: 2
  warmup_epochs: 0.25
  micro_batch: 32
  compute_threads: 1
  base_lr: 8.0e-3
  warmup_lr: 4.0e-5
  min_lr: 8.0e-5
checkpoint:
  every_steps: 8
  every_minutes: null
output:
  recon_every_steps: 64
  recon_images: 4
workers:
  min: 1
  max: 2
  heartbeat_timeout_s: 4
  last_call_s: 2
  rejoin_timeout_s: 120
  max_restarts: 20
"#
    );
    std::fs::write(path, yaml).expect("run config");
}

fn cifar_train() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/cifar10/train");
    assert!(
        dir.is_dir(),
        "{} is missing: scripts/setup.sh unpacks CIFAR-10",
        dir.display()
    );
    dir.canonicalize().expect("data path")
}

/// The Python installation and virtual environment that hold moto, to mount into a
/// container of the local base at the same paths.
fn python_mounts() -> Vec<String> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.venv-tools")
        .canonicalize()
        .expect(".venv-tools (scripts/test.sh installs moto[server] there)");
    let out = Command::new(venv.join("bin/python3"))
        .args(["-c", "import sys; print(sys.base_prefix)"])
        .output()
        .expect("the virtual environment's python");
    let prefix = String::from_utf8_lossy(&out.stdout).trim().to_string();
    vec![
        "-v".into(),
        format!("{prefix}:{prefix}:ro"),
        "-v".into(),
        format!("{}:{}:ro", venv.display(), venv.display()),
    ]
}

fn build_image() -> (String, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir = binary("worker")
        .parent()
        .expect("binary folder")
        .to_path_buf();
    let out = Command::new(root.join("scripts/image.sh"))
        .env("SIMMIM_BIN", &bin_dir)
        .output()
        .expect("scripts/image.sh");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "scripts/image.sh: {stderr}");
    let image = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let base = Command::new(root.join("scripts/base-image.sh"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .expect("scripts/base-image.sh");
    if let Some(line) = stderr.lines().find(|l| l.starts_with("image:")) {
        eprintln!("{line}");
    }
    (image, base)
}

#[test]
fn three_containers_train_through_a_kill_and_a_cut_link_on_s3() {
    if std::env::var_os("SIMMIM_SKIP_CONTAINERS").is_some() {
        eprintln!("SIMMIM_SKIP_CONTAINERS is set: not running the container test");
        return;
    }
    let started = Instant::now();
    let (image, base) = build_image();
    let prefix = format!("simmim-test-{}", std::process::id());
    let network = format!("{prefix}-net");
    docker(&["network", "create", &network]);
    let s3_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let mut cluster = Cluster {
        prefix,
        network,
        containers: Vec::new(),
        dir: tempfile::tempdir().expect("tmp"),
        s3_port,
    };
    let dir = cluster.dir.path().to_path_buf();

    // The S3 server, published on this host's loopback only.
    let mut s3_args = python_mounts();
    s3_args.extend(["-p".into(), format!("127.0.0.1:{s3_port}:5000")]);
    let moto = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.venv-tools/bin/moto_server")
        .canonicalize()
        .expect("moto_server");
    let moto = moto.display().to_string();
    cluster.run(
        "s3",
        &s3_args,
        &base,
        &[&moto, "-H", "0.0.0.0", "-p", "5000"],
    );
    assert!(
        wait_until(Duration::from_secs(60), || s3_request(
            s3_port,
            "PUT",
            &format!("/{BUCKET}")
        )
        .is_some_and(|(status, _)| status == 200)),
        "moto did not start: {}",
        cluster.logs("s3")
    );

    // The coordinator, then two workers; the data and the config mounted read-only.
    config(&dir.join("run.yaml"));
    let data = format!("{}:/data/train:ro", cifar_train().display());
    let mut coordinator_args = cluster.env_args(&[]);
    coordinator_args.extend([
        "-v".into(),
        data.clone(),
        "-v".into(),
        format!("{}:/config:ro", dir.display()),
    ]);
    let command = [
        "coordinator",
        "start",
        "--config",
        "/config/run.yaml",
        "--listen",
        "0.0.0.0:50051",
        "--local-workers",
        "0",
    ];
    cluster.run("coordinator", &coordinator_args, &image, &command);
    let coordinator_url = format!("http://{}:50051", cluster.name("coordinator"));
    for rank in ["w0", "w1"] {
        let mut args = cluster.env_args(&[
            ("SIMMIM_COORDINATOR", coordinator_url.clone()),
            ("SIMMIM_WORKER_ID", rank.to_string()),
            ("SIMMIM_ADVERTISE_HOST", cluster.name(rank)),
        ]);
        args.extend(["-v".into(), data.clone()]);
        cluster.run(rank, &args, &image, &["worker"]);
    }

    // A worker killed, then started again (as a pod is replaced).
    cluster.wait_for_step(8, Duration::from_secs(240));
    docker(&["kill", &cluster.name("w1")]);
    let killed_at = cluster.committed().unwrap_or(0);
    cluster.wait_for_step(killed_at + 8, Duration::from_secs(120));
    docker(&["start", &cluster.name("w1")]);

    // The other worker cut off the network, then back.
    let cut_from = cluster.committed().unwrap_or(0);
    cluster.wait_for_step(cut_from + 8, Duration::from_secs(120));
    docker(&[
        "network",
        "disconnect",
        &cluster.network,
        &cluster.name("w0"),
    ]);
    std::thread::sleep(Duration::from_secs(10));
    let alias = cluster.name("w0");
    docker(&[
        "network",
        "connect",
        "--alias",
        &alias,
        &cluster.network,
        &alias,
    ]);

    // The run finishes.
    let remaining = Duration::from_secs(540).saturating_sub(started.elapsed());
    let exit = Command::new("timeout")
        .args([
            &remaining.as_secs().max(60).to_string(),
            "docker",
            "wait",
            &cluster.name("coordinator"),
        ])
        .output()
        .expect("docker wait");
    let code = String::from_utf8_lossy(&exit.stdout).trim().to_string();
    assert_eq!(
        code,
        "0",
        "the coordinator did not finish cleanly; its log ends:\n{}\nw0:\n{}\nw1:\n{}",
        cluster.logs("coordinator"),
        cluster.logs("w0"),
        cluster.logs("w1")
    );
    // The kill ended a generation (a restart); the cut one made w0 leave and rejoin.
    let log = cluster.log_lines("coordinator", "all");
    let events: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("restart ") || l.contains("next one forms"))
        .collect();
    assert!(
        log.contains("restart 1/"),
        "the kill left no restart in the coordinator's log:\n{log}"
    );
    let cut = cluster.log_lines("w0", "all");
    assert!(
        cut.contains("rejoining"),
        "w0 never left its generation while cut off:\n{cut}"
    );
    for line in events {
        eprintln!("CONTAINERS coordinator: {}", line.trim());
    }

    // S3: `latest` at the last step, every checkpoint whole.
    assert_eq!(cluster.committed(), Some(END_STEP));
    let latest = get(s3_port, &format!("{RUN}/latest"));
    assert_eq!(
        latest.trim(),
        format!("checkpoints/{END_STEP:010}/MANIFEST.json")
    );
    let objects = list(s3_port, &format!("{RUN}/checkpoints/"));
    let manifests: Vec<&String> = objects
        .iter()
        .map(|(key, _)| key)
        .filter(|key| key.ends_with("/MANIFEST.json"))
        .collect();
    assert!(!manifests.is_empty(), "no manifests on S3");
    for key in manifests {
        let manifest: serde_json::Value =
            serde_json::from_str(&get(s3_port, key)).expect("manifest JSON");
        let dir = key.trim_end_matches("MANIFEST.json");
        for file in manifest["files"].as_array().expect("files") {
            let path = format!("{dir}{}", file["path"].as_str().expect("path"));
            let size = objects
                .iter()
                .find(|(k, _)| *k == path)
                .map(|(_, s)| *s)
                .unwrap_or_else(|| panic!("{path} is named by {key} but missing"));
            assert_eq!(Some(size), file["size"].as_u64(), "{path}");
        }
    }

    // `worker export` from a fresh container reads the final checkpoint.
    let out_dir = dir.join("export");
    std::fs::create_dir_all(&out_dir).expect("export dir");
    let _ = Command::new("chmod").arg("777").arg(&out_dir).status();
    let mut args: Vec<String> = ["run", "--rm", "--network", &cluster.network]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(cluster.env_args(&[]));
    args.extend([
        "-v".into(),
        format!("{}:/out", out_dir.display()),
        image.clone(),
        "worker".into(),
        "export".into(),
        "--checkpoint".into(),
        format!("s3://{BUCKET}/{RUN}"),
        "--out".into(),
        "/out/model.pth".into(),
    ]);
    let printed = docker(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        printed.contains(&format!("the model of step {END_STEP}")),
        "{printed}"
    );
    let exported = std::fs::metadata(out_dir.join("model.pth")).expect("model.pth");
    assert!(exported.len() > 1_000_000, "{} bytes", exported.len());
    eprintln!(
        "CONTAINERS: image {image}, run finished at step {END_STEP} in {:.0} s",
        started.elapsed().as_secs_f64()
    );
}
