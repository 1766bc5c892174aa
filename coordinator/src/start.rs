//! `coordinator start`: the run config, the run directory (resume selection), the gRPC
//! endpoint (address, token, TLS) and the shared state; then the generation loop
//! ([`crate::generations`]) until the run ends.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use simmim_proto::checkpoint::{select_resume, Committed, Committer};
use simmim_proto::pb::coordinator_server::CoordinatorServer;
use simmim_proto::run_config::DEMO_CONFIG;
use simmim_proto::store::{config_hash, run_url, RunStore};
use simmim_proto::{Permanent, RunConfig, RunStatus};
use tokio::sync::mpsc;

use crate::generations::{self, Launch};
use crate::membership::Membership;
use crate::metrics::{self, MetricsSink};
use crate::service::{Event, Service, Shared};
use crate::{prometheus, tensorboard};

#[derive(clap::Args)]
pub struct StartArgs {
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

pub async fn start(args: StartArgs) -> Result<i32> {
    let config = load_config(&args)?;
    if args.print_config {
        print!("{}", config.to_yaml());
        return Ok(0);
    }
    let run = OpenRun::open(&config, args.resume, args.resume_from).await?;
    let endpoint = Endpoint::bind(&config, args.listen).await?;
    let (events_tx, events) = mpsc::unbounded_channel();
    let shared = Arc::new(shared_state(&config, &run, events_tx)?);
    serve(&config, endpoint.listener, &endpoint.token, shared.clone()).await?;
    if let Some(listen) = args.metrics_listen {
        let bound = prometheus::serve(listen, prometheus::registry(shared.clone())).await?;
        tracing::info!("Prometheus metrics on http://{bound}/metrics");
    }
    // The address (and, for a loopback-only run, the made-up token) for `coordinator status`.
    let mut info = serde_json::json!({
        "address": endpoint.advertised,
        "pid": std::process::id(),
        "state": "running",
        "generation": run.first_generation,
    });
    if endpoint.generated_token {
        info["token"] = serde_json::Value::String(endpoint.token.clone());
    }
    run.store
        .put("coordinator.json", Bytes::from(info.to_string()))
        .await?;
    tracing::info!(
        "coordinator serving on {}; run directory {}",
        endpoint.advertised,
        run.store.url()
    );
    let launch = Launch {
        local_workers: args.local_workers.unwrap_or(config.workers.max),
        address: endpoint.advertised,
        token: endpoint.token,
        first_generation: run.first_generation,
        info,
    };
    let outcome = generations::supervise(shared.clone(), events, launch).await;
    generations::wind_down(&shared, &outcome).await;
    outcome
}

fn load_config(args: &StartArgs) -> Result<RunConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Permanent(format!("cannot read run config {}: {e}", path.display()))
            })?;
            RunConfig::from_yaml(&text, &path.display().to_string())
                .map_err(Permanent::from_display)?
        }
        None => RunConfig::from_yaml(DEMO_CONFIG, "the embedded demo config")
            .map_err(Permanent::from_display)?,
    };
    if let Some(steps) = args.max_steps {
        config.train.max_steps = Some(steps);
    }
    if let Some(root) = &args.root {
        config.run.root = root.clone();
    }
    config.validate().map_err(Permanent::from_display)?;
    // A local dataset path must exist before workers are started; say how to get the demo's.
    let data = &config.data.train;
    if !data.contains("://") && !std::path::Path::new(data).exists() {
        let hint = if args.config.is_none() {
            "; run scripts/setup.sh to unpack the demo dataset"
        } else {
            ""
        };
        return Err(Permanent(format!("data.train: {data} does not exist{hint}")).into());
    }
    Ok(config)
}

/// The run directory, opened: its config checked against ours, the checkpoint to resume
/// from selected, and what an earlier coordinator left (generation number, logs).
struct OpenRun {
    store: RunStore,
    resume: Option<Committed>,
    latest_version: Option<object_store::UpdateVersion>,
    first_generation: u64,
    previous_logs: (Vec<u8>, Vec<u8>),
}

