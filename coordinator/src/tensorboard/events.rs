//! TensorBoard `Event` messages as the coordinator writes them: scalars, images, the file
//! version, session restarts and the hparams plugin's three records.

use prost::Message;

pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/tensorboard.rs"));
}

use pb::{event::What, summary, Event, Summary};

/// The version string TensorBoard expects first in every file; version 2 also tells its
/// reader to purge orphaned points on a `SessionLog::START` rather than on any step going
/// backwards (images arrive after later scalars here).
pub const FILE_VERSION: &str = "brain.Event:2";

pub fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn event(step: u64, what: What) -> Vec<u8> {
    Event {
        wall_time: now_secs(),
        step: step as i64,
        what: Some(what),
    }
    .encode_to_vec()
}

pub fn file_version() -> Vec<u8> {
    event(0, What::FileVersion(FILE_VERSION.into()))
}

/// Marks a restart at `first_step`: TensorBoard drops every point at or after it that an
/// earlier incarnation wrote, so a resumed run has one point per step.
pub fn session_start(first_step: u64) -> Vec<u8> {
    event(
        first_step,
        What::SessionLog(pb::SessionLog {
            status: pb::session_log::SessionStatus::Start as i32,
            checkpoint_path: String::new(),
            msg: format!("resumed; points from step {first_step} on are rewritten"),
        }),
    )
}

pub fn scalars(step: u64, values: &[(&str, f32)]) -> Vec<u8> {
    let value = values
        .iter()
        .map(|(tag, v)| summary::Value {
            tag: (*tag).to_string(),
            metadata: None,
            value: Some(summary::value::Value::SimpleValue(*v)),
        })
        .collect();
    event(step, What::Summary(Summary { value }))
}

/// An image summary of a PNG (width and height read from its header), or `None` if the
/// bytes are not a PNG.
pub fn png_image(step: u64, tag: &str, png: &[u8]) -> Option<Vec<u8>> {
    let (width, height) = png_size(png)?;
    let image = summary::Image {
        height: height as i32,
        width: width as i32,
        colorspace: 3,
        encoded_image_string: png.to_vec(),
    };
    Some(event(
        step,
        What::Summary(Summary {
            value: vec![summary::Value {
                tag: tag.to_string(),
                metadata: None,
                value: Some(summary::value::Value::Image(image)),
            }],
        }),
    ))
}

/// A PNG's size from its IHDR chunk.
fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    if png.get(..8)? != b"\x89PNG\r\n\x1a\n" || png.get(12..16)? != b"IHDR" {
        return None;
    }
    let be = |at: usize| Some(u32::from_be_bytes(png.get(at..at + 4)?.try_into().ok()?));
    Some((be(16)?, be(20)?))
}

/// A summary that carries only hparams plugin data under `tag`.
fn hparams_event(tag: &str, data: pb::h_params_plugin_data::Data) -> Vec<u8> {
    let content = pb::HParamsPluginData {
        version: 0,
        data: Some(data),
    }
    .encode_to_vec();
    let value = summary::Value {
        tag: tag.to_string(),
        metadata: Some(pb::SummaryMetadata {
            plugin_data: Some(pb::summary_metadata::PluginData {
                plugin_name: "hparams".into(),
                content,
            }),
            display_name: String::new(),
            summary_description: String::new(),
        }),
        value: None,
    };
    event(0, What::Summary(Summary { value: vec![value] }))
}

