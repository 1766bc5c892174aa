//! `coordinator status --run DIR_OR_URL`: what the run directory says (newest checkpoint,
//! last metrics) and, when the run is live, what its coordinator says about each worker.

use std::time::Duration;

use anyhow::Result;
use simmim_proto::pb::coordinator_client::CoordinatorClient;
use simmim_proto::pb::StatusRequest;
use simmim_proto::store::{location_url, RunStore};
use simmim_proto::RunStatus;

use crate::metrics::METRICS_FILE;

pub async fn print(run: &str, json: bool) -> Result<()> {
    let url = location_url(run)?;
    let store = RunStore::open(url.as_str())?;
    if store.get_opt("config.yaml").await?.is_none() {
        anyhow::bail!("{}: not a run directory (no config.yaml)", store.url());
    }
    let latest = store.latest_manifest().await?;
    let last_metrics = store.get_opt(METRICS_FILE).await?.and_then(|bytes| {
        String::from_utf8_lossy(&bytes)
            .lines()
            .last()
            .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    });
    let live = live_status(&store).await;
    let live_error = live.as_ref().err().cloned();
    let live = live.ok();
    if json {
        let out = serde_json::json!({
            "run_url": store.url(),
            "latest_checkpoint": latest.as_ref().map(|(k, m)| serde_json::json!({"manifest": k, "step": m.step, "epoch": m.epoch})),
            "last_metrics": last_metrics,
            "live": live,
            "live_error": live_error,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("run        {}", store.url());
    match &latest {
        Some((key, m)) => println!(
            "checkpoint step {} (epoch {}) at {}",
            m.step,
            m.epoch,
            store.url_of(key)
        ),
        None => println!("checkpoint none committed yet"),
    }
    if let Some(m) = &last_metrics {
        println!(
            "last step  {} loss {} images/s {}",
            m["step"], m["loss"], m["images_per_sec"]
        );
    }
    match live {
        Some(s) => {
            println!(
                "state      {} (generation {}, {} workers, restarts {}), step {}/{}, {} requests refused for the token",
                s.state,
                s.generation,
                s.world_size,
                s.restarts,
                s.step,
                s.total_steps,
                s.refused_unauthenticated
            );
            for w in &s.workers {
                println!(
                    "  rank {} {} on {} ({}, pid {}): step {}, {:.3} s/step, data wait {:.0}%, all-reduce {:.3} s, heartbeat {} ms ago{}",
                    w.rank,
                    w.worker_id,
                    w.hostname,
                    w.device,
                    w.pid,
                    w.step,
                    w.step_seconds,
                    100.0 * w.data_wait_share,
                    w.allreduce_seconds,
                    w.last_heartbeat_ms_ago,
                    if w.straggler { "  STRAGGLER (over 1.5x the median step time)" } else { "" }
                );
            }
        }
        None => println!(
            "state      not running ({})",
            live_error.unwrap_or_default()
        ),
    }
    Ok(())
}

/// The running coordinator's own view, or why there is none.
async fn live_status(store: &RunStore) -> Result<RunStatus, String> {
    let info = store
        .get_opt("coordinator.json")
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no coordinator.json")?;
    let info: serde_json::Value = serde_json::from_slice(&info).map_err(|e| e.to_string())?;
    let address = info["address"]
        .as_str()
        .ok_or_else(|| {
            format!(
                "the coordinator is {}",
                info["state"].as_str().unwrap_or("gone")
            )
        })?
        .to_string();
    let token = simmim_proto::auth::token_from_env()
        .ok()
        .flatten()
        .or_else(|| info["token"].as_str().map(str::to_string));
    let ask = async {
        let channel = simmim_proto::auth::endpoint(&address)?
            .connect()
            .await
            .map_err(|e| format!("{address}: {e}"))?;
        let interceptor = simmim_proto::auth::AddToken::new(token.as_deref())?;
        let mut client = CoordinatorClient::with_interceptor(channel, interceptor);
        let reply = client
            .status(StatusRequest {})
            .await
            .map_err(|s| format!("{address}: {}", s.message()))?
            .into_inner();
        serde_json::from_str::<RunStatus>(&reply.status_json).map_err(|e| e.to_string())
    };
    tokio::time::timeout(Duration::from_secs(3), ask)
        .await
        .map_err(|_| format!("{address} did not answer in 3 s"))?
}
