//! Checkpoint of swin_base (88M parameters plus AdamW moments) to a local S3-compatible
//! server (moto_server from .venv-tools) and to a local directory: how long the step loop
//! stalls (serialising the state off the device) and how long the background upload takes,
//! beside the same bytes sent by boto3 (the server's own pace).
//!
//! `cargo bench -p simmim-worker --bench checkpoint`

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use burn::tensor::{Distribution, Tensor};
use burn_flex::Flex;
use bytes::Bytes;
use simmim_model::{loss_and_grads, mask_tensor, AdamW, AdamWConfig, InitModel, SimMimConfig};
use simmim_proto::store::RunStore;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type B = Autodiff<Flex>;

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let config = SimMimConfig::preset("swin_base").expect("preset");
    let device = Default::default();
    let model = config.init::<B>(0, &device).expect("model");
    // One real step on one image so the optimizer has its moments.
    let geometry = config.mask_geometry().expect("geometry");
    let mask = mask_tensor::<B>(&geometry.generate(0), 1, geometry.token_grid(), &device);
    let images = Tensor::<B, 4>::random([1, 3, 192, 192], Distribution::Normal(0.0, 1.0), &device);
    let (_, grads) = loss_and_grads(&model, images, mask, 1);
    let mut optimizer = AdamW::new(AdamWConfig::default());
    let (model, _) = optimizer.step(1e-4, model, grads);

    let started = Instant::now();
    let (weights, moments) =
        simmim_worker::checkpoint::serialise(&model, &config, &optimizer).expect("serialise");
    let stall = started.elapsed().as_secs_f64();
    let total = (weights.len() + moments.len()) as f64 / 1e6;
    println!(
        "checkpoint: model {:.0} MB + AdamW state {:.0} MB = {total:.0} MB",
        weights.len() as f64 / 1e6,
        moments.len() as f64 / 1e6
    );
    println!("training stall (serialise off the device): {stall:.2} s");
    println!();
    println!("| target | upload s | MB/s |");
    println!("|---|---|---|");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (weights, moments) = (Bytes::from(weights), Bytes::from(moments));
    let upload = |store: &RunStore| {
        let started = Instant::now();
        runtime.block_on(async {
            // Both objects at once, as the worker's checkpoint upload does.
            let (a, b) = futures::join!(
                store.put_large("checkpoints/0000000001/model.safetensors", weights.clone()),
                store.put_large(
                    "checkpoints/0000000001/optimizer.safetensors",
                    moments.clone()
                )
            );
            a.expect("model");
            b.expect("moments");
        });
        started.elapsed().as_secs_f64()
    };

    let dir = tempfile::tempdir().expect("tempdir");
    let local = RunStore::open(
        url::Url::from_directory_path(dir.path())
            .expect("url")
            .as_str(),
    )
    .expect("local");
    let seconds = upload(&local);
    println!(
        "| local directory (file://) | {seconds:.2} | {:.0} |",
        total / seconds
    );

    let moto = root.join(".venv-tools/bin/moto_server");
    if !moto.exists() {
        println!(
            "| S3 (moto_server) | not run: {} missing (scripts/test.sh installs it) | |",
            moto.display()
        );
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let mut server = Command::new(&moto)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server");
    let endpoint = format!("http://127.0.0.1:{port}");
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
    ] {
        // SAFETY-free: set before any other thread reads the environment.
        unsafe { std::env::set_var(k, v) };
    }
    let python = root.join(".venv-tools/bin/python");
    let boto = |script: &str| {
        Command::new(&python)
            .args(["-c", script])
            .output()
            .expect("python")
    };
    let wait = Instant::now();
    while wait.elapsed() < Duration::from_secs(60) {
        if boto(&format!("import boto3; boto3.client('s3', endpoint_url='{endpoint}', region_name='us-east-1', aws_access_key_id='b', aws_secret_access_key='b').create_bucket(Bucket='bench')")).status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let s3 = RunStore::open("s3://bench/run").expect("s3");
    let seconds = upload(&s3);
    println!("| S3 (moto_server on loopback), ours: multipart, 8 MB parts, 8 in flight | {seconds:.2} | {:.0} |", total / seconds);

    let file = dir.path().join("blob");
    std::fs::write(&file, [&weights[..], &moments[..]].concat()).expect("blob");
    let script = format!(
        "import boto3, time\nc = boto3.client('s3', endpoint_url='{endpoint}', region_name='us-east-1', aws_access_key_id='b', aws_secret_access_key='b')\nt = time.time()\nc.upload_file('{}', 'bench', 'boto/blob')\nprint(time.time() - t)",
        file.display()
    );
    let out = boto(&script);
    let seconds: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(f64::NAN);
    println!(
        "| S3 (moto_server on loopback), boto3 upload_file (its defaults) | {seconds:.2} | {:.0} |",
        total / seconds
    );
    let _ = server.kill();
    let _ = server.wait();
}
