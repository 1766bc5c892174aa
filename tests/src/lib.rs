//! Helpers for whole-system tests: a small synthetic ImageFolder (with one corrupt file), a
//! tiny run config, and the real `coordinator` / `worker` binaries run with a deadline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod netns;

use image::{ImageEncoder, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `target/<profile>/<name>`, next to the test executable's `deps/` folder.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile> folder");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (cargo build --release)",
        path.display()
    );
    path
}

/// An ImageFolder of `per_class` synthetic images in each of `classes` classes (PNG and
/// JPEG, odd sizes, one grayscale), plus `corrupt.jpg` in the first class.
pub fn synthetic_image_folder(root: &Path, classes: usize, per_class: usize) -> PathBuf {
    let dir = root.join("images");
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    for c in 0..classes {
        let class_dir = dir.join(format!("class_{c}"));
        std::fs::create_dir_all(&class_dir).expect("class dir");
        for i in 0..per_class {
            let (w, h) = (rng.random_range(24..48u32), rng.random_range(24..48u32));
            let base = [
                rng.random_range(0..255u8),
                rng.random_range(0..255u8),
                (c * 80) as u8,
            ];
            let image = RgbImage::from_fn(w, h, |x, y| {
                Rgb([
                    base[0].wrapping_add((x * 4) as u8),
                    base[1].wrapping_add((y * 4) as u8),
                    base[2],
                ])
            });
            let mut bytes = Vec::new();
            let name = if i % 3 == 0 {
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
                    .write_image(&image, w, h, image::ExtendedColorType::Rgb8)
                    .expect("jpeg");
                format!("img_{i:03}.jpg")
            } else if i % 7 == 1 {
                let gray = image::DynamicImage::ImageRgb8(image).to_luma8();
                image::codecs::png::PngEncoder::new(&mut bytes)
                    .write_image(&gray, w, h, image::ExtendedColorType::L8)
                    .expect("png");
                format!("img_{i:03}.png")
            } else {
                image::codecs::png::PngEncoder::new(&mut bytes)
                    .write_image(&image, w, h, image::ExtendedColorType::Rgb8)
                    .expect("png");
                format!("img_{i:03}.png")
            };
            std::fs::write(class_dir.join(name), bytes).expect("write image");
        }
    }
    std::fs::write(
        dir.join("class_0").join("corrupt.jpg"),
        b"\xff\xd8\xff\xe0 this is not a JPEG",
    )
    .expect("corrupt file");
    dir
}

/// A run config for a tiny Swin: `steps_per_epoch` steps of batch 8 on `data`.
pub fn tiny_config(
    root: &Path,
    name: &str,
    data: &Path,
    epochs: u32,
    checkpoint_every: u64,
) -> String {
    tiny_config_with(root, name, data, epochs, checkpoint_every, 8, "")
}

/// [`tiny_config`] with another micro-batch and extra `workers:` lines (indented by 2).
pub fn tiny_config_with(
    root: &Path,
    name: &str,
    data: &Path,
    epochs: u32,
    checkpoint_every: u64,
    micro_batch: usize,
    workers: &str,
) -> String {
    format!(
        r#"run:
  name: {name}
  root: {root}
  seed: 3
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
  loader_threads: 2
train:
  epochs: {epochs}
  warmup_epochs: 0.5
  micro_batch: {micro_batch}
  base_lr: 0.02
  warmup_lr: 0.0001
  min_lr: 0.0001
checkpoint:
  every_steps: {checkpoint_every}
  every_minutes: null
output:
  recon_every_steps: 4
  recon_images: 4
workers:
  heartbeat_timeout_s: 10
{workers}"#,
        root = root.display(),
        data = data.display()
    )
}

