//! Fine-tuning's model side against fixtures made once with PyTorch
//! (`tests/fixtures/make_official_swin.py`): an official-format SimMIM checkpoint loads into
//! the classifier, and relative-position tables resized for a new window match
//! `F.interpolate(mode="bicubic")`.

use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use burn_flex::Flex;
use simmim_model::weights::{load_pretrained, read_state_dict, state_dict, HostTensor};
use simmim_model::{EncoderConfig, InitClassifier, InitModel, SimMimConfig};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The fixture's geometry (one stage, window 4), with the window given.
fn config(window: usize) -> SimMimConfig {
    let mut config = SimMimConfig::preset("swin_micro").expect("preset");
    if let EncoderConfig::Swin(c) = &mut config.encoder {
        (c.img_size, c.patch_size, c.embed_dim) = (40, 2, 16);
        (c.depths, c.num_heads, c.window_size) = (vec![2], vec![2], window);
    }
    config.mask_patch_size = 4;
    config.validate().expect("valid config");
    config
}

fn f32s(t: &HostTensor) -> &[f32] {
    match t {
        HostTensor::F32 { values, .. } => values,
        HostTensor::I64 { .. } => panic!("not a float tensor"),
    }
}

fn assert_close(a: &[f32], b: &[f32], tolerance: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst <= tolerance, "{what}: max difference {worst}");
}

#[test]
fn an_official_simmim_checkpoint_loads_into_the_classifier() {
    let official = read_state_dict(&fixture("swin_official.pth")).expect("read .pth");
    let config = config(4);
    let device = Default::default();
    let model = config
        .init_classifier::<Flex>(7, 0, &device)
        .expect("classifier");
    let (model, report) = load_pretrained(model, &config, official.clone()).expect("load");
    assert!(report.resized.is_empty());
    assert!(
        !report.head_loaded,
        "a SimMIM checkpoint has no classifier head"
    );
    assert!(report.dropped.iter().any(|k| k == "decoder.0.weight"));
    assert!(report
        .dropped
        .iter()
        .any(|k| k.ends_with("relative_position_index")));

    let loaded = state_dict(&model, &config).expect("state dict");
    for (name, tensor) in &official {
        if name.starts_with("encoder.") && matches!(tensor, HostTensor::F32 { .. }) {
            if name.ends_with("attn_mask") {
                continue; // derived from the geometry, not loaded
            }
            assert_close(f32s(&loaded[name]), f32s(tensor), 0.0, name);
        }
    }
    assert_eq!(loaded["head.weight"].shape(), &[7, 16]);

    // The loaded classifier computes logits for a batch.
    let images = Tensor::<Flex, 4>::from_data(
        TensorData::new(
            (0..2 * 3 * 40 * 40)
                .map(|i| ((i % 17) as f32 - 8.0) / 8.0)
                .collect::<Vec<_>>(),
            [2, 3, 40, 40],
        ),
        &device,
    );
    let logits: Vec<f32> = model.forward(images).into_data().to_vec().expect("logits");
    assert_eq!(logits.len(), 14);
    assert!(logits.iter().all(|v| v.is_finite()));
}

#[test]
fn tables_are_resized_as_pytorch_bicubic_when_the_window_changes() {
    let official = read_state_dict(&fixture("swin_official.pth")).expect("read .pth");
    let expected = read_state_dict(&fixture("swin_tables_w5.pth")).expect("read tables");
    let config = config(5);
    let model = config
        .init_classifier::<Flex>(10, 0, &Default::default())
        .expect("classifier");
    let (model, report) = load_pretrained(model, &config, official).expect("load");
    assert_eq!(report.resized.len(), 2);
    let loaded = state_dict(&model, &config).expect("state dict");
    for (name, table) in &expected {
        assert_eq!(loaded[name].shape(), &[81, 2], "{name}");
        assert_close(f32s(&loaded[name]), f32s(table), 1e-5, name);
    }
}

#[test]
fn a_checkpoint_for_another_architecture_is_refused_with_the_keys_named() {
    let mut official = read_state_dict(&fixture("swin_official.pth")).expect("read .pth");
    official.remove("encoder.layers.0.blocks.1.mlp.fc2.weight");
    let config = config(4);
    let model = config
        .init_classifier::<Flex>(10, 0, &Default::default())
        .expect("classifier");
    let error = load_pretrained(model, &config, official)
        .expect_err("a missing tensor must fail")
        .to_string();
    assert!(
        error.contains("encoder.layers.0.blocks.1.mlp.fc2.weight"),
        "{error}"
    );
}

