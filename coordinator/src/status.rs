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
            for w in &s.waiting {
                println!(
                    "  waiting {} on {} ({}), for {:.0} s",
                    w.worker_id,
                    w.hostname,
                    w.device,
                    w.waiting_ms as f64 / 1000.0
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

/// `coordinator status --watch`: a live view refreshed every `every` (the loss, progress and
/// ETA on top, one line per rank below) until the run ends; returns 0 when it finished.
pub async fn watch(run: &str, every: Duration) -> Result<i32> {
    let url = location_url(run)?;
    let store = RunStore::open(url.as_str())?;
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut first: Option<(std::time::Instant, u64)> = None;
    let mut last_shown = String::new();
    loop {
        let screen = match live_status(&store).await {
            Ok(s) => {
                let now = std::time::Instant::now();
                let (t0, step0) = *first.get_or_insert((now, s.step));
                let rate = (s.step > step0)
                    .then(|| (s.step - step0) as f64 / now.duration_since(t0).as_secs_f64());
                render(&s, rate)
            }
            Err(why) => {
                let state = coordinator_state(&store).await;
                if let Some(state) = state.filter(|s| s != "running") {
                    let code = if state == "finished" { 0 } else { 1 };
                    println!("run {}: {state}", store.url());
                    return Ok(code);
                }
                format!("run {}: waiting for the coordinator ({why})\n", store.url())
            }
        };
        if terminal {
            // Home, clear: a refreshing screen rather than a scrolling log.
            print!("\x1b[H\x1b[2J{screen}");
        } else if screen != last_shown {
            println!("{screen}");
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        last_shown = screen;
        tokio::time::sleep(every).await;
    }
}

/// What `coordinator.json` says of the coordinator (`running`, `finished`, ...).
async fn coordinator_state(store: &RunStore) -> Option<String> {
    let bytes = store.get_opt("coordinator.json").await.ok()??;
    let info: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(info["state"].as_str().unwrap_or("running").to_string())
}

fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".into();
    }
    let s = seconds.round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// The watch screen for one status. `rate` is the observed steps per second, if any; else
/// the ranks' median step time gives the ETA.
pub fn render(s: &RunStatus, rate: Option<f64>) -> String {
    use std::fmt::Write;
    let left = s.total_steps.saturating_sub(s.step) as f64;
    let mut times: Vec<f64> = s.workers.iter().map(|w| w.step_seconds).collect();
    times.sort_by(f64::total_cmp);
    let eta = match (rate, times.get(times.len() / 2)) {
        (Some(r), _) if r > 0.0 => left / r,
        (_, Some(t)) if *t > 0.0 => left * t,
        _ => f64::NAN,
    };
    let percent = if s.total_steps > 0 {
        100.0 * s.step as f64 / s.total_steps as f64
    } else {
        0.0
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}  {}  generation {}  world {}  restarts {}  waiting {}",
        s.run,
        s.state,
        s.generation,
        s.world_size,
        s.restarts,
        s.waiting.len()
    );
    let _ = writeln!(
        out,
        "step {}/{} ({percent:.1}%)  epoch {}  loss {}  lr {}  {} img/s  ETA {}  checkpoint {}",
        s.step,
        s.total_steps,
        s.epoch,
        s.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
        s.last_lr.map_or("-".into(), |l| format!("{l:.2e}")),
        s.images_per_sec.map_or("-".into(), |v| format!("{v:.0}")),
        duration(eta),
        s.last_checkpoint_step.map_or("-".into(), |c| c.to_string()),
    );
    let _ = writeln!(
        out,
        "{:>4}  {:<22} {:<16} {:>8} {:>9} {:>9} {:>10} {:>9}",
        "rank", "worker", "host", "step", "s/step", "data wait", "all-reduce", "heartbeat"
    );
    for w in &s.workers {
        let _ = writeln!(
            out,
            "{:>4}  {:<22} {:<16} {:>8} {:>9.3} {:>8.0}% {:>9.3}s {:>8.1}s{}",
            w.rank,
            w.worker_id,
            w.hostname,
            w.step,
            w.step_seconds,
            100.0 * w.data_wait_share,
            w.allreduce_seconds,
            w.last_heartbeat_ms_ago as f64 / 1000.0,
            if w.straggler { "  STRAGGLER" } else { "" }
        );
    }
    for w in &s.waiting {
        let _ = writeln!(
            out,
            "   -  {:<22} {:<16} waiting {:.0}s for the next generation",
            w.worker_id,
            w.hostname,
            w.waiting_ms as f64 / 1000.0
        );
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use simmim_proto::status::WorkerStatus;

    #[test]
    fn the_watch_screen_shows_progress_eta_and_each_rank() {
        let worker = |rank: u32, seconds: f64, straggler: bool| WorkerStatus {
            rank,
            worker_id: format!("w{rank}"),
            hostname: "host".into(),
            step: 40,
            step_seconds: seconds,
            last_heartbeat_ms_ago: 1500,
            straggler,
            ..Default::default()
        };
        let status = RunStatus {
            run: "demo".into(),
            state: "running".into(),
            step: 40,
            total_steps: 100,
            last_loss: Some(0.51234),
            workers: vec![worker(0, 0.5, false), worker(1, 2.0, true)],
            ..Default::default()
        };
        let screen = render(&status, Some(2.0));
        assert!(screen.contains("step 40/100 (40.0%)"), "{screen}");
        assert!(screen.contains("loss 0.5123"), "{screen}");
        assert!(screen.contains("ETA 30s"), "{screen}");
        let lines: Vec<_> = screen.lines().collect();
        assert_eq!(lines.len(), 5, "{screen}");
        assert!(lines[4].contains("STRAGGLER") && !lines[3].contains("STRAGGLER"));
        assert!(lines[3].contains("1.5s"), "{screen}");
        // Without an observed rate the median step time gives the ETA: 60 steps x 2 s.
        assert!(render(&status, None).contains("ETA 2m00s"));
    }
}