/// The coordinator with `args`, run in `cwd` with the worker binary beside it and `env`;
/// stdin closed, stdout discarded, logs at `info`.
fn coordinator_command(args: &[&str], cwd: &Path, env: &[(String, String)]) -> Command {
    let mut command = Command::new(binary("coordinator"));
    command
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .env("SIMMIM_WORKER_BIN", binary("worker"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    command
}

/// Runs the coordinator to completion (or kills it at `deadline`).
pub fn coordinator(args: &[&str], cwd: &Path, deadline: Duration) -> Output {
    coordinator_with_env(args, cwd, deadline, &[])
}

/// Like [`coordinator`], with extra environment.
pub fn coordinator_with_env(
    args: &[&str],
    cwd: &Path,
    deadline: Duration,
    env: &[(String, String)],
) -> Output {
    let child = coordinator_command(args, cwd, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start coordinator");
    wait_with_deadline(child, deadline)
}

/// `coordinator start --config CONFIG` in the background, its stderr kept for
/// [`wait_with_deadline`].
pub fn start_in_background(config: &Path, cwd: &Path) -> Child {
    let config = config.to_str().expect("utf8 path");
    coordinator_command(&["start", "--config", config], cwd, &[])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start coordinator")
}

/// Starts the coordinator in its own process group, so a test can kill it with its workers.
pub fn spawn_coordinator(args: &[&str], cwd: &Path) -> Child {
    use std::os::unix::process::CommandExt;
    coordinator_command(args, cwd, &[])
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start coordinator")
}

/// [`spawn_coordinator`] with extra environment, stderr to `log`.
pub fn spawn_coordinator_with_env(
    args: &[&str],
    cwd: &Path,
    env: &[(String, String)],
    log: &Path,
) -> Child {
    use std::os::unix::process::CommandExt;
    let file = std::fs::File::create(log).expect("log file");
    coordinator_command(args, cwd, env)
        .stderr(Stdio::from(file))
        .process_group(0)
        .spawn()
        .expect("start coordinator")
}

/// SIGKILL to a whole process group (coordinator and its local workers).
pub fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{}", child.id())])
        .status();
    let _ = child.wait();
}

pub fn wait_with_deadline(mut child: Child, deadline: Duration) -> Output {
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().expect("output"),
            Ok(None) if started.elapsed() > deadline => {
                let _ = child.kill();
                let output = child.wait_with_output().expect("output");
                panic!(
                    "process ran past {deadline:?}; stderr:\n{}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Polls `condition` every 50 ms until it holds or `deadline` passes.
pub fn wait_until(deadline: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

pub fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line is JSON"))
        .collect()
}

/// The model weights of the checkpoint at `step`.
pub fn checkpoint_file(run_dir: &Path, step: u64, file: &str) -> Vec<u8> {
    let path = run_dir.join(format!("checkpoints/{step:010}/{file}"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// All float tensors of a safetensors file, by name.
pub fn tensors(bytes: &[u8]) -> std::collections::BTreeMap<String, Vec<f32>> {
    let file = safetensors::SafeTensors::deserialize(bytes).expect("safetensors");
    file.tensors()
        .into_iter()
        .filter(|(_, t)| t.dtype() == safetensors::Dtype::F32)
        .map(|(name, t)| {
            let values = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, values)
        })
        .collect()
}

/// `||a - b|| / ||a||` over every tensor of two weight files.
pub fn relative_difference(a: &[u8], b: &[u8]) -> f64 {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (name, x) in &a {
        for (p, q) in x.iter().zip(&b[name]) {
            diff += f64::from(p - q).powi(2);
            norm += f64::from(*p).powi(2);
        }
    }
    (diff / norm).sqrt()
}

/// The live status of a running run (`coordinator status --json`), if it answers.
pub fn live_status(run_dir: &Path) -> Option<serde_json::Value> {
    let out = Command::new(binary("coordinator"))
        .args(["status", "--json", "--run"])
        .arg(run_dir)
        .output()
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let live = value["live"].clone();
    (!live.is_null()).then_some(live)
}

/// The coordinator's address and (for a loopback run) token, from `coordinator.json`.
pub fn coordinator_info(run_dir: &Path) -> Option<(String, String)> {
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("coordinator.json")).ok()?).ok()?;
    Some((
        info["address"].as_str()?.to_string(),
        info["token"].as_str().unwrap_or_default().to_string(),
    ))
}

/// A real S3-compatible server (moto_server, installed by scripts/test.sh into
/// `.venv-tools`) on a free loopback port, with one bucket; stopped on drop.
pub struct S3Server {
    child: Child,
    pub host: String,
    pub port: u16,
    pub bucket: String,
}

impl S3Server {
    pub fn start(bucket: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        Self::start_with(bucket, "127.0.0.1", port, |moto| Command::new(moto))
    }

    /// moto_server on `host:port`, started by `launch(moto_server)` (e.g. in a test host).
    pub fn start_with(
        bucket: &str,
        host: &str,
        port: u16,
        launch: impl FnOnce(&Path) -> Command,
    ) -> Self {
        let moto = std::env::var("MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-tools/bin/moto_server")
            });
        let child = launch(&moto)
            .args(["-H", host, "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (scripts/test.sh installs moto[server])",
                    moto.display()
                )
            });
        let server = Self {
            child,
            host: host.to_string(),
            port,
            bucket: bucket.to_string(),
        };
        assert!(
            wait_until(Duration::from_secs(60), || server
                .request("PUT", &format!("/{bucket}"), b"")
                .is_some_and(|status| status == 200)),
            "moto_server did not start"
        );
        server
    }

    /// The environment the coordinator and workers need to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "testing".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            (
                "AWS_ENDPOINT_URL",
                format!("http://{}:{}", self.host, self.port),
            ),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            ("SIMMIM_STORE_TIMEOUT_S", "2".to_string()),
            ("SIMMIM_STORE_RETRY_S", "4".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// A plain HTTP request (moto does not check signatures); returns the status code.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> Option<u16> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect((self.host.as_str(), self.port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        // moto does not check signatures, but wants to see an AWS authorization header.
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}:{}\r\nContent-Length: {}\r\n\
             Content-Type: application/octet-stream\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00\r\n\
             Connection: close\r\n\r\n",
            self.host,
            self.port,
            body.len()
        );
        stream.write_all(head.as_bytes()).ok()?;
        stream.write_all(body).ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).ok()?;
        let text = String::from_utf8_lossy(&response);
        text.split_whitespace().nth(1)?.parse().ok()
    }

    /// Replaces an object's bytes behind the run's back.
    pub fn overwrite(&self, key: &str, body: &[u8]) {
        let status = self.request("PUT", &format!("/{}/{key}", self.bucket), body);
        assert_eq!(status, Some(200), "overwriting {key}");
    }

    /// Freezes the server (SIGSTOP) or lets it go on (SIGCONT): an outage that keeps its data.
    pub fn pause(&self, paused: bool) {
        let signal = if paused { "STOP" } else { "CONT" };
        let _ = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.pause(false);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The model weights of a run's newest (or `step`'s) checkpoint, through `worker export`.
