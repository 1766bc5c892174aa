mod faults;
mod membership;
mod metrics;
mod prometheus;
mod retention;
mod service;
mod status;
mod supervisor;
mod tensorboard;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use simmim_proto::pb::coordinator_server::CoordinatorServer;
use simmim_proto::pb::ResumePoint;
use simmim_proto::run_config::DEMO_CONFIG;
use simmim_proto::store::{config_hash, run_url, RunStore};
use simmim_proto::{RunConfig, RunStatus};
use tokio::sync::mpsc;

use membership::Membership;
use metrics::MetricsSink;
use service::{Event, Service, Shared};
use supervisor::LocalWorkers;

/// Exit status for failures a restart cannot fix (config errors): the same as the worker's.
const EXIT_DO_NOT_RETRY: i32 = 2;

/// The simmim-rs coordinator: runs SimMIM pretraining with local and remote workers.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start (or resume) a run. Without --config: the embedded demo (small Swin, CIFAR-10, CPU).
    Start(StartArgs),
    /// Where a run stands: its newest checkpoint, last metrics and, if it is running, its workers.
    Status {
        /// The run directory or URL (e.g. ./runs/demo, s3://bucket/runs/demo).
        #[arg(long)]
        run: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Follow the run live (refreshing), until it ends.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
        /// Seconds between refreshes with --watch.
        #[arg(long, default_value_t = 2.0)]
        every: f64,
    },
}

fn main() {
    simmim_proto::logging::init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("coordinator: error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Cmd::Start(args) => start(args).await,
            Cmd::Status {
                run,
                watch: true,
                every,
                ..
            } => status::watch(&run, Duration::from_secs_f64(every.max(0.1))).await,
            Cmd::Status { run, json, .. } => status::print(&run, json).await.map(|()| 0),
        }
    });
    supervisor::kill_all();
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("coordinator: error: {e:#}");
            let code = if e.downcast_ref::<ConfigProblem>().is_some() {
                EXIT_DO_NOT_RETRY
            } else {
                1
            };
            std::process::exit(code);
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ConfigProblem(String);

#[derive(clap::Args)]
struct StartArgs {
    /// Run config (YAML); see deploy/configs/.
    #[arg(long, env = "SIMMIM_CONFIG")]
    config: Option<PathBuf>,
    /// Worker processes to start on this machine (default: workers.max from the config).
    #[arg(long, env = "SIMMIM_LOCAL_WORKERS")]
    local_workers: Option<usize>,
    /// gRPC address to serve (default 127.0.0.1 on a free port; use 0.0.0.0:PORT for
    /// remote workers).
    #[arg(long, env = "SIMMIM_LISTEN")]
    listen: Option<SocketAddr>,
    /// Require an existing checkpoint to resume from (an existing run resumes anyway).
    #[arg(long)]
    resume: bool,
    /// Resume from the committed checkpoint at this step instead of the newest; newer
    /// checkpoints are deleted.
    #[arg(long)]
    resume_from: Option<u64>,
    /// Override train.max_steps (stop early; the schedule still spans the epochs).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Override run.root (where runs live).
    #[arg(long)]
    root: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9464); off by default.
    #[arg(long, env = "SIMMIM_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Print the run config the coordinator would use, and exit.
    #[arg(long)]
    print_config: bool,
}

fn load_config(args: &StartArgs) -> Result<RunConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigProblem(format!("cannot read run config {}: {e}", path.display()))
            })?;
            RunConfig::from_yaml(&text, &path.display().to_string())
                .map_err(|e| ConfigProblem(e.to_string()))?
        }
        None => RunConfig::from_yaml(DEMO_CONFIG, "the embedded demo config")
            .map_err(|e| ConfigProblem(e.to_string()))?,
    };
    if let Some(steps) = args.max_steps {
        config.train.max_steps = Some(steps);
    }
    if let Some(root) = &args.root {
        config.run.root = root.clone();
    }
    config
        .validate()
        .map_err(|e| ConfigProblem(e.to_string()))?;
    // A local dataset path must exist before workers are started; say how to get the demo's.
    let data = &config.data.train;
    if !data.contains("://") && !std::path::Path::new(data).exists() {
        let hint = if args.config.is_none() {
            "; run scripts/setup.sh to unpack the demo dataset"
        } else {
            ""
        };
        return Err(ConfigProblem(format!("data.train: {data} does not exist{hint}")).into());
    }
    Ok(config)
}

