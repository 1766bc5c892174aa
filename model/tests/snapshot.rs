//! A snapshot written on the side gives exactly the bytes' meaning of the direct path
//! (`state_dict` + `to_safetensors`), and the step loop may go on training meanwhile: the
//! snapshot keeps the weights of the step it was taken at.

use burn::backend::Autodiff;
use burn_flex::Flex;
use simmim_model::weights::snapshot::Snapshot;
use simmim_model::weights::{config_from_safetensors, state_dict, state_dict_from_safetensors};
use simmim_model::{AdamW, AdamWConfig, InitModel};

use crate::common::{fixed_step, small_swin_config};

type B = Autodiff<Flex>;

#[test]
fn a_snapshot_writes_the_state_of_its_step_while_training_goes_on() {
    let config = small_swin_config();
    let device = Default::default();
    let step = fixed_step(&config, (17, 89, 44.0));
    let mut model = config.init::<B>(3, &device).expect("init");
    let mut optimizer = AdamW::<Flex>::new(AdamWConfig::default());
    for _ in 0..2 {
        model = step(model, &mut optimizer);
    }
    let weights = state_dict(&model, &config).expect("state dict");
    let moments = optimizer.state_dict::<B, _>(&model).expect("moments");

    let snapshot = Snapshot::take(&model, &optimizer, &config);
    // Training moves on before the snapshot is written.
    for _ in 0..2 {
        model = step(model, &mut optimizer);
    }
    let (weight_bytes, moment_bytes) = std::thread::spawn(move || snapshot.into_safetensors())
        .join()
        .expect("writer thread")
        .expect("snapshot bytes");

    assert_eq!(
        state_dict_from_safetensors(&weight_bytes).expect("weights"),
        weights
    );
    assert_eq!(
        state_dict_from_safetensors(&moment_bytes).expect("moments"),
        moments
    );
    assert_eq!(
        config_from_safetensors(&weight_bytes).expect("metadata"),
        Some(config.clone())
    );
    // The live model did move on: the snapshot is not just the current state.
    assert_ne!(state_dict(&model, &config).expect("state dict"), weights);
    assert!(weights.len() > 10 && moments.len() > 10);
}
