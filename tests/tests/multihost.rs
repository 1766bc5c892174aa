//! The cluster lifecycle across hosts: the coordinator and two workers on three test hosts
//! (network namespaces on one bridge, 198.18.0.0/15), the run root on S3 (moto on the
//! coordinator's host), run token and TLS on. Scenarios: a worker's link cut and healed, a
//! worker SIGKILLed and started again, the coordinator SIGKILLed and started again, SIGTERM to
//! everything. Each ends with the run finished, each sample used at most once per epoch in
//! the final history, every rank ending with the same weights, and no process exiting on a
//! refusal. Recovery times are printed (`RECOVERY ...`). Needs root.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use simmim_tests::netns::TestNet;
use simmim_tests::*;

const DEADLINE: Duration = Duration::from_secs(240);
const TOKEN: &str = "multi-host-test-token";
/// One scenario at a time: each runs three hosts' worth of processes on two cores.
static SERIAL: Mutex<()> = Mutex::new(());

struct Cluster {
    net: TestNet,
    dir: tempfile::TempDir,
    s3: S3Server,
    config: PathBuf,
    ca: PathBuf,
    url: String,
    coordinator: Option<Child>,
    workers: [Option<Child>; 2],
    starts: usize,
}

impl Cluster {
    fn new(name: &str) -> Self {
        let net = TestNet::new(3);
        let dir = tempfile::tempdir().expect("tempdir");
        let head = net.address(0);
        let s3 = S3Server::start_with("runs", &head, 9000, |moto| net.command(0, moto));
        let (cert, key, ca) = make_certificate(dir.path(), &format!("IP:{head}"));
        // 60 usable samples, 120 epochs: about 900 steps with two workers, enough for every
        // scenario's disruption and recovery to happen mid-run (more only made it longer).
        let data = synthetic_image_folder(dir.path(), 3, 20);
        let workers = "  min: 1\n  max: 2\n  last_call_s: 2\n  max_restarts: 10\n";
        let text = tiny_config_with(Path::new("s3://runs/r"), name, &data, 120, 40, 4, workers)
            .replace("heartbeat_timeout_s: 10", "heartbeat_timeout_s: 4")
            .replace("recon_images: 4", "recon_images: 4\n  log_samples: true")
            + &format!(
                "tls:\n  cert: {}\n  key: {}\n",
                cert.display(),
                key.display()
            );
        let config = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&config, text).expect("config");
        Self {
            url: format!("s3://runs/r/{name}"),
            net,
            dir,
            s3,
            config,
            ca,
            coordinator: None,
            workers: [None, None],
            starts: 0,
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        let mut env = self.s3.env();
        env.push(("SIMMIM_TOKEN".into(), TOKEN.into()));
        env.push(("SIMMIM_TLS_CA".into(), self.ca.display().to_string()));
        env.push(("RUST_LOG".into(), "info".into()));
        env
    }

    fn log(&mut self, what: &str) -> std::fs::File {
        self.starts += 1;
        let path = self.dir.path().join(format!("{what}.{}.log", self.starts));
        std::fs::File::create(path).expect("log file")
    }

    fn logs(&self, what: &str) -> String {
        let mut text = String::new();
        for n in 1..=self.starts {
            let path = self.dir.path().join(format!("{what}.{n}.log"));
            text += &std::fs::read_to_string(path).unwrap_or_default();
        }
        text
    }

