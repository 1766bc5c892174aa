//! Weights under the official names: PyTorch `.pth` import, strict key checking with every
//! offending key listed, buffer checks, and a lossless safetensors round trip.

use std::path::{Path, PathBuf};

use crate::common::{weights_of, Case};

use burn::backend::Autodiff;
use burn::tensor::{Tensor, TensorData};
use burn_flex::Flex;
use simmim_model::weights::{
    config_from_safetensors, load_state_dict, read_state_dict, state_dict,
    state_dict_from_safetensors, to_safetensors, HostTensor, StateDict,
};
use simmim_model::{mask_tensor, InitModel, ModelError, SimMimConfig};

type B = Autodiff<Flex>;

fn cases() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity-cases")
}

fn case_config(path: &Path) -> SimMimConfig {
    let bytes = std::fs::read(path).expect("case file");
    Case::from_safetensors(&bytes)
        .and_then(|case| case.model_config())
        .expect("case config")
}

fn loss_of(model: &simmim_model::SimMim<B>, state: &StateDict) -> f32 {
    let device = Default::default();
    let HostTensor::F32 { shape, values } = &state["input"] else {
        panic!("input")
    };
    let images = Tensor::<B, 4>::from_data(TensorData::new(values.clone(), shape.clone()), &device);
    let HostTensor::I64 { shape, values } = &state["mask"] else {
        panic!("mask")
    };
    let masks: Vec<u8> = values.iter().map(|&v| v as u8).collect();
    let mask = mask_tensor::<B>(&masks, shape[0], shape[1], &device);
    model.forward(images, mask).loss.into_scalar()
}

/// Reads `pth` (a PyTorch checkpoint of the weights of parity case `case`), checks every
/// tensor equals the case's, loads it into a fresh model and checks the case's loss.
/// Returns the state read from the `.pth`.
fn assert_pth_matches_case(case: &str, pth: &str) -> StateDict {
    let case = cases().join(case);
    let config = case_config(&case);
    let case_state = read_state_dict(&case).expect("case");
    let pth = read_state_dict(&cases().join(pth)).expect("read .pth");
    for (name, tensor) in &pth {
        assert_eq!(
            Some(tensor),
            case_state.get(name),
            "{name} differs between .pth and case"
        );
    }
    let model = config.init::<B>(5, &Default::default()).expect("init");
    let model = load_state_dict(model, &config, &pth).expect("load .pth");
    let HostTensor::F32 { values, .. } = &case_state["expected.loss"] else {
        panic!("loss")
    };
    let loss = loss_of(&model, &case_state);
    assert!(
        (loss - values[0]).abs() / values[0] < 1e-4,
        "{loss} vs {}",
        values[0]
    );
    pth
}

#[test]
fn pytorch_checkpoint_with_model_key_loads_and_reproduces_the_loss() {
    let pth = assert_pth_matches_case(
        "vit_shared_and_block_rpb.safetensors",
        "vit_shared_and_block_rpb.pth",
    );
    assert_eq!(
        pth.len(),
        61,
        "keys under `model`: {:?}",
        pth.keys().collect::<Vec<_>>()
    );
}

#[test]
fn plain_pytorch_state_dict_loads_with_its_buffers() {
    let pth = assert_pth_matches_case(
        "swin_window6_depth13_batch3.safetensors",
        "swin_window6_depth13_batch3.plain.pth",
    );
    // Parameters and the relative_position_index / attn_mask buffers, as torch.save wrote them.
    assert_eq!(pth.len(), 69);
    assert!(pth.contains_key("encoder.layers.0.blocks.0.attn.relative_position_index"));
    assert!(pth.contains_key("encoder.layers.1.blocks.1.attn_mask"));
}

/// An official SwinV2 checkpoint, saved by microsoft/Swin-Transformer's own module
/// (`tools/parity/check_official.py --pth`): every key, buffers included, loads.
#[test]
fn official_swinv2_checkpoint_loads_with_its_buffers() {
    let pth = assert_pth_matches_case(
        "swinv2_pretrained_window_ape_nonorm.safetensors",
        "swinv2_pretrained_window_ape_nonorm.official.pth",
    );
    for key in [
        "encoder.layers.0.blocks.0.attn.relative_coords_table",
        "encoder.layers.0.blocks.1.attn.cpb_mlp.0.weight",
        "encoder.layers.0.blocks.1.attn.cpb_mlp.2.weight",
        "encoder.layers.1.blocks.0.attn.logit_scale",
        "encoder.layers.1.blocks.0.attn.q_bias",
        "encoder.layers.0.downsample.norm.weight",
    ] {
        assert!(
            pth.contains_key(key),
            "{key} missing from the official checkpoint"
        );
    }
}

