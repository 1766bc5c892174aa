//! AdamW state saved under the official names and restored gives the same next step as an
//! optimizer that never stopped: what a resumed run needs.

use burn::backend::Autodiff;
use burn_flex::Flex;
use simmim_model::weights::{load_state_dict, state_dict, HostTensor};
use simmim_model::{AdamW, AdamWConfig, InitModel, ModelError};

use crate::common::{fixed_step, small_swin_config};

type B = Autodiff<Flex>;

#[test]
fn saved_and_restored_adamw_continues_identically() {
    let config = small_swin_config();
    let device = Default::default();
    let step = fixed_step(&config, (31, 97, 48.0));

    let mut model = config.init::<B>(5, &device).expect("init");
    let mut optimizer = AdamW::<Flex>::new(AdamWConfig::default());
    for _ in 0..2 {
        model = step(model, &mut optimizer);
    }
    let weights = state_dict(&model, &config).expect("state dict");
    let moments = optimizer.state_dict::<B, _>(&model).expect("moments");
    assert_eq!(
        moments["step"],
        HostTensor::I64 {
            shape: vec![1],
            values: vec![2]
        }
    );
    let qkv = &moments["encoder.layers.0.blocks.0.attn.qkv.weight.exp_avg_sq"];
    assert_eq!(qkv.shape(), &[144, 48], "official [out, in] layout");

    let mut restored = load_state_dict(
        config.init::<B>(6, &device).expect("init"),
        &config,
        &weights,
    )
    .expect("weights");
    let mut restored_optimizer = AdamW::<Flex>::new(AdamWConfig::default());
    restored_optimizer
        .load_state_dict::<B, _>(&restored, &moments, &device)
        .expect("optimizer state");
    assert_eq!(restored_optimizer.steps_taken(), 2);

    model = step(model, &mut optimizer);
    restored = step(restored, &mut restored_optimizer);
    assert_eq!(
        state_dict(&model, &config).expect("state dict"),
        state_dict(&restored, &config).expect("state dict")
    );

    // A state from another model is refused with the offending keys.
    let mut bad = moments.clone();
    bad.remove("encoder.norm.weight.exp_avg");
    bad.insert(
        "encoder.head.exp_avg".into(),
        HostTensor::F32 {
            shape: vec![1],
            values: vec![0.0],
        },
    );
    let err = AdamW::<Flex>::new(AdamWConfig::default())
        .load_state_dict::<B, _>(&restored, &bad, &device)
        .expect_err("must refuse");
    match err {
        ModelError::WeightMismatch {
            missing,
            unexpected,
            ..
        } => {
            assert_eq!(missing, vec!["encoder.norm.weight".to_string()]);
            assert_eq!(unexpected, vec!["encoder.head.exp_avg".to_string()]);
        }
        other => panic!("wrong error {other}"),
    }
}