pub fn exported_weights(
    run_url: &str,
    step: Option<u64>,
    env: &[(String, String)],
    dir: &Path,
) -> Vec<u8> {
    let out_path = dir.join(format!("export-{}.safetensors", step.unwrap_or(0)));
    let mut command = Command::new(binary("worker"));
    command
        .args([
            "export",
            "--format",
            "safetensors",
            "--checkpoint",
            run_url,
            "--out",
        ])
        .arg(&out_path)
        .envs(env.iter().map(|(k, v)| (k, v)));
    if let Some(step) = step {
        command.args(["--step", &step.to_string()]);
    }
    let out = command.output().expect("worker export");
    assert!(
        out.status.success(),
        "export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&out_path).expect("exported file")
}

/// The newest committed step of a run, through `coordinator status --json`.
pub fn latest_step(run_url: &str, env: &[(String, String)]) -> Option<u64> {
    let out = Command::new(binary("coordinator"))
        .args(["status", "--json", "--run", run_url])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    value["latest_checkpoint"]["step"].as_u64()
}

/// A CA and a certificate it signed for `alt_names` (`DNS:localhost,IP:127.0.0.1`), made with
/// openssl in `dir`: (certificate, key, CA) paths.
pub fn make_certificate(dir: &Path, alt_names: &str) -> (PathBuf, PathBuf, PathBuf) {
    let d = dir;
    let (cert, key, ca) = (d.join("cert.pem"), d.join("key.pem"), d.join("ca.pem"));
    std::fs::write(
        d.join("ext.cnf"),
        format!("subjectAltName={alt_names}\nbasicConstraints=CA:FALSE\n"),
    )
    .expect("ext");
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=coordinator",
            "-keyout",
            "key.pem",
            "-out",
            "leaf.csr",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
            "-out",
            "cert.pem",
        ],
    ];
    for args in steps {
        let made = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .expect("openssl");
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
    }
    (cert, key, ca)
}

/// Checks `samples.jsonl` lines: in the final history (a generation's steps replace those an
/// earlier one ran past its resume point), each epoch uses each sample at most once. Returns
/// the number of samples each epoch used.
pub fn assert_each_sample_at_most_once_per_epoch(lines: &[serde_json::Value]) -> Vec<usize> {
    use std::collections::{BTreeMap, HashSet};
    let field =
        |l: &serde_json::Value, k: &str| l[k].as_u64().unwrap_or_else(|| panic!("{k} in {l}"));
    let mut first_step: BTreeMap<u64, u64> = BTreeMap::new();
    for l in lines {
        let e = first_step
            .entry(field(l, "generation"))
            .or_insert(field(l, "step"));
        *e = (*e).min(field(l, "step"));
    }
    let kept = |g: u64, s: u64| first_step.range(g + 1..).all(|(_, &resumed)| s < resumed);
    let mut per_epoch: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for l in lines {
        if kept(field(l, "generation"), field(l, "step")) {
            let ids = l["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_u64().expect("id"));
            per_epoch.entry(field(l, "epoch")).or_default().extend(ids);
        }
    }
    for (epoch, ids) in &per_epoch {
        let unique: HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "epoch {epoch} used a sample twice");
    }
    per_epoch.values().map(Vec::len).collect()
}
