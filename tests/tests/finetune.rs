//! The fine-tuning and probe pipeline end to end with the real binaries, scaled down: pretrain
//! with the probe on, fine-tune the result on two workers (layer decay, Mixup/CutMix, per-epoch
//! evaluation, best model kept), probe from the command line, start from an official-format
//! `.pth`, and refuse test classes that differ from the train classes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use simmim_tests::*;

const DEADLINE: Duration = Duration::from_secs(240);

/// Train and test ImageFolders with the same `classes` (the test one from another seed of
/// the same generator: same class signal, other images).
fn labelled_data(dir: &Path, classes: usize) -> (PathBuf, PathBuf) {
    let train = synthetic_image_folder(&dir.join("train"), classes, 24);
    let test = synthetic_image_folder(&dir.join("test"), classes, 6);
    (train, test)
}

fn with_data_lines(config: String, lines: &str) -> String {
    config.replace(
        "  loader_threads: 2\n",
        &format!("  loader_threads: 2\n{lines}"),
    )
}

fn run_ok(config: &Path, cwd: &Path, extra: &[&str]) {
    let mut args = vec!["start", "--config", config.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    let out = coordinator(&args, cwd, DEADLINE);
    assert!(
        out.status.success(),
        "coordinator failed:\n{}",
        stderr(&out)
    );
}

fn finetune_config(dir: &Path, name: &str, train: &Path, test: &Path, finetune: &str) -> PathBuf {
    let base = tiny_config_with(&dir.join("runs"), name, train, 2, 100, 8, "");
    let config = with_data_lines(
        base,
        &format!("  test: {}\n  labels_per_class: 16\n", test.display()),
    ) + &format!("finetune:\n{finetune}");
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config).expect("config");
    path
}

#[test]
fn pretrain_with_probe_then_finetune_on_two_workers_then_probe() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (train, test) = labelled_data(dir.path(), 3);

    // Pretraining with the probe every 5 steps.
    let pre = with_data_lines(
        tiny_config(&dir.path().join("runs"), "pre", &train, 2, 100),
        &format!("  test: {}\n", test.display()),
    ) + "probe:\n  every_steps: 5\n  k: 5\n";
    let pre_path = dir.path().join("pre.yaml");
    std::fs::write(&pre_path, pre).expect("config");
    run_ok(&pre_path, dir.path(), &[]);
    let pre_run = dir.path().join("runs/pre");
    let probed: Vec<_> = metrics(&pre_run)
        .into_iter()
        .filter(|m| m.get("probe_knn_top1").is_some())
        .collect();
    assert!(
        probed.len() >= 2,
        "the probe ran on its steps and at the end"
    );
    for m in &probed {
        for key in ["probe_knn_top1", "probe_linear_top1"] {
            let v = m[key].as_f64().expect("a number");
            assert!((0.0..=1.0).contains(&v), "{key} = {v}");
        }
    }

    // Fine-tuning from that run, on two workers, with Mixup/CutMix.
    let ft = finetune_config(
        dir.path(),
        "ft",
        &train,
        &test,
        &format!(
            "  pretrained: {}\n  layer_decay: 0.8\n  mixup: 0.8\n  cutmix: 1.0\n  test_crop_pct: 0.875\n  rand_augment: {{layers: 2, magnitude: 9}}\n",
            pre_run.display()
        ),
    );
    let text = std::fs::read_to_string(&ft).expect("config");
    std::fs::write(
        &ft,
        text.replace("workers:\n", "workers:\n  min: 2\n  max: 2\n"),
    )
    .expect("config");
    run_ok(&ft, dir.path(), &["--local-workers", "2"]);
    let ft_run = dir.path().join("runs/ft");
    let rows = metrics(&ft_run);
    // 3 classes x 16 labelled images = 48: 3 steps of 2 x 8 per epoch, 2 epochs.
    assert_eq!(rows.len(), 6, "{rows:?}");
    let evals: Vec<_> = rows
        .iter()
        .filter(|m| m.get("eval_top1").is_some())
        .collect();
    assert_eq!(evals.len(), 2, "one evaluation per epoch");
    for m in &evals {
        let (top1, top5) = (
            m["eval_top1"].as_f64().expect("top1"),
            m["eval_top5"].as_f64().expect("top5"),
        );
        assert!((0.0..=1.0).contains(&top1) && top1 <= top5, "{m}");
        // Three classes: every label is within the top 5.
        assert_eq!(top5, 1.0, "{m}");
    }
    let best: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ft_run.join("best/best.json")).expect("best.json"))
            .expect("json");
    let best_top1 = best["top1"].as_f64().expect("top1");
    let max_top1 = evals
        .iter()
        .map(|m| m["eval_top1"].as_f64().unwrap_or(0.0))
        .fold(0.0, f64::max);
    assert_eq!(best_top1, max_top1, "best.json keeps the best evaluation");
    assert!(ft_run.join("best/model.safetensors").is_file());
    let head = tensors(&std::fs::read(ft_run.join("best/model.safetensors")).expect("best"));
    assert_eq!(head["head.weight"].len(), 3 * 32, "3 classes x 32 features");
    let log = std::fs::read_to_string(ft_run.join("logs/worker-0.log")).expect("log");
    assert!(log.contains("encoder loaded from"), "{log}");

    // The probe from the command line, on the pretraining run.
    let out = Command::new(binary("worker"))
        .args(["probe", "--weights"])
        .arg(&pre_run)
        .arg("--train")
        .arg(&train)
        .arg("--test")
        .arg(&test)
        .args(["--k", "5", "--json"])
        .output()
        .expect("worker probe");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json line");
    assert_eq!(
        result["train_images"], 73,
        "listed images, corrupt one included"
    );
    assert_eq!(result["feature_dim"], 32);
    for key in ["knn_top1", "linear_top1"] {
        let v = result[key].as_f64().expect("a number");
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }
}