#[test]
fn a_simmim_vit_checkpoint_becomes_a_vit_classifier() {
    let mut config = SimMimConfig::preset("vit_base").expect("preset");
    if let EncoderConfig::Vit(c) = &mut config.encoder {
        (c.img_size, c.patch_size, c.embed_dim, c.depth, c.num_heads) = (32, 8, 32, 2, 2);
    }
    config.mask_patch_size = 8;
    config.validate().expect("valid config");
    let device = Default::default();
    // A pretraining model's weights, as its checkpoint holds them.
    let pretrained = {
        use simmim_model::InitModel;
        let model = config.init::<Flex>(5, &device).expect("SimMIM model");
        state_dict(&model, &config).expect("state dict")
    };
    let model = config
        .init_classifier::<Flex>(4, 1, &device)
        .expect("classifier");
    let (model, report) = load_pretrained(model, &config, pretrained.clone()).expect("load");
    assert!(!report.head_loaded);
    let loaded = state_dict(&model, &config).expect("state dict");
    assert_close(
        f32s(&loaded["encoder.blocks.1.mlp.fc2.weight"]),
        f32s(&pretrained["encoder.blocks.1.mlp.fc2.weight"]),
        0.0,
        "a ViT block weight",
    );
    let images = Tensor::<Flex, 4>::from_data(
        TensorData::new(vec![0.25f32; 3 * 3 * 32 * 32], [3, 3, 32, 32]),
        &device,
    );
    assert_eq!(model.forward(images).dims(), [3, 4]);
}

/// SwinV2 pretrained at window 4 fine-tunes at window 8 as the official recipe does
/// (`PRETRAINED_WINDOW_SIZES`): every weight carries over unchanged (the position-bias MLP
/// has no window-sized table to resize), the coordinates are recomputed for the new window
/// and normalised by the pretrained one, and the classifier runs.
#[test]
fn swinv2_pretrained_at_one_window_finetunes_at_another() {
    let v2 = |window: usize, pretrained: Option<Vec<usize>>| {
        let mut config = SimMimConfig::preset("swinv2_micro").expect("preset");
        if let Some(c) = config.encoder.swin_mut() {
            (c.img_size, c.patch_size, c.embed_dim) = (64, 4, 16);
            (c.depths, c.num_heads, c.window_size) = (vec![2, 2], vec![2, 4], window);
            c.pretrained_window_sizes = pretrained;
        }
        config.mask_patch_size = 16;
        config.validate().expect("valid config");
        config
    };
    let device = Default::default();
    let pretrain = v2(4, None);
    let pretrained = pretrain.init::<Flex>(3, &device).expect("pretrain model");
    let weights = state_dict(&pretrained, &pretrain).expect("state dict");
    let finetune = v2(8, Some(vec![4, 4]));
    let model = finetune
        .init_classifier::<Flex>(10, 4, &device)
        .expect("classifier");
    let (model, report) = load_pretrained(model, &finetune, weights.clone()).expect("load");
    assert!(report.resized.is_empty(), "{:?}", report.resized);
    assert!(report
        .dropped
        .iter()
        .any(|k| k.ends_with("relative_coords_table")));
    let loaded = state_dict(&model, &finetune).expect("state dict");
    let cpb = "encoder.layers.0.blocks.1.attn.cpb_mlp.0.weight";
    assert_close(f32s(&loaded[cpb]), f32s(&weights[cpb]), 0.0, cpb);
    // Window 8 at stage 0: 15x15 offsets, each divided by the pretrained window's 3.
    let coords = &loaded["encoder.layers.0.blocks.0.attn.relative_coords_table"];
    assert_eq!(coords.shape(), &[1, 15, 15, 2]);
    let largest = f32s(coords).iter().fold(0f32, |m, v| m.max(v.abs()));
    let expected = ((7.0f32 / 3.0 * 8.0) + 1.0).log2() / 3.0;
    assert!((largest - expected).abs() < 1e-5, "{largest} vs {expected}");
    let images = Tensor::<Flex, 4>::from_data(
        TensorData::new(vec![0.1f32; 2 * 3 * 64 * 64], [2, 3, 64, 64]),
        &device,
    );
    let logits = model.forward(images);
    assert_eq!(logits.dims(), [2, 10]);
}
