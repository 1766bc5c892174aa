//! Layer-wise learning-rate decay for fine-tuning, with the official SimMIM layer assignment
//! (`get_swin_layer` / `get_vit_layer` in `optimizer.py`): a parameter at layer `i` of `n`
//! trains at `decay^(n - 1 - i)` times the learning rate, so the pretrained bottom moves
//! least and the fresh head most.

use std::collections::HashMap;

use crate::config::EncoderConfig;

/// Layers counted by the decay: patch embedding (0), one per block, and the top (head and
/// final norm).
pub fn num_layers(encoder: &EncoderConfig) -> usize {
    match encoder {
        EncoderConfig::Swin(c) | EncoderConfig::Swinv2(c) => c.depths.iter().sum::<usize>() + 2,
        EncoderConfig::Vit(c) => c.depth + 2,
    }
}

/// The layer of a parameter, by its official name (with or without the `encoder.` prefix).
pub fn layer_id(name: &str, encoder: &EncoderConfig) -> usize {
    let top = num_layers(encoder) - 1;
    let name = name.strip_prefix("encoder.").unwrap_or(name);
    let parts: Vec<&str> = name.split('.').collect();
    match encoder {
        // SwinV2 fine-tunes with the same `get_swin_layer` (its config's depths).
        EncoderConfig::Swin(c) | EncoderConfig::Swinv2(c) => {
            if name == "mask_token" || name.starts_with("patch_embed") {
                return 0;
            }
            if parts.first() == Some(&"layers") && parts.len() > 3 {
                let Ok(stage) = parts[1].parse::<usize>() else {
                    return top;
                };
                let before: usize = c.depths.iter().take(stage).sum();
                // Merging layers (`layers.i.downsample.{reduction,norm}`) go with the stage's
                // last block.
                if parts[2] == "downsample" {
                    return before + c.depths.get(stage).copied().unwrap_or(0);
                }
                if let Ok(block) = parts[3].parse::<usize>() {
                    return before + block + 1;
                }
            }
            top
        }
        EncoderConfig::Vit(_) => {
            if matches!(name, "cls_token" | "mask_token" | "pos_embed")
                || name.starts_with("patch_embed")
            {
                return 0;
            }
            if parts.first() == Some(&"blocks") && parts.len() > 1 {
                if let Ok(block) = parts[1].parse::<usize>() {
                    return block + 1;
                }
            }
            top
        }
    }
}

/// The learning-rate multiplier of each named parameter for `decay` (1.0 turns it off).
pub fn lr_scales<'a>(
    names: impl IntoIterator<Item = &'a str>,
    encoder: &EncoderConfig,
    decay: f64,
) -> HashMap<String, f64> {
    let top = num_layers(encoder) - 1;
    names
        .into_iter()
        .map(|name| {
            let depth_from_top = top - layer_id(name, encoder).min(top);
            (name.to_string(), decay.powi(depth_from_top as i32))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SimMimConfig;

    fn swin() -> EncoderConfig {
        let mut config = SimMimConfig::preset("swin_micro").expect("preset").encoder;
        if let EncoderConfig::Swin(c) = &mut config {
            c.depths = vec![2, 2, 6, 2];
        }
        config
    }

    #[test]
    fn swin_layers_follow_the_official_assignment() {
        let e = swin();
        assert_eq!(num_layers(&e), 14);
        let cases = [
            ("encoder.patch_embed.proj.weight", 0),
            ("encoder.mask_token", 0),
            ("encoder.absolute_pos_embed", 13),
            ("encoder.layers.0.blocks.0.attn.qkv.weight", 1),
            ("encoder.layers.0.blocks.1.norm1.weight", 2),
            ("encoder.layers.0.downsample.reduction.weight", 2),
            ("encoder.layers.0.downsample.norm.bias", 2),
            ("encoder.layers.1.blocks.0.mlp.fc1.weight", 3),
            (
                "encoder.layers.2.blocks.5.attn.relative_position_bias_table",
                10,
            ),
            ("encoder.layers.2.downsample.reduction.weight", 10),
            ("encoder.layers.3.blocks.1.mlp.fc2.bias", 12),
            ("encoder.norm.weight", 13),
            ("head.weight", 13),
            // Without the prefix, as in an official fine-tuned checkpoint.
            ("layers.3.blocks.0.norm2.weight", 11),
        ];
        for (name, layer) in cases {
            assert_eq!(layer_id(name, &e), layer, "{name}");
        }
    }

    #[test]
    fn vit_layers_follow_the_official_assignment() {
        let e = SimMimConfig::preset("vit_base").expect("preset").encoder;
        assert_eq!(num_layers(&e), 14);
        for (name, layer) in [
            ("encoder.cls_token", 0),
            ("encoder.pos_embed", 0),
            ("encoder.patch_embed.proj.weight", 0),
            ("encoder.blocks.0.attn.qkv.weight", 1),
            ("encoder.blocks.11.mlp.fc2.weight", 12),
            ("encoder.rel_pos_bias.relative_position_bias_table", 13),
            ("encoder.norm.weight", 13),
            ("head.bias", 13),
        ] {
            assert_eq!(layer_id(name, &e), layer, "{name}");
        }
    }

    #[test]
    fn scales_decay_geometrically_from_the_top() {
        let e = swin();
        let scales = lr_scales(
            [
                "head.weight",
                "encoder.layers.3.blocks.1.mlp.fc1.weight",
                "encoder.patch_embed.proj.weight",
            ],
            &e,
            0.9,
        );
        assert_eq!(scales["head.weight"], 1.0);
        assert!((scales["encoder.layers.3.blocks.1.mlp.fc1.weight"] - 0.9).abs() < 1e-12);
        assert!((scales["encoder.patch_embed.proj.weight"] - 0.9f64.powi(13)).abs() < 1e-12);
    }
}