impl OpenRun {
    async fn open(config: &RunConfig, must_resume: bool, resume_from: Option<u64>) -> Result<Self> {
        let url = run_url(&config.run.root, &config.run.name)?;
        let store = RunStore::open(url.as_str())?;
        // An existing run: same config or refuse; resume from its newest checkpoint.
        if let Some(previous) = store.get_opt("config.yaml").await? {
            let previous = RunConfig::from_yaml(
                &String::from_utf8_lossy(&previous),
                &store.url_of("config.yaml"),
            )
            .map_err(|e| anyhow!("the existing run's config is unreadable: {e}"))?;
            if config_hash(&previous) != config_hash(config) {
                return Err(Permanent(format!(
                    "{} already holds a run with a different config; use its config to resume it, or give run.name a new value",
                    store.url()
                ))
                .into());
            }
        }
        store
            .put("config.yaml", Bytes::from(config.to_yaml()))
            .await?;
        let (resume, latest_version) = select_resume(&store, resume_from).await?;
        if must_resume && resume.is_none() {
            bail!("--resume: {} has no committed checkpoint", store.url());
        }
        match &resume {
            Some(r) => tracing::info!("resuming {} from step {}", store.url(), r.step),
            None => tracing::info!("starting {}", store.url()),
        }
        // Generation numbers continue across coordinator restarts, so a worker still in a
        // generation of the previous incarnation is refused as stale, never taken for a member.
        let first_generation = match store.get_opt("coordinator.json").await {
            Ok(Some(bytes)) => serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["generation"].as_u64())
                .map_or(0, |g| g + 1),
            _ => 0,
        };
        // On an object store the logs are rewritten whole, so continue what is there.
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
        Ok(Self {
            store,
            resume,
            latest_version,
            first_generation,
            previous_logs,
        })
    }
}

/// Where the coordinator listens, the URL workers use, and the run token.
struct Endpoint {
    listener: tokio::net::TcpListener,
    advertised: String,
    token: String,
    /// Made up here (a loopback-only run) rather than configured.
    generated_token: bool,
}

impl Endpoint {
    async fn bind(config: &RunConfig, listen: Option<SocketAddr>) -> Result<Self> {
        let listen = listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
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
        let configured = simmim_proto::auth::token_from_env().map_err(Permanent)?;
        let generated_token = configured.is_none();
        if generated_token && !address.ip().is_loopback() {
            return Err(Permanent(format!(
                "listening on {address} admits remote workers: set SIMMIM_TOKEN (or SIMMIM_TOKEN_FILE) to a shared secret first"
            ))
            .into());
        }
        Ok(Self {
            listener,
            advertised,
            token: configured.unwrap_or_else(random_token),
            generated_token,
        })
    }
}

/// A fresh random token for a run whose workers are all local.
fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn shared_state(
    config: &RunConfig,
    run: &OpenRun,
    events: mpsc::UnboundedSender<Event>,
) -> Result<Shared> {
    let resumed_at = run.resume.as_ref().map_or(0, |r| r.step);
    let mut membership = Membership::new(
        config.workers.min,
        config.workers.max,
        Duration::from_secs_f64(config.workers.last_call_s),
    );
    membership.generation = run.first_generation;
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let tensorboard = config
        .output
        .tensorboard
        .then(|| tensorboard::TensorBoard::start(run.store.clone(), config, resumed_at));
    Ok(Shared {
        config: config.clone(),
        run_over: Mutex::new(None),
        membership: Mutex::new(membership),
        events,
        config_yaml: config.to_yaml(),
        store: run.store.clone(),
        heartbeat_interval: Duration::from_secs_f64(
            (config.workers.heartbeat_timeout_s / 6.0).clamp(0.2, 5.0),
        ),
        committer: Committer::new(
            run.store.clone(),
            run.resume.clone(),
            run.latest_version.clone(),
        ),
        stop: Default::default(),
        metrics: Mutex::new(MetricsSink::new(
            &run.store,
            progress,
            tensorboard,
            run.previous_logs.clone(),
        )?),
        counters: Default::default(),
        status: Mutex::new(RunStatus {
            run: config.run.name.clone(),
            run_url: run.store.url().to_string(),
            state: "running".into(),
            step: resumed_at,
            last_checkpoint_step: run.resume.as_ref().map(|r| r.step),
            ..Default::default()
        }),
    })
}

/// Serves the coordinator and the standard gRPC health service (open to all: Kubernetes
/// probes carry no token) in the background.
async fn serve(
    config: &RunConfig,
    listener: tokio::net::TcpListener,
    token: &str,
    shared: Arc<Shared>,
) -> Result<()> {
    let service = CoordinatorServer::with_interceptor(
        Service {
            shared: shared.clone(),
        },
        crate::service::require_token(token.to_string(), shared),
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServer<Service>>().await;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        let read = |field: &str, path: &str| {
            std::fs::read(path).map_err(|e| Permanent(format!("tls.{field}: {path}: {e}")))
        };
        let identity =
            tonic::transport::Identity::from_pem(read("cert", &tls.cert)?, read("key", &tls.key)?);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| Permanent(format!("tls: {e}")))?;
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
    Ok(())
}
