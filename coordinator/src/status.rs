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
    if json {
        let out = serde_json::json!({
            "run_url": store.url(),
            "latest_checkpoint": latest.as_ref().map(|(k, m)| serde_json::json!({"manifest": k, "step": m.step, "epoch": m.epoch})),
            "last_metrics": last_metrics,
            "live": live,
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
                "state      {} (generation {}, restarts {}), step {}/{}",
                s.state, s.generation, s.restarts, s.step, s.total_steps
            );
            for w in &s.workers {
                println!(
                    "  rank {} {} on {} ({}): step {}, {:.3} s/step, data wait {:.0}%, heartbeat {} ms ago",
                    w.rank, w.worker_id, w.hostname, w.device, w.step, w.step_seconds, 100.0 * w.data_wait_share, w.last_heartbeat_ms_ago
                );
            }
        }
        None => println!("state      not running (no coordinator answers)"),
    }
    Ok(())
}

async fn live_status(store: &RunStore) -> Option<RunStatus> {
    let info = store.get_opt("coordinator.json").await.ok()??;
    let info: serde_json::Value = serde_json::from_slice(&info).ok()?;
    let address = info["address"].as_str()?.to_string();
    let ask = async {
        let channel = tonic::transport::Channel::from_shared(address)
            .ok()?
            .connect()
            .await
            .ok()?;
        let mut client = CoordinatorClient::new(channel);
        let reply = client.status(StatusRequest {}).await.ok()?.into_inner();
        serde_json::from_str::<RunStatus>(&reply.status_json).ok()
    };
    tokio::time::timeout(Duration::from_secs(3), ask)
        .await
        .ok()
        .flatten()
}
