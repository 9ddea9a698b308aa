//! The canonical sample a dataset plugin yields: chat messages with image and video references.
//!
//! It crosses the boundary as JSON text plus a list of binary blobs (images stored inside
//! the data set, such as StoryReasoning's parquet). Every field but `messages` is optional
//! with a default, so new fields can be added without breaking older plugins.
use serde::{Deserialize, Serialize};

/// The placeholder a message's text holds for each image, in order (LLaVA's and
/// LLaMA-Factory's `<image>`); the host expands it into the model's vision tokens.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// The placeholder a message's text holds for each video, in order (LLaMA-Factory's and
/// Qwen2-VL-Finetune's `<video>`); the host expands it into the model's video tokens.
pub const VIDEO_PLACEHOLDER: &str = "<video>";

/// The role of an assistant turn that calls tools (LLaMA-Factory's `function_call`): its
/// `content` is the JSON text of one call `{"name": …, "arguments": …}` or of a list of
/// calls. The host renders it as transformers' assistant message with `tool_calls` and
/// trains it like an assistant turn; the tools' results follow as `tool` turns. Kept as
/// text so the arguments keep their key order across the plugin boundary.
pub const FUNCTION_CALL_ROLE: &str = "function_call";

/// One conversation turn. `content` holds text with one `<image>` placeholder per image,
/// in order (the images themselves are in [`Sample::images`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool` (a tool's result) or [`FUNCTION_CALL_ROLE`].
    pub role: String,
    pub content: String,
    /// Whether this turn's tokens carry labels. `None`: the trainer's default (assistant
    /// turns only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<bool>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), train: None }
    }

    /// Whether the assistant writes this turn (`assistant` or [`FUNCTION_CALL_ROLE`]): the
    /// turns trained by default.
    pub fn is_assistant_turn(&self) -> bool {
        self.role == "assistant" || self.role == FUNCTION_CALL_ROLE
    }
}

/// Where an image (or a video: [`VideoSource`]) comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageSource {
    /// A file path (already joined to the data set's image folder).
    Path(String),
    /// Encoded bytes (PNG, JPEG) at this index of [`Sample::blobs`].
    Blob(usize),
}

/// Where a video comes from: a file (mp4, avi, webm, mkv) or a folder of frames in name
/// order, or encoded video bytes at an index of [`Sample::blobs`].
pub type VideoSource = ImageSource;

/// A canonical training sample.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageSource>,
    /// The videos its `<video>` placeholders stand for, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub videos: Vec<VideoSource>,
    /// Preference data: the preferred and the dispreferred final assistant turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen: Option<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Message>,
    /// KTO: whether the final assistant turn is desirable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<bool>,
    /// Anything else a data set carries (a reference answer for rewards, metadata).
    /// `tools`: the tools the conversation may call, for the chat template's `tools`
    /// (a list of function schemas, or its JSON text, which keeps the key order).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Encoded images (and videos) referenced by [`ImageSource::Blob`]; travels beside the JSON.
    #[serde(skip)]
    pub blobs: Vec<Vec<u8>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_defaults() {
        let s: Sample = serde_json::from_str(r#"{"messages":[{"role":"user","content":"<image>hi"}],"images":[{"path":"a.png"},{"blob":0}]}"#).unwrap();
        assert_eq!(s.images, vec![ImageSource::Path("a.png".into()), ImageSource::Blob(0)]);
        assert!(s.chosen.is_none() && s.extra.is_empty() && s.videos.is_empty());
        let back: Sample = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        let v: Sample = serde_json::from_str(r#"{"messages":[{"role":"user","content":"<video>what?"}],"videos":[{"path":"clip.mp4"}]}"#).unwrap();
        assert_eq!(v.videos, vec![VideoSource::Path("clip.mp4".into())]);
        assert!(!serde_json::to_string(&s).unwrap().contains("videos"));
    }
}
