//! `worker probe`: k-NN and linear-probe accuracy of an encoder's frozen, average-pooled
//! features, from any weights a user has (a run, a checkpoint, a .safetensors, an official
//! .pth).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use burn_flex::Flex;

pub struct ProbeArgs {
    pub weights: String,
    pub config: Option<PathBuf>,
    pub train: String,
    pub test: String,
    pub limits: (usize, usize),
    pub k: usize,
    pub stage: Option<usize>,
    pub json: bool,
}

pub fn probe_cli(args: ProbeArgs) -> Result<()> {
    use crate::eval::EvalSpec;
    use crate::probe::{feature_dim, probe, ProbeSets};
    use simmim_model::InitClassifier;
    let started = std::time::Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (weights, stored_config) =
        crate::weights_source::read_weights(&args.weights, runtime.handle())?;
    let model_config = match (&args.config, stored_config) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            simmim_proto::RunConfig::from_yaml(&text, &path.display().to_string())?
                .model_config()?
        }
        (None, Some(config)) => config,
        (None, None) => bail!(
            "{}: the weights do not say which model they are for; give --config run.yaml",
            args.weights
        ),
    };
    let sets = ProbeSets::open(&args.train, &args.test, args.limits, runtime.handle())?;
    let device = Default::default();
    let model = model_config.init_classifier::<Flex>(sets.classes, 0, &device)?;
    let (model, _) = simmim_model::weights::load_pretrained(model, &model_config, weights)?;
    let spec = EvalSpec {
        img_size: model_config.encoder.img_size(),
        crop_pct: None,
        batch: 256,
        rank: 0,
        world: 1,
    };
    let dim = feature_dim(&model_config.encoder, args.stage);
    let (knn, linear) = probe(
        &model.encoder,
        &sets,
        (args.stage, dim, args.k),
        &spec,
        &mut |_| Ok(()),
        &device,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "weights": args.weights, "knn_top1": knn, "linear_top1": linear, "k": args.k,
                "train_images": sets.train.len(), "test_images": sets.test.len(),
                "feature_dim": dim, "stage": args.stage, "seconds": seconds,
            })
        );
    } else {
        println!(
            "{}: k-NN (k={}) top-1 {:.2}%, linear probe top-1 {:.2}% ({} train / {} test images, {dim} features, {seconds:.1} s)",
            args.weights,
            args.k,
            100.0 * knn,
            100.0 * linear,
            sets.train.len(),
            sets.test.len()
        );
    }
    Ok(())
}
