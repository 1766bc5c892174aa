//! The bridge between Burn's module tree and the official PyTorch parameter names.
//!
//! The modules mirror the official tree, so a parameter's Burn path is its official name
//! except for three conventions: Burn's LayerNorm calls its affine parameters `gamma`/`beta`
//! (PyTorch: `weight`/`bias`), Burn's Linear stores its weight `[in, out]` (PyTorch:
//! `[out, in]`), and the head is a bare module here but `nn.Sequential` index 0 officially.
//! Keeping that translation in one place means nothing else in the crate deals with names.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{backend::Backend, Tensor};

/// A parameter's official name and whether its tensor is stored transposed in Burn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfficialName {
    pub name: String,
    pub transposed: bool,
}

/// Follows `enter_module`/`exit_module` calls to know where a visited parameter sits.
#[derive(Debug, Default)]
pub struct PathTracker {
    names: Vec<String>,
    parents: Vec<String>,
}

impl PathTracker {
    pub fn enter(&mut self, name: &str, container: &str) {
        self.parents.push(container.to_string());
        // Enum variants (Swin / Vit) are not part of the official names.
        if !container.starts_with("Enum:") {
            self.names.push(name.to_string());
        }
    }

    pub fn exit(&mut self, container: &str) {
        self.parents.pop();
        if !container.starts_with("Enum:") {
            self.names.pop();
        }
    }

    /// The official name of the parameter being visited now.
    pub fn official(&self) -> OfficialName {
        let parent = self.parents.last().map(String::as_str).unwrap_or("");
        let mut parts: Vec<&str> = self.names.iter().map(String::as_str).collect();
        let mut transposed = false;
        if let Some(last) = parts.last_mut() {
            match (parent, *last) {
                ("Struct:LayerNorm", "gamma") => *last = "weight",
                ("Struct:LayerNorm", "beta") => *last = "bias",
                ("Struct:Linear", "weight") => transposed = true,
                _ => {}
            }
        }
        // SwinV2's position-bias MLP is an `nn.Sequential` too (a ReLU at index 1).
        if let Some(at) = parts.iter().position(|p| *p == "cpb_mlp") {
            match parts.get(at + 1).copied() {
                Some("hidden") => parts[at + 1] = "0",
                Some("output") => parts[at + 1] = "2",
                _ => {}
            }
        }
        // The head is an `nn.Sequential` officially: the linear head's conv is `decoder.0`;
        // the MLP head's convs are `decoder.0` and `decoder.2` (a GELU sits at index 1).
        // The inverse Swin head is a module tree, named as it is (`decoder.layers.0...`).
        if parts.first() == Some(&"decoder") {
            match parts.get(1).copied() {
                Some("weight" | "bias") => parts.insert(1, "0"),
                Some("hidden") => parts[1] = "0",
                Some("output") => parts[1] = "2",
                // The inverse Swin head's modules carry their own names.
                _ => {}
            }
        }
        OfficialName {
            name: parts.join("."),
            transposed,
        }
    }
}

/// Description of one trainable parameter under its official name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    pub name: String,
    pub id: ParamId,
    /// Shape in the official (PyTorch) layout.
    pub shape: Vec<usize>,
    pub transposed: bool,
}

/// Every float parameter of `module`, in module order, with its official name and shape.
pub fn parameters<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamInfo> {
    struct Lister {
        tracker: PathTracker,
        out: Vec<ParamInfo>,
    }
    impl<B: Backend> ModuleVisitor<B> for Lister {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.tracker.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, container_type: &str) {
            self.tracker.exit(container_type);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let official = self.tracker.official();
            let mut shape = param.dims().to_vec();
            if official.transposed {
                shape.reverse();
            }
            self.out.push(ParamInfo {
                name: official.name,
                id: param.id,
                shape,
                transposed: official.transposed,
            });
        }
    }
    let mut lister = Lister {
        tracker: PathTracker::default(),
        out: Vec::new(),
    };
    module.visit::<Lister>(&mut lister);
    lister.out
}