#[test]
fn mismatched_weights_list_every_offending_key() {
    let case = cases().join("vit_shared_and_block_rpb.safetensors");
    let config = case_config(&case);
    let mut state = weights_of(read_state_dict(&case).expect("read"));
    state.remove("encoder.blocks.1.mlp.fc1.bias");
    state.insert(
        "encoder.head.weight".into(),
        HostTensor::F32 {
            shape: vec![1],
            values: vec![0.0],
        },
    );
    state.insert(
        "encoder.cls_token".into(),
        HostTensor::F32 {
            shape: vec![1, 1, 7],
            values: vec![0.0; 7],
        },
    );
    let model = config.init::<B>(0, &Default::default()).expect("init");
    let err = load_state_dict(model, &config, &state).expect_err("must not load");
    let text = err.to_string();
    match err {
        ModelError::WeightMismatch {
            missing,
            unexpected,
            wrong_shape,
        } => {
            assert_eq!(missing, vec!["encoder.blocks.1.mlp.fc1.bias".to_string()]);
            assert_eq!(unexpected, vec!["encoder.head.weight".to_string()]);
            assert_eq!(wrong_shape.len(), 1);
            assert!(
                wrong_shape[0].starts_with("encoder.cls_token"),
                "{wrong_shape:?}"
            );
        }
        other => panic!("wrong error: {other}"),
    }
    assert!(
        text.contains("missing (1)") && text.contains("unexpected (1)"),
        "{text}"
    );
}

#[test]
fn a_buffer_from_another_geometry_is_refused() {
    let case = cases().join("vit_shared_and_block_rpb.safetensors");
    let config = case_config(&case);
    let mut state = weights_of(read_state_dict(&case).expect("read"));
    if let Some(HostTensor::I64 { values, .. }) =
        state.get_mut("encoder.rel_pos_bias.relative_position_index")
    {
        values[3] += 1;
    } else {
        panic!("case has the shared index");
    }
    let model = config.init::<B>(0, &Default::default()).expect("init");
    let err = load_state_dict(model, &config, &state).expect_err("must not load");
    assert!(
        matches!(&err, ModelError::BufferMismatch { name, .. } if name == "encoder.rel_pos_bias.relative_position_index"),
        "{err}"
    );
}

#[test]
fn safetensors_export_round_trips_with_official_keys_and_config() {
    for preset in ["swin_micro", "vit_base"] {
        let mut config = SimMimConfig::preset(preset).expect("preset");
        if let simmim_model::EncoderConfig::Vit(c) = &mut config.encoder {
            // Small enough for a test, same structure.
            c.img_size = 64;
            c.embed_dim = 48;
            c.depth = 2;
            c.num_heads = 3;
            config.mask_patch_size = 32;
        }
        let device = Default::default();
        let original = config.init::<B>(1, &device).expect("init");
        let state = state_dict(&original, &config).expect("state dict");
        let bytes = to_safetensors(&state, &config).expect("serialise");
        assert_eq!(
            config_from_safetensors(&bytes).expect("meta"),
            Some(config.clone())
        );
        let read = state_dict_from_safetensors(&bytes).expect("parse");
        assert_eq!(read, state);
        assert!(read.contains_key("decoder.0.weight"));
        assert!(read
            .keys()
            .all(|k| k.starts_with("encoder.") || k.starts_with("decoder.0.")));
        let other = config.init::<B>(2, &device).expect("init");
        let restored = load_state_dict(other, &config, &read).expect("load");
        assert_eq!(
            state_dict(&restored, &config).expect("state dict"),
            state,
            "{preset}"
        );
        if let Ok(dir) = std::env::var("SIMMIM_EXPORT_DIR") {
            std::fs::write(
                Path::new(&dir).join(format!("{preset}.safetensors")),
                &bytes,
            )
            .expect("write export");
        }
    }
}

#[test]
fn truncated_checkpoints_are_errors_that_name_the_file() {
    let dir = std::env::temp_dir().join(format!("simmim-truncated-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for name in [
        "vit_shared_and_block_rpb.safetensors",
        "vit_shared_and_block_rpb.pth",
    ] {
        let bytes = std::fs::read(cases().join(name)).expect("case");
        let truncated = dir.join(name);
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
        let err = read_state_dict(&truncated).expect_err("a truncated file must not load");
        assert!(
            matches!(&err, ModelError::Read { path, .. } if path.ends_with(name)),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
