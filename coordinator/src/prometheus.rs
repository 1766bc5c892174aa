//! The coordinator's Prometheus endpoint (`--metrics-listen ADDR`, `GET /metrics`). Values are
//! read from the coordinator's state at each scrape (a `prometheus-client` collector), so
//! there is nothing to keep in sync. Scrapers asking for OpenMetrics get it; everyone else
//! (curl, `promtool check metrics`, older Prometheus) gets text format 0.0.4.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::service::Shared;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Collects the run's metrics from the coordinator's shared state at scrape time.
struct RunCollector(Arc<Shared>);

impl std::fmt::Debug for RunCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunCollector")
    }
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> std::fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
}

impl Collector for RunCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let shared = &self.0;
        let s = shared.snapshot();
        let counts = &shared.counters;
        for (name, help, value) in run_gauges(&s) {
            gauge(&mut e, name, help, value)?;
        }
        let counters = [
            (
                "simmim_restarts",
                "Generations restarted from a checkpoint.",
                u64::from(s.restarts),
            ),
            (
                "simmim_checkpoint_commits",
                "Checkpoints committed.",
                counts.commits.load(Ordering::Relaxed),
            ),
            (
                "simmim_checkpoint_commit_failures",
                "Checkpoint commits refused or failed.",
                counts.commit_failures.load(Ordering::Relaxed),
            ),
            (
                "simmim_storage_retries",
                "Object-store requests retried by this coordinator.",
                simmim_proto::logging::storage_retries(),
            ),
        ];
        for (name, help, value) in counters {
            counter(&mut e, name, help, value)?;
        }
        let refused = [
            ("token", s.refused_unauthenticated),
            (
                "membership",
                counts.refused_membership.load(Ordering::Relaxed),
            ),
        ];
        let mut family = e.encode_descriptor(
            "simmim_refused_requests",
            "Requests refused, by reason.",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in refused {
            ConstCounter::new(n).encode(family.encode_family(&[("reason", reason)])?)?;
        }
        per_rank(&mut e, &s.workers)
    }
}

/// The run-wide gauges: name, help, value.
fn run_gauges(s: &simmim_proto::RunStatus) -> [(&'static str, &'static str, f64); 13] {
    let optional = |v: Option<f64>| v.unwrap_or(f64::NAN);
    [
        (
            "simmim_step",
            "Optimizer steps done (rank 0).",
            s.step as f64,
        ),
        (
            "simmim_end_step",
            "The step the run ends at.",
            s.total_steps as f64,
        ),
        ("simmim_epoch", "Current epoch.", s.epoch as f64),
        (
            "simmim_loss",
            "Loss of the newest step.",
            optional(s.last_loss),
        ),
        (
            "simmim_learning_rate",
            "Learning rate of the newest step.",
            optional(s.last_lr),
        ),
        (
            "simmim_images_per_second",
            "Training throughput of the newest step, all ranks.",
            optional(s.images_per_sec),
        ),
        (
            "simmim_data_wait_share",
            "Share of the newest step spent waiting for data (rank 0).",
            optional(s.data_wait_share),
        ),
        (
            "simmim_allreduce_seconds",
            "Gradient all-reduce time of the newest step (rank 0).",
            optional(s.allreduce_seconds),
        ),
        (
            "simmim_generation",
            "Current worker generation.",
            s.generation as f64,
        ),
        (
            "simmim_world_size",
            "Workers in the running generation.",
            f64::from(s.world_size),
        ),
        (
            "simmim_workers_present",
            "Workers registered in the current generation.",
            s.workers.len() as f64,
        ),
        (
            "simmim_workers_waiting",
            "Registered workers waiting for a generation to form.",
            s.waiting.len() as f64,
        ),
        (
            "simmim_checkpoint_committed_step",
            "Step of the newest committed checkpoint (-1: none).",
            s.last_checkpoint_step.map_or(-1.0, |v| v as f64),
        ),
    ]
}

/// The per-rank gauges, labelled by rank and worker id.
fn per_rank(
    e: &mut DescriptorEncoder,
    workers: &[simmim_proto::status::WorkerStatus],
) -> std::fmt::Result {
    type PerRank = fn(&simmim_proto::status::WorkerStatus) -> f64;
    let table: [(&str, &str, PerRank); 6] = [
        ("simmim_rank_step", "Newest step a rank reported.", |w| {
            w.step as f64
        }),
        (
            "simmim_rank_step_seconds",
            "A rank's newest step time.",
            |w| w.step_seconds,
        ),
        (
            "simmim_rank_data_wait_share",
            "A rank's share of step time waiting for data.",
            |w| w.data_wait_share,
        ),
        (
            "simmim_rank_allreduce_seconds",
            "A rank's newest all-reduce time.",
            |w| w.allreduce_seconds,
        ),
        (
            "simmim_rank_heartbeat_age_seconds",
            "Seconds since a rank was last heard from.",
            |w| w.last_heartbeat_ms_ago as f64 / 1000.0,
        ),
        (
            "simmim_rank_straggler",
            "1 when a rank's step time is over 1.5x the median.",
            |w| f64::from(u8::from(w.straggler)),
        ),
    ];
    for (name, help, value) in table {
        let mut family = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for w in workers {
            let labels = [
                ("rank", w.rank.to_string()),
                ("worker", w.worker_id.clone()),
            ];
            ConstGauge::new(value(w)).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

pub fn registry(shared: Arc<Shared>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(RunCollector(shared)));
    registry
}

/// OpenMetrics text as text format 0.0.4: counters' `# HELP`/`# TYPE` name the `_total`
/// sample they describe, and the `# EOF` and `# UNIT` lines go.
pub fn to_text_004(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let name = if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some(h) = help.take() {
                let text = h["# HELP ".len()..].split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

async fn answer(
    registry: Arc<Registry>,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, kind: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = kind.parse() {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        Ok(response)
    };
    if request.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "see /metrics\n".into());
    }
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        );
    }
    let wants_openmetrics = request
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if wants_openmetrics {
        reply(StatusCode::OK, OPENMETRICS, text)
    } else {
        reply(StatusCode::OK, TEXT_004, to_text_004(&text))
    }
}

/// Serves `/metrics` on `listen` until the process ends; returns the bound address.
pub async fn serve(listen: SocketAddr, registry: Registry) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("--metrics-listen: cannot listen on {listen}"))?;
    let address = listener.local_addr()?;
    let registry = Arc::new(registry);
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(connection) => connection,
                Err(e) => {
                    tracing::warn!("metrics endpoint: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request| answer(registry.clone(), request));
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!("metrics endpoint connection: {e}");
                }
            });
        }
    });
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_renamed_for_text_004() {
        let om = "# HELP simmim_restarts Generations restarted.\n# TYPE simmim_restarts counter\nsimmim_restarts_total 2\n# HELP simmim_step Steps.\n# TYPE simmim_step gauge\nsimmim_step 5\n# EOF\n";
        assert_eq!(
            to_text_004(om),
            "# HELP simmim_restarts_total Generations restarted.\n# TYPE simmim_restarts_total counter\nsimmim_restarts_total 2\n# HELP simmim_step Steps.\n# TYPE simmim_step gauge\nsimmim_step 5\n"
        );
    }
}