/// The official code's weight-decay rule: no decay for 1-D parameters, biases, position
/// embeddings, relative position bias tables and the cls/mask tokens.
///
/// SwinV2 adds `cpb_mlp` and `logit_scale` to its no-decay keywords, and the official
/// optimizer matches keywords as substrings of the parameter name. In pretraining the SimMIM
/// wrapper prefixes its encoder's keywords (`encoder.cpb_mlp`), which no parameter name
/// contains (`encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight`), so there the MLP's weights
/// and the `[heads, 1, 1]` logit scale do decay; the fine-tuned encoder's names carry no
/// prefix, the keywords match, and they do not. Both are followed here: the pretraining
/// model's names start with `encoder.`, the classifier's do not. (The same prefix would let
/// v1's bias tables decay in pretraining too; the parity fixtures exempt them, and so does
/// this rule.)
pub fn takes_weight_decay(name: &str, shape: &[usize]) -> bool {
    const FINETUNE_NO_DECAY_KEYWORDS: [&str; 2] = ["cpb_mlp", "logit_scale"];
    if !name.starts_with("encoder.") && FINETUNE_NO_DECAY_KEYWORDS.iter().any(|k| name.contains(k))
    {
        return false;
    }
    const NO_DECAY_KEYWORDS: [&str; 5] = [
        "relative_position_bias_table",
        "absolute_pos_embed",
        "pos_embed",
        "cls_token",
        "mask_token",
    ];
    !(shape.len() == 1
        || name.ends_with(".bias")
        || NO_DECAY_KEYWORDS.iter().any(|k| name.contains(k)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoders::Encoder;
    use crate::{InitModel, SimMimConfig};
    use burn_flex::Flex;

    /// A preset's model and its parameters under their official names.
    fn preset_parameters(preset: &str) -> (crate::SimMim<Flex>, Vec<ParamInfo>) {
        let config = SimMimConfig::preset(preset).expect("preset");
        let model = config.init::<Flex>(0, &Default::default()).expect("init");
        let params = parameters::<Flex, _>(&model);
        (model, params)
    }

    fn find<'a>(params: &'a [ParamInfo], name: &str) -> &'a ParamInfo {
        params
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no parameter {name}"))
    }

    #[test]
    fn official_names_and_weight_decay_groups() {
        let (_, params) = preset_parameters("swin_micro");
        let find = |name: &str| find(&params, name);
        let qkv = find("encoder.layers.0.blocks.1.attn.qkv.weight");
        assert_eq!(qkv.shape, vec![144, 48]);
        assert!(qkv.transposed);
        assert_eq!(find("decoder.0.weight").shape, vec![768, 384, 1, 1]);
        assert_eq!(
            find("encoder.layers.3.blocks.1.norm2.weight").shape,
            vec![384]
        );
        let decays: Vec<(&str, bool)> = [
            "encoder.patch_embed.proj.weight",
            "encoder.patch_embed.proj.bias",
            "encoder.patch_embed.norm.weight",
            "encoder.mask_token",
            "encoder.layers.0.blocks.0.attn.relative_position_bias_table",
            "encoder.layers.0.blocks.0.mlp.fc1.weight",
            "encoder.layers.0.downsample.reduction.weight",
            "decoder.0.weight",
            "decoder.0.bias",
        ]
        .into_iter()
        .map(|n| (n, takes_weight_decay(n, &find(n).shape)))
        .collect();
        assert_eq!(
            decays,
            vec![
                ("encoder.patch_embed.proj.weight", true),
                ("encoder.patch_embed.proj.bias", false),
                ("encoder.patch_embed.norm.weight", false),
                ("encoder.mask_token", false),
                (
                    "encoder.layers.0.blocks.0.attn.relative_position_bias_table",
                    false
                ),
                ("encoder.layers.0.blocks.0.mlp.fc1.weight", true),
                ("encoder.layers.0.downsample.reduction.weight", true),
                ("decoder.0.weight", true),
                ("decoder.0.bias", false),
            ]
        );
        // Every name is unique and official-looking.
        let mut names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), params.len());
        assert!(names
            .iter()
            .all(|n| !n.contains("gamma") && !n.contains("beta")));
    }

    /// The MLP head and a coarser target: `decoder.0` and `decoder.2` as the official
    /// `nn.Sequential` (a GELU at index 1), the output conv sized for the target's
    /// pixel-shuffle factor.
    #[test]
    fn mlp_head_names_follow_the_sequential() {
        let mut config = SimMimConfig::preset("swin_micro").expect("preset");
        config.head = crate::config::HeadSpec {
            kind: crate::config::HeadKind::Mlp,
            hidden: Some(64),
            depths: None,
        };
        config.loss.target_resolution = Some(16);
        let model = config.init::<Flex>(0, &Default::default()).expect("init");
        let decoder: Vec<(String, Vec<usize>)> = parameters::<Flex, _>(&model)
            .into_iter()
            .filter(|p| p.name.starts_with("decoder."))
            .map(|p| (p.name, p.shape))
            .collect();
        // swin_micro: 64 px, stride 16 (a 4x4 grid), 384 features; target 16 px: factor 4.
        assert_eq!(
            decoder,
            vec![
                ("decoder.0.weight".to_string(), vec![64, 384, 1, 1]),
                ("decoder.0.bias".to_string(), vec![64]),
                ("decoder.2.weight".to_string(), vec![48, 64, 1, 1]),
                ("decoder.2.bias".to_string(), vec![48]),
            ]
        );
    }

    /// The inverse Swin head's parameters carry their module names (`decoder.layers.0...`,
    /// `decoder.norm`, `decoder.head`), the Linear weights transposed like the encoder's.
    #[test]
    fn inverse_swin_head_names_are_its_module_tree() {
        let mut config = SimMimConfig::preset("swin_micro").expect("preset");
        config.head.kind = crate::config::HeadKind::InverseSwin;
        config.head.depths = Some(vec![1, 1, 2]);
        let model = config.init::<Flex>(0, &Default::default()).expect("init");
        let params = parameters::<Flex, _>(&model);
        let shape = |name: &str| {
            params
                .iter()
                .find(|p| p.name == name)
                .map(|p| (p.shape.clone(), p.transposed))
                .unwrap_or_else(|| panic!("no parameter {name}"))
        };
        // swin_micro: embed 48, four stages (48, 96, 192, 384 wide), patch 2 on 64 px.
        assert_eq!(
            shape("decoder.layers.0.upsample.expand.weight"),
            (vec![768, 384], true)
        );
        assert_eq!(shape("decoder.layers.0.upsample.norm.weight").0, vec![192]);
        assert_eq!(
            shape("decoder.layers.2.blocks.1.attn.qkv.weight"),
            (vec![144, 48], true)
        );
        assert_eq!(shape("decoder.norm.bias").0, vec![48]);
        assert_eq!(shape("decoder.head.weight").0, vec![12, 48, 1, 1]);
        assert!(params.iter().all(|p| !p.name.starts_with("decoder.0")));
        let blocks = |layer: usize| {
            params
                .iter()
                .filter(|p| {
                    p.name
                        .starts_with(&format!("decoder.layers.{layer}.blocks."))
                        && p.name.ends_with("norm1.weight")
                })
                .count()
        };
        assert_eq!((blocks(0), blocks(1), blocks(2)), (1, 1, 2));
    }

    /// SwinV2's parameters under the official keys (`cpb_mlp.0/2`, `logit_scale`, `q_bias`,
    /// `v_bias`, a qkv without bias, the merge norm at 2C), its res-post-norms starting at
    /// zero, and the weight-decay rule that differs between pretraining and fine-tuning.
    #[test]
    fn swinv2_names_init_and_weight_decay() {
        let (model, params) = preset_parameters("swinv2_micro");
        let shape = |name: &str| find(&params, name).shape.clone();
        let attn = "encoder.layers.1.blocks.1.attn";
        assert_eq!(shape(&format!("{attn}.cpb_mlp.0.weight")), vec![512, 2]);
        assert_eq!(shape(&format!("{attn}.cpb_mlp.0.bias")), vec![512]);
        assert_eq!(shape(&format!("{attn}.cpb_mlp.2.weight")), vec![6, 512]);
        assert_eq!(shape(&format!("{attn}.logit_scale")), vec![6, 1, 1]);
        assert_eq!(shape(&format!("{attn}.q_bias")), vec![96]);
        assert_eq!(shape(&format!("{attn}.v_bias")), vec![96]);
        assert_eq!(shape("encoder.layers.0.downsample.norm.weight"), vec![96]);
        for absent in ["cpb_mlp.2.bias", "qkv.bias", "relative_position_bias_table"] {
            assert!(
                !params.iter().any(|p| p.name.ends_with(absent)),
                "{absent} is not a SwinV2 parameter"
            );
        }
        let Encoder::Swin(swin) = &model.encoder else {
            panic!("a swin encoder")
        };
        let block = &swin.layers[0].blocks[0];
        for norm in [&block.norm1, &block.norm2] {
            let gamma = norm.gamma.val().into_data().to_vec::<f32>().expect("f32");
            assert!(gamma.iter().all(|g| *g == 0.0), "res-post-norm starts at 0");
        }
        let scale = block.attn.logit_scale.as_ref().expect("v2").val();
        let scale = scale.into_data().to_vec::<f32>().expect("f32");
        assert!(scale.iter().all(|s| (s - 10f32.ln()).abs() < 1e-6));

        let decays = |prefix: &str| {
            [
                "cpb_mlp.0.weight",
                "cpb_mlp.0.bias",
                "logit_scale",
                "q_bias",
                "qkv.weight",
            ]
            .map(|n| {
                let name = format!("layers.1.blocks.1.attn.{n}");
                let official = shape(&format!("encoder.{name}"));
                takes_weight_decay(&format!("{prefix}{name}"), &official)
            })
        };
        // Pretraining: the official prefixed keywords match nothing, so shape rules decide.
        assert_eq!(decays("encoder."), [true, false, true, false, true]);
        // Fine-tuning: the bare encoder's names contain the keywords.
        assert_eq!(decays(""), [false, false, false, false, true]);
    }
}