async fn start(args: StartArgs) -> Result<i32> {
    let config = load_config(&args)?;
    if args.print_config {
        print!("{}", config.to_yaml());
        return Ok(0);
    }
    let url = run_url(&config.run.root, &config.run.name)?;
    let store = RunStore::open(url.as_str())?;
    let hash = config_hash(&config);

    // An existing run: same config or refuse; resume from its newest checkpoint.
    if let Some(previous) = store.get_opt("config.yaml").await? {
        let previous = RunConfig::from_yaml(
            &String::from_utf8_lossy(&previous),
            &store.url_of("config.yaml"),
        )
        .map_err(|e| anyhow!("the existing run's config is unreadable: {e}"))?;
        if config_hash(&previous) != hash {
            return Err(ConfigProblem(format!(
                "{} already holds a run with a different config; use its config to resume it, or give run.name a new value",
                store.url()
            ))
            .into());
        }
    }
    store
        .put("config.yaml", Bytes::from(config.to_yaml()))
        .await?;
    let (resume, latest_version) = select_resume(&store, args.resume_from).await?;
    if args.resume && resume.is_none() {
        bail!("--resume: {} has no committed checkpoint", store.url());
    }
    match &resume {
        Some(r) => tracing::info!("resuming {} from step {}", store.url(), r.step),
        None => tracing::info!("starting {}", store.url()),
    }

    let listen = args
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let address = listener.local_addr()?;
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let advertised = if address.ip().is_unspecified() {
        format!("{scheme}://127.0.0.1:{}", address.port())
    } else {
        format!("{scheme}://{address}")
    };

    // The run token: configured, or (for a run that only listens on loopback) made up here
    // and handed to the local workers.
    let configured = simmim_proto::auth::token_from_env().map_err(ConfigProblem)?;
    let generated = configured.is_none();
    if generated && !address.ip().is_loopback() {
        return Err(ConfigProblem(format!(
            "listening on {address} admits remote workers: set SIMMIM_TOKEN (or SIMMIM_TOKEN_FILE) to a shared secret first"
        ))
        .into());
    }
    let token = configured.unwrap_or_else(random_token);

    // Generation numbers continue across coordinator restarts, so a worker still in a
    // generation of the previous incarnation is refused as stale, never mistaken for a member.
    let first_generation = match store.get_opt("coordinator.json").await {
        Ok(Some(bytes)) => serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["generation"].as_u64())
            .map_or(0, |g| g + 1),
        _ => 0,
    };
    let previous_logs = if store.local_dir().is_none() {
        let read = |key: &'static str| async {
            store
                .get_opt(key)
                .await
                .map(|b| b.map(|b| b.to_vec()).unwrap_or_default())
        };
        (
            read(metrics::METRICS_FILE).await?,
            read(metrics::SAMPLES_FILE).await?,
        )
    } else {
        Default::default()
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let shared = Arc::new(Shared {
        config: config.clone(),
        run_over: Mutex::new(None),
        membership: Mutex::new({
            let mut m = Membership::new(
                config.workers.min,
                config.workers.max,
                Duration::from_secs_f64(config.workers.last_call_s),
            );
            m.generation = first_generation;
            m
        }),
        events: events_tx,
        config_yaml: config.to_yaml(),
        store: store.clone(),
        heartbeat_interval: Duration::from_secs_f64(
            (config.workers.heartbeat_timeout_s / 6.0).clamp(0.2, 5.0),
        ),
        resume: Mutex::new(resume.clone()),
        latest_version: Mutex::new(latest_version),
        written_latest: Mutex::new(resume.iter().map(|r| r.manifest.clone()).collect()),
        commit_lock: tokio::sync::Mutex::new(()),
        stop: Default::default(),
        refused: Default::default(),
        metrics: Mutex::new(MetricsSink::new(
            &store,
            progress,
            config.output.tensorboard.then(|| {
                tensorboard::TensorBoard::start(
                    store.clone(),
                    &config,
                    resume.as_ref().map_or(0, |r| r.step),
                )
            }),
            previous_logs,
        )?),
        counters: Default::default(),
        status: Mutex::new(RunStatus {
            run: config.run.name.clone(),
            run_url: store.url().to_string(),
            state: "running".into(),
            step: resume.as_ref().map_or(0, |r| r.step),
            last_checkpoint_step: resume.as_ref().map(|r| r.step),
            ..Default::default()
        }),
    });
    let service = CoordinatorServer::with_interceptor(
        Service {
            shared: shared.clone(),
        },
        service::require_token(token.clone(), shared.clone()),
    );
    // The standard gRPC health service, open to all (Kubernetes probes carry no token).
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServer<Service>>().await;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        let read = |field: &str, path: &str| {
            std::fs::read(path).map_err(|e| ConfigProblem(format!("tls.{field}: {path}: {e}")))
        };
        let identity =
            tonic::transport::Identity::from_pem(read("cert", &tls.cert)?, read("key", &tls.key)?);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| ConfigProblem(format!("tls: {e}")))?;
        // Local workers trust the certificate itself unless a CA is configured.
        if std::env::var_os(simmim_proto::auth::TLS_CA_ENV).is_none() {
            // SAFETY-free: set before any worker process or other thread reads it.
            unsafe { std::env::set_var(simmim_proto::auth::TLS_CA_ENV, &tls.cert) };
        }
    }
    let server = builder
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!("gRPC server stopped: {e}");
        }
    });
    if let Some(listen) = args.metrics_listen {
        let bound = prometheus::serve(listen, prometheus::registry(shared.clone())).await?;
        tracing::info!("Prometheus metrics on http://{bound}/metrics");
    }
    // The address (and, for a loopback-only run, the made-up token) for `coordinator status`.
    let mut info = serde_json::json!({
        "address": advertised,
        "pid": std::process::id(),
        "state": "running",
        "generation": first_generation,
    });
    if generated {
        info["token"] = serde_json::Value::String(token.clone());
    }
    store
        .put("coordinator.json", Bytes::from(info.to_string()))
        .await?;
    tracing::info!(
        "coordinator serving on {advertised}; run directory {}",
        store.url()
    );

    let local = args.local_workers.unwrap_or(config.workers.max);
    let log_dir = store
        .local_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("logs");
    let timeout = Duration::from_secs_f64(config.workers.heartbeat_timeout_s);
    let rejoin_timeout = Duration::from_secs_f64(config.workers.rejoin_timeout_s);
    let mut workers =
        LocalWorkers::spawn(local, &advertised, &config.workers.device, &log_dir, &token)?;
    let logs = workers.logs.clone();
    let mut exits = workers.watch();
    let mut alive_local = local;
    let mut restarts = 0u32;
    let mut interrupts = 0u32;
    let mut generation_began = Instant::now();
    let mut written_generation = first_generation;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    // SIGTERM (Kubernetes deleting the pod, a scheduler's stop) is treated like Ctrl-C.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;

    let outcome: Result<i32> = loop {
        // A reason to end the current generation, if anything happened.
        let failure: Option<(u64, String, bool)> = tokio::select! {
            Some(exit) = exits.recv() => {
                alive_local = alive_local.saturating_sub(1);
                if exit.code == Some(0) {
                    None
                } else {
                    let permanent = exit.code == Some(EXIT_DO_NOT_RETRY);
                    let log = logs.get(exit.index).map(|p| supervisor::tail(p, 15)).unwrap_or_default();
                    let (generation, member) = shared
                        .membership
                        .lock()
                        .map(|m| (m.generation, m.is_active(&supervisor::worker_id(exit.index))))
                        .unwrap_or((0, false));
                    tracing::warn!("local worker {} exited with {:?}", exit.index, exit.code);
                    if member || permanent {
                        Some((generation, format!("local worker {} exited with {:?}; its log ends:\n{log}", exit.index, exit.code), permanent))
                    } else {
                        None
                    }
                }
            }
            Some(event) = events.recv() => match event {
                Event::AllDone { step } => break Ok(finish(&shared, step)),
                Event::Regroup { generation } => {
                    if let Ok(mut m) = shared.membership.lock() {
                        if m.generation == generation {
                            tracing::info!(generation, "generation stopped after a checkpoint; the next one forms with every worker present");
                            m.next_generation(Instant::now());
                            generation_began = Instant::now();
                        }
                    }
                    None
                }
                Event::Failed { generation, rank, message, retryable } => {
                    Some((generation, format!("rank {rank}: {message}"), !retryable))
                }
            },
            _ = tick.tick() => {
                let (generation, silent, formed) = shared
                    .membership
                    .lock()
                    .map(|mut m| {
                        let now = Instant::now();
                        if m.should_grow(now) {
                            m.regroup = true;
                            tracing::info!(
                                generation = m.generation,
                                waiting = m.waiting.len(),
                                "workers are waiting: the generation stops after a checkpoint of its next step and regroups"
                            );
                        }
                        (m.generation, m.silent(now, timeout), m.world.is_some())
                    })
                    .unwrap_or_default();
                if generation != written_generation {
                    written_generation = generation;
                    info["generation"] = serde_json::json!(generation);
                    let (store, bytes) = (store.clone(), Bytes::from(info.to_string()));
                    tokio::spawn(async move {
                        if let Err(e) = store.put("coordinator.json", bytes).await {
                            tracing::warn!("cannot update coordinator.json: {e}");
                        }
                    });
                }
                if let Some(rank) = silent.first() {
                    Some((generation, format!("rank {rank} sent no heartbeat for {:.0} s", timeout.as_secs_f64()), false))
                } else if !formed && (generation_began.elapsed() > rejoin_timeout || (local > 0 && alive_local == 0 && generation > first_generation)) {
                    break Err(anyhow!(
                        "generation {generation} did not form: fewer than workers.min = {} workers joined within {:.0} s",
                        config.workers.min,
                        rejoin_timeout.as_secs_f64()
                    ));
                } else {
                    None
                }
            }
            _ = async {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            } => {
                interrupts += 1;
                if interrupts == 1 {
                    eprintln!("\ncoordinator: stopping after the next checkpoint (a second signal aborts without it)");
                    shared.stop.store(true, Ordering::Relaxed);
                    if let Ok(mut s) = shared.status.lock() {
                        s.state = "stopping".into();
                    }
                    None
                } else {
                    break Ok(130);
                }
            }
        };
        let Some((generation, message, permanent)) = failure else {
            continue;
        };
        let current = shared.membership.lock().map(|m| m.generation).unwrap_or(0);
        if generation != current {
            continue; // already handled: that generation has ended
        }
        if permanent {
            break Err(ConfigProblem(message).into());
        }
        if restarts >= config.workers.max_restarts {
            break Err(anyhow!(
                "giving up after {restarts} restarts (workers.max_restarts = {}); last failure: {message}",
                config.workers.max_restarts
            ));
        }
        restarts += 1;
        let resume = shared.resume.lock().ok().and_then(|r| r.clone());
        tracing::warn!(
            "generation {generation} ended ({message}); restart {restarts}/{}: the survivors rejoin and resume from step {}",
            config.workers.max_restarts,
            resume.as_ref().map_or(0, |r| r.step)
        );
        if let Ok(mut m) = shared.membership.lock() {
            m.next_generation(Instant::now());
        }
        if let Ok(mut s) = shared.status.lock() {
            s.restarts = restarts;
        }
        generation_began = Instant::now();
    };
    let state = match &outcome {
        Ok(0) => "finished",
        Ok(EXIT_STOPPED) => "stopped",
        Ok(_) => "interrupted",
        Err(_) => "failed",
    };
    if let Ok(mut over) = shared.run_over.lock() {
        *over = Some(format!("the run has {state}"));
    }
    // Let workers that are still connected hear the end before their processes are stopped.
    tokio::time::sleep(Duration::from_millis(200)).await;
    supervisor::kill_all();
    let tensorboard_written = shared
        .metrics
        .lock()
        .ok()
        .and_then(|mut sink| sink.finish(state == "finished" || state == "stopped"));
    if let Some(written) = tensorboard_written {
        if tokio::time::timeout(Duration::from_secs(30), written)
            .await
            .is_err()
        {
            tracing::warn!("TensorBoard: the last event file was not written within 30 s");
        }
    }
    if let Ok(mut s) = shared.status.lock() {
        s.state = state.into();
    }
    let _ = store
        .put(
            "coordinator.json",
            Bytes::from(
                serde_json::json!({
                    "state": state,
                    "generation": shared.membership.lock().map(|m| m.generation).unwrap_or(0),
                })
                .to_string(),
            ),
        )
        .await;
    outcome
}