    fn start_coordinator(&mut self) {
        let log = self.log("coordinator");
        let listen = format!("{}:50051", self.net.address(0));
        let child = self
            .net
            .command(0, &binary("coordinator"))
            .args([
                "start",
                "--local-workers",
                "0",
                "--listen",
                &listen,
                "--config",
            ])
            .arg(&self.config)
            .envs(self.env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("coordinator");
        self.coordinator = Some(child);
    }

    fn start_worker(&mut self, i: usize) {
        let log = self.log(&format!("worker{i}"));
        let coordinator = format!("https://{}:50051", self.net.address(0));
        let child = self
            .net
            .command(i + 1, &binary("worker"))
            .args(["--coordinator", &coordinator])
            .envs(self.env())
            .env("SIMMIM_ADVERTISE_HOST", self.net.address(i + 1))
            .env("SIMMIM_WORKER_ID", format!("w{i}"))
            .env("SIMMIM_CONNECT_PATIENCE_S", "120")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("worker");
        self.workers[i] = Some(child);
    }

    fn start_all(&mut self) {
        self.start_coordinator();
        self.start_worker(0);
        self.start_worker(1);
    }

    /// The live status, seen from outside the test hosts (over the bridge).
    fn status(&self) -> Option<serde_json::Value> {
        let out = std::process::Command::new(binary("coordinator"))
            .args(["status", "--json", "--run", &self.url])
            .envs(self.env())
            .output()
            .ok()?;
        let value: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let live = value["live"].clone();
        (!live.is_null()).then_some(live)
    }

    /// Waits until `world` workers train past `past` steps; returns when that happened.
    fn wait_training(&self, world: u64, past: u64) -> Instant {
        let reached = wait_until(DEADLINE, || {
            self.status().is_some_and(|s| {
                s["world_size"] == world
                    && s["state"] == "running"
                    && s["workers"]
                        .as_array()
                        .is_some_and(|w| w.len() as u64 == world)
                    && s["step"].as_u64().unwrap_or(0) > past
            })
        });
        assert!(
            reached,
            "not training with {world} workers past step {past}; coordinator log:\n{}",
            tail(&self.logs("coordinator"), 30)
        );
        Instant::now()
    }

    fn step(&self) -> u64 {
        self.status().and_then(|s| s["step"].as_u64()).unwrap_or(0)
    }

    fn signal(&self, child: &Option<Child>, signal: &str) {
        let pid = child.as_ref().expect("running").id();
        let _ = std::process::Command::new("kill")
            .args(["-s", signal, &pid.to_string()])
            .status();
    }

    fn wait_exit(child: &mut Option<Child>) -> Option<i32> {
        let c = child.as_mut()?;
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                *child = None;
                return status.code();
            }
            if started.elapsed() > DEADLINE {
                let _ = c.kill();
                panic!("a process did not exit within {DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the run to finish and checks what every scenario must end with.
    fn finish(&mut self) {
        let code = Self::wait_exit(&mut self.coordinator);
        let log = self.logs("coordinator");
        assert_eq!(code, Some(0), "coordinator:\n{}", tail(&log, 40));
        assert!(log.contains("finished at step"), "{}", tail(&log, 20));
        for i in 0..2 {
            let code = Self::wait_exit(&mut self.workers[i]);
            let log = self.logs(&format!("worker{i}"));
            assert_eq!(code, Some(0), "worker {i}:\n{}", tail(&log, 30));
        }
        // Nobody exited on a refusal.
        for what in ["worker0", "worker1"] {
            let log = self.logs(what);
            assert!(
                !log.contains("refused registration") && !log.contains("worker: error:"),
                "{what}:\n{}",
                tail(&log, 30)
            );
        }
        let (samples, metrics) = self.download(&["samples.jsonl", "metrics.jsonl"]);
        let lines: Vec<serde_json::Value> = samples
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        let per_epoch = assert_each_sample_at_most_once_per_epoch(&lines);
        assert!(per_epoch.len() >= 100, "{} epochs logged", per_epoch.len());
        let last_step = metrics
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|m| m["step"].as_u64())
            .max()
            .expect("metrics");
        // Every rank of the last generation ends with the same weights.
        let digests: Vec<String> = ["worker0", "worker1"]
            .iter()
            .map(|w| {
                let log = self.logs(w);
                log.lines()
                    .rev()
                    .find(|l| {
                        l.contains("final weights digest")
                            && l.contains(&format!("step={last_step}"))
                    })
                    .and_then(|l| l.split("final weights digest ").nth(1))
                    .map(|d| d.split_whitespace().next().unwrap_or_default().to_string())
                    .unwrap_or_else(|| panic!("{w} logged no final weights at step {last_step}"))
            })
            .collect();
        assert_eq!(digests[0], digests[1], "ranks ended with different weights");
    }

    fn download(&self, keys: &[&str; 2]) -> (String, String) {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        for (k, v) in self.s3.env() {
            std::env::set_var(k, v);
        }
        runtime.block_on(async {
            let store = simmim_proto::store::RunStore::open(&self.url).expect("store");
            let mut texts = Vec::new();
            for key in keys {
                let bytes = store.get(key).await.expect(key);
                texts.push(String::from_utf8_lossy(&bytes).into_owned());
            }
            (texts[0].clone(), texts[1].clone())
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self
            .workers
            .iter_mut()
            .chain([&mut self.coordinator])
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn report(scenario: &str, what: &str, since: Instant, at: Instant) {
    eprintln!(
        "RECOVERY {scenario}: {what}: {:.1} s",
        at.duration_since(since).as_secs_f64()
    );
}

#[test]
fn a_partitioned_worker_comes_back_when_its_link_heals() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = Cluster::new("partition");
    c.start_all();
    c.wait_training(2, 60);
    c.net.cut(2);
    let cut = Instant::now();
    let alone = c.wait_training(1, c.step());
    report(
        "partition",
        "cut to training again with 1 worker",
        cut,
        alone,
    );
    std::thread::sleep(Duration::from_secs(3));
    c.net.heal(2);
    let healed = Instant::now();
    let back = c.wait_training(2, c.step());
    report(
        "partition",
        "heal to training again with 2 workers",
        healed,
        back,
    );
    c.finish();
}

#[test]
fn a_killed_worker_started_again_is_admitted() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = Cluster::new("killed");
    c.start_all();
    c.wait_training(2, 60);
    c.signal(&c.workers[1], "KILL");
    let killed = Instant::now();
    let _ = Cluster::wait_exit(&mut c.workers[1]);
    let alone = c.wait_training(1, c.step());
    report(
        "worker SIGKILL",
        "kill to training again with 1 worker",
        killed,
        alone,
    );
    c.start_worker(1);
    let restarted = Instant::now();
    let back = c.wait_training(2, c.step());
    report(
        "worker SIGKILL",
        "restart to training again with 2 workers",
        restarted,
        back,
    );
    c.finish();
}

#[test]
fn a_killed_coordinator_started_again_resumes_the_run() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = Cluster::new("coordinator");
    c.start_all();
    c.wait_training(2, 100);
    let before = c.step();
    c.signal(&c.coordinator, "KILL");
    let killed = Instant::now();
    let _ = Cluster::wait_exit(&mut c.coordinator);
    c.start_coordinator();
    let back = c.wait_training(2, 0);
    report(
        "coordinator SIGKILL",
        "kill and restart to training again",
        killed,
        back,
    );
    let log = c.logs("coordinator");
    assert!(log.contains("resuming"), "{}", tail(&log, 20));
    assert!(c.step() > 0 && before > 0);
    c.finish();
}

#[test]
fn sigterm_to_everything_lands_a_final_checkpoint_and_the_run_resumes_from_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = Cluster::new("sigterm");
    c.start_all();
    c.wait_training(2, 60);
    let stopped = Instant::now();
    c.signal(&c.coordinator, "TERM");
    c.signal(&c.workers[0], "TERM");
    c.signal(&c.workers[1], "TERM");
    let coordinator = Cluster::wait_exit(&mut c.coordinator);
    assert_eq!(
        coordinator,
        Some(130),
        "{}",
        tail(&c.logs("coordinator"), 30)
    );
    for i in 0..2 {
        assert_eq!(Cluster::wait_exit(&mut c.workers[i]), Some(143));
    }
    report(
        "SIGTERM all",
        "signal to every process gone",
        stopped,
        Instant::now(),
    );
    let log = c.logs("worker0");
    let step: u64 = log
        .split("after the checkpoint of step ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no final checkpoint:\n{}", tail(&log, 20)));
    let latest = latest_step(&c.url, &c.env()).expect("a committed checkpoint");
    assert_eq!(latest, step, "the final checkpoint is the stop step");
    let restarted = Instant::now();
    c.start_all();
    let back = c.wait_training(2, step);
    report("SIGTERM all", "restart to training again", restarted, back);
    let log = c.logs("coordinator");
    assert!(
        log.contains(&format!("from step {step}")),
        "{}",
        tail(&log, 20)
    );
    c.finish();
}