#[test]
fn finetuning_starts_from_an_official_pth_with_another_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (train, test) = labelled_data(dir.path(), 2);
    let pth =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/swin_official.pth");
    // The fixture's geometry (img 40, patch 2, embed 16, one stage, 2 heads) at window 5
    // where it was pretrained at window 4: the tables are resized on load.
    let config = finetune_config(
        dir.path(),
        "official",
        &train,
        &test,
        &format!("  pretrained: {}\n", pth.display()),
    )
    .to_path_buf();
    let text = std::fs::read_to_string(&config)
        .expect("config")
        .replace("img_size: 16", "img_size: 40")
        .replace("depths: [1, 1]", "depths: [2]")
        .replace("num_heads: [1, 2]", "num_heads: [2]")
        .replace("window_size: 4", "window_size: 5")
        .replace("epochs: 2", "epochs: 1");
    std::fs::write(&config, text).expect("config");
    run_ok(&config, dir.path(), &[]);
    let run = dir.path().join("runs/official");
    let log = std::fs::read_to_string(run.join("logs/worker-0.log")).expect("log");
    assert!(log.contains("resized=2"), "both tables resized: {log}");
    assert!(metrics(&run).iter().any(|m| m.get("eval_top1").is_some()));
}

#[test]
fn test_classes_that_differ_from_train_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (train, test) = labelled_data(dir.path(), 3);
    std::fs::rename(test.join("class_2"), test.join("class_9")).expect("rename");
    let config = finetune_config(
        dir.path(),
        "mismatch",
        &train,
        &test,
        "  layer_decay: 0.9\n",
    );
    let out = coordinator(
        &["start", "--config", config.to_str().expect("utf8")],
        dir.path(),
        DEADLINE,
    );
    assert!(
        !out.status.success(),
        "mismatched classes must fail the run"
    );
    let err = stderr(&out);
    assert!(
        err.contains("missing [class_2]") && err.contains("extra [class_9]"),
        "the error names the differing folders:\n{err}"
    );
}
