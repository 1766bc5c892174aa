//! A batch computed as parallel sub-batches gives the full-batch loss and gradients.

use burn::backend::Autodiff;
use burn::tensor::{Tensor, TensorData};
use burn_flex::Flex;
use simmim_model::weights::{gradient_state_dict, HostTensor};
use simmim_model::{loss_and_grads, mask_tensor, InitModel};

use crate::common::small_swin_config;

type B = Autodiff<Flex>;

#[test]
fn sharded_gradients_equal_the_full_batch() {
    let config = small_swin_config();
    let device = Default::default();
    let model = config.init::<B>(11, &device).expect("init");
    let batch = 4;
    let geometry = config.mask_geometry().expect("geometry");
    let masks: Vec<u8> = (0..batch as u64)
        .flat_map(|i| geometry.generate(i))
        .collect();
    let side = geometry.token_grid();
    let values: Vec<f32> = (0..batch * 3 * 32 * 32)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let images = Tensor::<B, 4>::from_data(TensorData::new(values, [batch, 3, 32, 32]), &device);
    let mask = mask_tensor::<B>(&masks, batch, side, &device);

    let (full_loss, full) = loss_and_grads(&model, images.clone(), mask.clone(), 1);
    // Three shards of 1, 1 and 2 images: uneven on purpose.
    let (sharded_loss, sharded) = loss_and_grads(&model, images, mask, 3);
    assert!(
        ((full_loss - sharded_loss) / full_loss).abs() < 1e-6,
        "{full_loss} vs {sharded_loss}"
    );
    let full = gradient_state_dict::<B, _>(&model, &full).expect("grads");
    let sharded = gradient_state_dict::<B, _>(&model, &sharded).expect("grads");
    assert_eq!(full.len(), sharded.len());
    assert!(full.len() > 30);
    for (name, tensor) in &full {
        let (HostTensor::F32 { values: a, .. }, Some(HostTensor::F32 { values: b, .. })) =
            (tensor, sharded.get(name))
        else {
            panic!("{name} missing or not float");
        };
        let diff: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(
            diff <= 1e-4 * norm.max(1e-12),
            "{name}: relative difference {}",
            diff / norm
        );
    }
}