/// The hparams plugin's experiment and session-start records: the run config flattened to
/// `section.field` values, and the metrics the dashboard shows beside them.
pub fn hparams_start(config: &serde_json::Value, metrics: &[&str]) -> Vec<Vec<u8>> {
    let values = flatten(config);
    let infos = values
        .iter()
        .map(|(name, value)| pb::HParamInfo {
            name: name.clone(),
            display_name: String::new(),
            description: String::new(),
            r#type: match &value.kind {
                Some(prost_types::value::Kind::NumberValue(_)) => pb::DataType::Float64,
                Some(prost_types::value::Kind::BoolValue(_)) => pb::DataType::Bool,
                _ => pb::DataType::String,
            } as i32,
        })
        .collect();
    let metric_infos = metrics
        .iter()
        .map(|tag| pb::MetricInfo {
            name: Some(pb::MetricName {
                group: String::new(),
                tag: (*tag).to_string(),
            }),
            display_name: String::new(),
            description: String::new(),
        })
        .collect();
    let now = now_secs();
    vec![
        hparams_event(
            "_hparams_/experiment",
            pb::h_params_plugin_data::Data::Experiment(pb::Experiment {
                name: String::new(),
                description: String::new(),
                user: String::new(),
                time_created_secs: now,
                hparam_infos: infos,
                metric_infos,
            }),
        ),
        hparams_event(
            "_hparams_/session_start_info",
            pb::h_params_plugin_data::Data::SessionStartInfo(pb::SessionStartInfo {
                hparams: values.into_iter().collect(),
                model_uri: String::new(),
                monitor_url: String::new(),
                group_name: String::new(),
                start_time_secs: now,
            }),
        ),
    ]
}

pub fn hparams_end(success: bool) -> Vec<u8> {
    hparams_event(
        "_hparams_/session_end_info",
        pb::h_params_plugin_data::Data::SessionEndInfo(pb::SessionEndInfo {
            status: if success {
                pb::Status::Success
            } else {
                pb::Status::Failure
            } as i32,
            end_time_secs: now_secs(),
        }),
    )
}

/// `{"train": {"base_lr": 0.1}}` as `train.base_lr = 0.1`; lists become their JSON text,
/// nulls are left out.
fn flatten(config: &serde_json::Value) -> Vec<(String, prost_types::Value)> {
    use prost_types::value::Kind;
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, prost_types::Value)>) {
        let kind = match value {
            serde_json::Value::Object(map) => {
                for (key, inner) in map {
                    let name = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&name, inner, out);
                }
                return;
            }
            serde_json::Value::Null => return,
            serde_json::Value::Bool(b) => Kind::BoolValue(*b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
            serde_json::Value::String(s) => Kind::StringValue(s.clone()),
            serde_json::Value::Array(_) => Kind::StringValue(value.to_string()),
        };
        out.push((prefix.to_string(), prost_types::Value { kind: Some(kind) }));
    }
    let mut out = Vec::new();
    walk("", config, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_decode_with_their_tags_and_step() {
        let bytes = scalars(7, &[("train/loss", 0.5), ("train/lr", 1e-3)]);
        let event = Event::decode(bytes.as_slice()).expect("an Event");
        assert_eq!(event.step, 7);
        let Some(What::Summary(summary)) = event.what else {
            panic!("not a summary")
        };
        let tags: Vec<_> = summary.value.iter().map(|v| v.tag.as_str()).collect();
        assert_eq!(tags, ["train/loss", "train/lr"]);
        assert_eq!(
            summary.value[1].value,
            Some(summary::value::Value::SimpleValue(1e-3))
        );
    }

    #[test]
    fn png_size_is_read_from_the_header_and_other_bytes_are_refused() {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        png.extend_from_slice(&640u32.to_be_bytes());
        png.extend_from_slice(&200u32.to_be_bytes());
        assert_eq!(png_size(&png), Some((640, 200)));
        assert!(png_image(1, "recon", b"GIF89a").is_none());
    }

    #[test]
    fn config_is_flattened_to_dotted_names() {
        let config = serde_json::json!({"train": {"base_lr": 0.5, "epochs": 3, "sched": "cosine"},
            "output": {"log_samples": false}, "run": {"note": null, "depths": [2, 2]}});
        let flat: std::collections::BTreeMap<_, _> = flatten(&config).into_iter().collect();
        use prost_types::value::Kind;
        assert_eq!(flat["train.base_lr"].kind, Some(Kind::NumberValue(0.5)));
        assert_eq!(
            flat["output.log_samples"].kind,
            Some(Kind::BoolValue(false))
        );
        assert_eq!(
            flat["run.depths"].kind,
            Some(Kind::StringValue("[2,2]".into()))
        );
        assert!(!flat.contains_key("run.note"));
    }
}