/// A fresh random token for a run whose workers are all local.
fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Exit status of a run stopped by SIGINT/SIGTERM after its checkpoint (as a shell reports
/// a command ended by Ctrl-C).
const EXIT_STOPPED: i32 = 130;

fn finish(shared: &Shared, step: u64) -> i32 {
    let status = shared.snapshot();
    let stopped = shared.stop.load(Ordering::Relaxed);
    eprintln!(
        "coordinator: run {} {} at step {step}; last loss {}; checkpoint at step {}; results in {}{}",
        shared.config.run.name,
        if stopped { "stopped" } else { "finished" },
        status.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
        status.last_checkpoint_step.map_or("-".into(), |s| s.to_string()),
        shared.store.url(),
        if stopped { "; the same command resumes it" } else { "" }
    );
    if stopped {
        EXIT_STOPPED
    } else {
        0
    }
}

/// Picks the checkpoint to resume from and tidies the run directory:
/// - multipart uploads a crashed writer left are aborted;
/// - the checkpoint `latest` points at is verified (every object's size and SHA-256); if it
///   is damaged, the newest older committed checkpoint that verifies is used instead, with a
///   warning naming what is wrong (or exactly `resume_from`, when given);
/// - checkpoints newer than the chosen one (uncommitted: a manifest written but `latest`
///   never moved, or damaged) and directories without a manifest are deleted, so the run can
///   write those steps again;
/// - `latest` is pointed at the choice. Returns it with `latest`'s version.
async fn select_resume(
    store: &RunStore,
    resume_from: Option<u64>,
) -> Result<(Option<ResumePoint>, Option<object_store::UpdateVersion>)> {
    let aborted = store.abort_stale_uploads().await?;
    if aborted > 0 {
        tracing::warn!("aborted {aborted} unfinished multipart uploads left by a crash");
    }
    let pointer = store.latest_pointer().await?;
    let latest_step = pointer
        .as_ref()
        .and_then(|(key, _)| simmim_proto::Manifest::step_of(key));
    let listing = store.checkpoints().await?;
    let mut chosen: Option<ResumePoint> = None;
    for &(step, _) in listing
        .iter()
        .rev()
        .filter(|(_, has_manifest)| *has_manifest)
    {
        let key = simmim_proto::Manifest::path_for(step);
        let committed = latest_step.is_some_and(|latest| step <= latest);
        let wanted = match resume_from {
            Some(target) => step == target,
            None => committed && chosen.is_none(),
        };
        if !wanted {
            continue;
        }
        let verdict = match store.read_manifest(&key).await {
            Ok(manifest) => store.verify_checksums(&manifest).await.map(|()| manifest),
            Err(e) => Err(e),
        };
        match verdict {
            Ok(manifest) => {
                chosen = Some(ResumePoint {
                    step: manifest.step,
                    manifest: key,
                });
                if resume_from.is_some() {
                    break;
                }
            }
            Err(e) if resume_from.is_some() => bail!("--resume-from {step}: {e}"),
            Err(e) => tracing::warn!(
                "checkpoint at step {step} is damaged ({e}); falling back to the previous one"
            ),
        }
    }
    if let (Some(target), None) = (resume_from, &chosen) {
        bail!(
            "--resume-from {target}: {} has no committed checkpoint at that step",
            store.url()
        );
    }
    let keep = chosen.as_ref().map(|c| c.step);
    for &(step, has_manifest) in &listing {
        let newer = keep.is_none_or(|k| step > k);
        if newer || !has_manifest {
            tracing::warn!(
                step,
                "deleting checkpoint directory that is not in force (uncommitted or damaged)"
            );
            store.delete_checkpoint(step).await?;
        }
    }
    let mut version = pointer.as_ref().map(|(_, v)| v.clone());
    if let Some(c) = &chosen {
        if pointer.as_ref().map(|(k, _)| k) != Some(&c.manifest) {
            version = Some(store.move_latest(&c.manifest, version).await?);
        }
    }
    Ok((chosen, version))
}
