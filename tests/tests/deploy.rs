//! deploy/ checked offline: every kustomize overlay renders (`kubectl kustomize`), validates
//! against the Kubernetes schemas (`kubernetes-validate --strict`), and keeps the invariants
//! a schema cannot see; the Dockerfile builds and ships the binaries the workspace defines.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;
use simmim_proto::RunConfig;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

const OVERLAYS: &[&str] = &["cpu", "gpu"];
/// The Kubernetes version the manifests target (Indexed Jobs with backoffLimitPerIndex and
/// podFailurePolicy are GA there).
const KUBERNETES_VERSION: &str = "1.33.0";

fn render(overlay: &str) -> (String, Vec<Value>) {
    let dir = root().join("deploy/k8s/overlays").join(overlay);
    let out = Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("kubectl is needed to render deploy/k8s (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf8");
    let docs = serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("rendered YAML parses"))
        .collect();
    (text, docs)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered overlay"))
}

fn container<'a>(job: &'a Value, name: &str) -> &'a Value {
    job["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn overlays_render_and_validate_against_the_kubernetes_schemas() {
    let validator = std::env::var("KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join(".venv-tools/bin/kubernetes-validate"));
    let dir = tempfile::tempdir().expect("tempdir");
    for overlay in OVERLAYS {
        let (text, _) = render(overlay);
        let file = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, text).expect("write");
        let out = Command::new(&validator)
            .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
            .arg(&file)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (scripts/test.sh installs kubernetes-validate)",
                    validator.display()
                )
            });
        assert!(
            out.status.success(),
            "overlay {overlay} does not validate:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn overlays_keep_the_invariants_a_schema_cannot_check() {
    for overlay in OVERLAYS {
        let (text, docs) = render(overlay);
        let config_map = find(&docs, "ConfigMap", "simmim-run-config");
        let run_yaml = config_map["data"]["run.yaml"]
            .as_str()
            .expect("run.yaml in the config map");
        let config = RunConfig::from_yaml(run_yaml, &format!("overlay {overlay} run.yaml"))
            .unwrap_or_else(|e| panic!("{e}"));

        let workers = find(&docs, "Job", "simmim-workers");
        let spec = &workers["spec"];
        assert_eq!(spec["completionMode"], "Indexed", "{overlay}");
        assert_eq!(
            spec["template"]["spec"]["restartPolicy"], "Never",
            "{overlay}"
        );
        let world = config.workers.max as u64;
        assert_eq!(
            spec["parallelism"].as_u64(),
            Some(world),
            "{overlay}: parallelism = workers.max"
        );
        assert_eq!(
            spec["completions"].as_u64(),
            Some(world),
            "{overlay}: completions = workers.max"
        );
        assert!(spec["backoffLimitPerIndex"].as_u64().is_some(), "{overlay}");
        let rules = spec["podFailurePolicy"]["rules"]
            .as_sequence()
            .expect("podFailurePolicy");
        assert!(
            rules.iter().any(|r| r["action"] == "FailJob"
                && r["onExitCodes"]["values"]
                    .as_sequence()
                    .is_some_and(|v| v.contains(&Value::from(2)))),
            "{overlay}: exit code 2 (do not retry) fails the Job"
        );
        assert!(
            rules.iter().any(|r| r["action"] == "Ignore"
                && r["onPodConditions"][0]["type"] == "DisruptionTarget"),
            "{overlay}: preemption does not count as a failure"
        );
        let headless = find(&docs, "Service", "simmim-workers");
        assert_eq!(headless["spec"]["clusterIP"], "None");
        assert_eq!(
            spec["template"]["spec"]["subdomain"],
            headless["metadata"]["name"]
        );

        let worker = container(workers, "worker");
        let env = worker["env"].as_sequence().expect("env");
        let var = |name: &str| {
            env.iter()
                .find(|e| e["name"] == name)
                .cloned()
                .unwrap_or(Value::Null)
        };
        let coordinator_url = var("SIMMIM_COORDINATOR")["value"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let service = find(&docs, "Service", "simmim-coordinator");
        let port = service["spec"]["ports"][0]["port"].as_u64().expect("port");
        assert_eq!(
            coordinator_url,
            format!("http://simmim-coordinator:{port}"),
            "{overlay}"
        );
        assert_eq!(
            var("SIMMIM_DEVICE")["value"].as_str(),
            Some(config.workers.device.as_str()),
            "{overlay}: device"
        );
        let coordinator = container(find(&docs, "Job", "simmim-coordinator"), "coordinator");
        let args: Vec<&str> = coordinator["args"]
            .as_sequence()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            args.contains(&format!("0.0.0.0:{port}").as_str()),
            "{overlay}: --listen matches the Service port"
        );
        // Prometheus: the port the coordinator serves /metrics on is the container's and the
        // Service's `metrics` port, and the scrape annotations name it.
        let metrics_port = coordinator["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == "metrics")
            .and_then(|p| p["containerPort"].as_u64())
            .expect("a `metrics` container port");
        let listen_at = args.iter().position(|a| *a == "--metrics-listen");
        assert_eq!(
            listen_at.and_then(|i| args.get(i + 1)).copied(),
            Some(format!("0.0.0.0:{metrics_port}").as_str()),
            "{overlay}: --metrics-listen matches the metrics port"
        );
        let template = &find(&docs, "Job", "simmim-coordinator")["spec"]["template"];
        let annotations = &template["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(
            annotations["prometheus.io/port"].as_str(),
            Some(metrics_port.to_string().as_str())
        );
        assert!(service["spec"]["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|p| p["name"] == "metrics" && p["targetPort"] == "metrics"));
        assert_eq!(
            find(&docs, "Job", "simmim-coordinator")["spec"]["template"]["spec"]["restartPolicy"],
            "OnFailure"
        );
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(
                coordinator[probe]["grpc"]["port"].as_u64(),
                Some(port),
                "{overlay}: {probe}"
            );
        }

        // Secrets: referenced, never inlined.
        assert!(
            docs.iter().all(|d| d["kind"] != "Secret"),
            "{overlay}: no Secret objects in the manifests"
        );
        for c in [worker, coordinator] {
            assert!(
                c["envFrom"][0]["secretRef"]["name"].as_str().is_some(),
                "{overlay}: S3 credentials by reference"
            );
            for e in c["env"].as_sequence().into_iter().flatten() {
                let name = e["name"].as_str().unwrap_or_default();
                assert!(
                    !(name.contains("SECRET") || name.contains("KEY") || name == "SIMMIM_TOKEN")
                        || e["value"].is_null(),
                    "{overlay}: {name} carries a literal value"
                );
            }
        }
        assert!(
            !text.contains("AWS_SECRET_ACCESS_KEY:"),
            "{overlay}: a credential is inlined"
        );

        let gpus = &worker["resources"]["limits"]["nvidia.com/gpu"];
        if *overlay == "gpu" {
            assert_eq!(gpus.as_u64(), Some(1), "gpu: one GPU per worker pod");
            assert_eq!(config.workers.device, "cuda");
        } else {
            assert!(gpus.is_null(), "cpu: no GPU requests");
        }
    }
}

#[test]
fn the_gpu_overlay_runs_the_shipped_official_config() {
    let overlay =
        std::fs::read_to_string(root().join("deploy/k8s/overlays/gpu/run.yaml")).expect("overlay");
    let shipped = std::fs::read_to_string(root().join("deploy/configs/swin_base_192_100ep.yaml"))
        .expect("config");
    assert_eq!(
        overlay, shipped,
        "deploy/k8s/overlays/gpu/run.yaml drifted from deploy/configs"
    );
}

#[test]
fn the_dockerfile_builds_and_ships_the_workspace_binaries() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).expect("Dockerfile");
    for (package, bin) in [("coordinator", "coordinator"), ("worker", "worker")] {
        let manifest =
            std::fs::read_to_string(root().join(package).join("Cargo.toml")).expect("Cargo.toml");
        assert!(
            manifest.contains(&format!("name = \"{bin}\"")),
            "{package} defines bin {bin}"
        );
        assert!(manifest.contains(&format!("name = \"simmim-{package}\"")));
        assert!(
            dockerfile.contains(&format!("-p simmim-{package}")),
            "the build compiles simmim-{package}"
        );
        assert!(
            dockerfile.contains(&format!("target/release/{bin}")),
            "the build copies {bin}"
        );
    }
    let worker =
        std::fs::read_to_string(root().join("worker/Cargo.toml")).expect("worker Cargo.toml");
    assert!(worker.contains("cuda = ["), "the worker has a cuda feature");
    assert!(
        dockerfile.contains("--features simmim-worker/cuda"),
        "the GPU image builds with it"
    );
    assert!(
        dockerfile.contains("libnccl.so"),
        "the unversioned NCCL name cudarc loads"
    );
    assert!(
        dockerfile.contains("nvrtc"),
        "NVRTC for burn-cuda's run-time kernels"
    );
    assert!(
        dockerfile.contains("CUDA_PATH="),
        "headers where NVRTC looks"
    );
    assert!(dockerfile.contains("USER 10001"), "non-root");
    let toolchain = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .and_then(|t| t.split('-').next())
        .expect("a rust build stage");
    let workspace = std::fs::read_to_string(root().join("Cargo.toml")).expect("workspace");
    let minimum = workspace
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_string())
        .expect("rust-version");
    let parse = |v: &str| {
        v.split('.')
            .map(|p| p.parse::<u32>().unwrap_or(0))
            .collect::<Vec<_>>()
    };
    assert!(
        parse(toolchain) >= parse(&minimum),
        "rust:{toolchain} is older than rust-version {minimum}"
    );
    // Both manifests run the user the image creates.
    for file in ["coordinator.yaml", "workers.yaml"] {
        let text =
            std::fs::read_to_string(root().join("deploy/k8s/base").join(file)).expect("manifest");
        assert!(text.contains("runAsUser: 10001"), "{file}");
    }
}
