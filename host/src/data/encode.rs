//! A canonical [`Sample`] as token ids and labels, through the model's chat template.
//!
//! Labels sit exactly on the tokens a trained turn adds: for an assistant turn, its content
//! and its end-of-turn token (`<|im_end|>` for ChatML), not the header the generation prompt
//! writes (`<|im_start|>assistant\n`) and not the template's glue after the end-of-turn token
//! (ChatML's `\n`, which belongs to the next turn's prefix). They are found by rendering, not
//! by knowing the template: for turn i, `template(messages[..i], add_generation_prompt)`
//! tokenized must be a prefix of the whole conversation's ids, and the turn runs from there
//! to the last end-of-turn token before where `template(messages[..=i])` ends. A template
//! that renders earlier turns differently once later turns follow (one that strips the
//! reasoning of earlier assistant turns, say) fails that check and is an error naming it.
//!
//! Which turns are trained: assistant turns (function calls included: a
//! [`FUNCTION_CALL_ROLE`](ferrotune_plugin_api::FUNCTION_CALL_ROLE) turn renders as the
//! assistant message with `tool_calls`, and the sample's `extra["tools"]` as the template's
//! `tools`; see [`crate::text::tool_calls`]), unless [`Message::train`] says otherwise
//! (`Some(false)` excludes a turn, `Some(true)` includes any turn, its header included);
//! `mask_history` keeps only the last assistant turn by default; `train_on_prompt` labels every
//! token except turns marked `Some(false)`. Truncation to `cutoff_len` keeps the start and
//! drops the tail (LLaMA-Factory instead shortens prompt and response in proportion); it is
//! reported in [`Encoded::truncated_from`], and a sample left without label tokens is an
//! [`EncodeError::NoLabelTokens`] the trainer can count and skip.
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Result};
use ferrotune_plugin_api::{Message, Sample};
use serde_json::Value as Json;

use crate::text::Tokenizer;

/// The label of a token that carries no loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// End-of-turn tokens of common chat templates, used besides the tokenizer's eos token.
const END_OF_TURN_TOKENS: &[&str] =
    &["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>"];

/// The tokenizer's eos and the end-of-turn tokens of common chat templates it knows.
pub(crate) fn end_of_turn_ids(tok: &Tokenizer) -> BTreeSet<i64> {
    tok.eos_token_id()
        .into_iter()
        .chain(END_OF_TURN_TOKENS.iter().filter_map(|t| tok.token_to_id(t)))
        .collect()
}

/// How samples become training sequences.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodeOptions {
    /// The longest sequence kept, in tokens; longer ones lose their tail. Default 2048
    /// (LLaMA-Factory's `cutoff_len`).
    pub cutoff_len: usize,
    /// Label every token, prompts included. Default false.
    pub train_on_prompt: bool,
    /// Label only the last assistant turn (turns marked `train: true` still count). Default false.
    pub mask_history: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self { cutoff_len: 2048, train_on_prompt: false, mask_history: false }
    }
}

/// One training sequence: ids and labels of equal length (labels not shifted; the loss
/// shifts, as transformers does).
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub input_ids: Vec<i64>,
    /// The id where the token is trained, [`IGNORE_INDEX`] elsewhere.
    pub labels: Vec<i64>,
    /// The length before truncation to `cutoff_len`, when it was truncated.
    pub truncated_from: Option<usize>,
    /// The images whose `<|image_pad|>` blocks the ids hold, in order, then the videos whose
    /// `<|video_pad|>` blocks they hold, in order (vision models; a video's
    /// [`SampleImage::video`] is set).
    pub images: Vec<SampleImage>,
}

impl Encoded {
    /// How many tokens carry a label.
    pub fn num_label_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Failures a trainer counts and skips rather than stopping on.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("sample {id}: no label tokens{}; nothing to train on", truncation_note(*.truncated_from, *.cutoff_len))]
    NoLabelTokens { id: String, truncated_from: Option<usize>, cutoff_len: usize },
    /// A row that cannot be used: a bad image, placeholders that do not match the images.
    #[error("sample {id}: {reason}")]
    BadSample { id: String, reason: String },
    /// Truncation to `cutoff_len` would cut an image or video block (or drop one).
    #[error("sample {id}: truncation to cutoff_len {cutoff_len} keeps {kept} of its {total} image (or video) tokens, cutting a block; raise cutoff_len or lower data.image_max_pixels / data.video_max_pixels / data.video_fps")]
    ImageBlockCut { id: String, kept: usize, total: usize, cutoff_len: usize },
}

fn truncation_note(from: Option<usize>, cutoff_len: usize) -> String {
    match from {
        Some(n) => format!(" left after truncating {n} tokens to cutoff_len {cutoff_len} (raise cutoff_len or shorten the prompt)"),
        None => " (no turn is trained: is there an assistant turn, or are all marked `train: false`?)".into(),
    }
}

/// `sample.messages` as ids and labels (see the module doc).
pub fn encode_sample(tok: &Tokenizer, sample: &Sample, opts: &EncodeOptions) -> Result<Encoded> {
    encode_messages(tok, &sample.messages, sample, opts)
}

/// A preference sample as two sequences: the prompt followed by `chosen`, then by
/// `rejected` (each encoded as [`encode_sample`] does).
pub fn encode_pair(
    tok: &Tokenizer,
    sample: &Sample,
    opts: &EncodeOptions,
) -> Result<(Encoded, Encoded)> {
    let id = sample.id.as_deref().unwrap_or("(no id)");
    let (Some(chosen), Some(rejected)) = (&sample.chosen, &sample.rejected) else {
        bail!("sample {id}: not a preference pair (it needs both `chosen` and `rejected`)");
    };
    let with = |last: &Message| {
        let mut messages = sample.messages.clone();
        messages.push(last.clone());
        encode_messages(tok, &messages, sample, opts)
    };
    Ok((with(chosen)?, with(rejected)?))
}

/// The chat-template variables a sample brings: its `tools` (see [`crate::text::tool_calls`]).
pub(crate) fn template_variables(sample: &Sample) -> Json {
    match sample.extra.get("tools") {
        Some(tools) => serde_json::json!({ "tools": tools }),
        None => Json::Null,
    }
}

fn encode_messages(
    tok: &Tokenizer,
    messages: &[Message],
    sample: &Sample,
    opts: &EncodeOptions,
) -> Result<Encoded> {
    let id = sample.id.as_deref().unwrap_or("(no id)");
    if opts.cutoff_len == 0 {
        bail!("cutoff_len must be at least 1");
    }
    if messages.is_empty() {
        bail!("sample {id}: no messages");
    }
    let template =
        tok.chat_template().map(|t| t.origin().to_string()).unwrap_or_else(|| "(none)".into());
    let extra = template_variables(sample);
    let mut renders: HashMap<(usize, bool), Vec<i64>> = HashMap::new();
    let mut render = |n: usize, generation_prompt: bool| -> Result<Vec<i64>> {
        if let Some(ids) = renders.get(&(n, generation_prompt)) {
            return Ok(ids.clone());
        }
        let ids = if n == 0 && !generation_prompt {
            Vec::new()
        } else {
            // A conversation the template cannot render (tools it would drop, roles it
            // refuses) is this row's fault: a bad sample, listed with the others.
            let text = tok
                .apply_chat_template_with(&messages[..n], generation_prompt, &extra)
                .map_err(|e| {
                    anyhow::Error::new(EncodeError::BadSample {
                        id: id.to_string(),
                        reason: format!("{e:#}"),
                    })
                })?;
            tok.encode(&text, false)?
        };
        renders.insert((n, generation_prompt), ids.clone());
        Ok(ids)
    };
    let full = render(messages.len(), false)?;
    let prefix_len = |ids: &[i64], turn: usize| -> Result<usize> {
        if full.starts_with(ids) {
            Ok(ids.len())
        } else {
            bail!(
                "sample {id}: the chat template ({template}) renders the conversation up to turn {turn} differently when later \
                 turns follow, so its tokens are not a prefix of the whole conversation and labels cannot be placed; use a \
                 template that leaves earlier turns unchanged"
            )
        }
    };
    let end_of_turn = end_of_turn_ids(tok);

    let mut trained = vec![opts.train_on_prompt; full.len()];
    let last_assistant = messages.iter().rposition(Message::is_assistant_turn);
    for (i, m) in messages.iter().enumerate() {
        let assistant = m.is_assistant_turn();
        let default = if assistant {
            !opts.mask_history || Some(i) == last_assistant
        } else {
            opts.train_on_prompt
        };
        let train = m.train.unwrap_or(default);
        if train == opts.train_on_prompt {
            continue; // the turn's tokens already hold that value
        }
        if assistant && i == 0 {
            bail!("sample {id}: turn 0 is an assistant turn; a conversation needs a prompt before the first assistant turn");
        }
        // An assistant turn starts after the generation prompt; any other turn with its header.
        let start = prefix_len(&render(i, assistant)?, i)?;
        let end = prefix_len(&render(i + 1, false)?, i + 1)?.max(start);
        let stop =
            (start..end).rev().find(|&j| end_of_turn.contains(&full[j])).map_or(end, |j| j + 1);
        trained[start..stop].fill(train);
    }

    let mut input_ids = full;
    let mut labels: Vec<i64> =
        input_ids.iter().zip(&trained).map(|(&t, &on)| if on { t } else { IGNORE_INDEX }).collect();
    let mut truncated_from = None;
    if input_ids.len() > opts.cutoff_len {
        truncated_from = Some(input_ids.len());
        input_ids.truncate(opts.cutoff_len);
        labels.truncate(opts.cutoff_len);
    }
    let encoded = Encoded { input_ids, labels, truncated_from, images: Vec::new() };
    if encoded.num_label_tokens() == 0 {
        return Err(EncodeError::NoLabelTokens {
            id: id.to_string(),
            truncated_from,
            cutoff_len: opts.cutoff_len,
        }
        .into());
    }
    Ok(encoded)
}

/// The text of `encoded` with every labelled run wrapped in `«…»` (special tokens shown).
pub fn preview(tok: &Tokenizer, encoded: &Encoded) -> String {
    let mut out = String::new();
    let mut start = 0;
    let n = encoded.input_ids.len();
    while start < n {
        let on = encoded.labels[start] != IGNORE_INDEX;
        let end = (start..n).find(|&j| (encoded.labels[j] != IGNORE_INDEX) != on).unwrap_or(n);
        let text = tok
            .decode(&encoded.input_ids[start..end], false)
            .unwrap_or_else(|e| format!("<cannot decode: {e}>"));
        if on {
            out.push('«');
            out.push_str(&text);
            out.push('»');
        } else {
            out.push_str(&text);
        }
        start = end;
    }
    out
}

/// Where an image's bytes are.
#[derive(Clone, PartialEq)]
pub enum ImageData {
    File(PathBuf),
    /// Encoded bytes stored in the data set (StoryReasoning's parquet).
    Bytes(Arc<Vec<u8>>),
}

impl fmt::Debug for ImageData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Bytes(b) => write!(f, "<{} bytes>", b.len()),
        }
    }
}

/// One image (or video) of an encoded sample: its bytes, and how it will be resized and
/// patched.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleImage {
    pub data: ImageData,
    /// The processor settings of this image (pixel bounds may come from the sample).
    pub min_pixels: u64,
    pub max_pixels: u64,
    pub original_size: (u32, u32),
    pub resized_size: (u32, u32),
    pub grid_thw: [i64; 3],
    /// Its `<|image_pad|>` (or `<|video_pad|>`) count in the text.
    pub tokens: usize,
    /// For a video: its frames, their rate and size (`grid_thw` and `tokens` above are the
    /// video's). `None`: an image.
    pub video: Option<crate::vision::VideoPlan>,
}

impl SampleImage {
    /// `W×H → W'×H', grid t×h×w, N tokens` (a video: its frames kept of total and fps too).
    pub fn describe(&self) -> String {
        if let Some(v) = &self.video {
            return format!("video: {}, {} tokens", v.describe(), self.tokens);
        }
        let ((w, h), (rw, rh)) = (self.original_size, self.resized_size);
        let [t, gh, gw] = self.grid_thw;
        format!("{w}×{h} → {rw}×{rh}, grid {t}×{gh}×{gw}, {} tokens", self.tokens)
    }
}

/// Runs of `<|image_pad|>` (and `<|video_pad|>`) shown as `<|image_pad|>×N`.
pub fn compress_image_pads(text: &str) -> String {
    compress_pads(&compress_pads(text, "<|image_pad|>"), "<|video_pad|>")
}

/// Runs of `pad` shown as `pad×N`.
fn compress_pads(text: &str, pad: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(pad) {
        out.push_str(&rest[..at]);
        let mut n = 0;
        rest = &rest[at..];
        while let Some(r) = rest.strip_prefix(pad) {
            n += 1;
            rest = r;
        }
        out.push_str(&format!("{pad}×{n}"));
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::ChatTemplate;

    const CHATML: &str =
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}\
                          {% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    const WORDS: &[&str] = &[
        "system",
        "user",
        "assistant",
        "Be",
        "brief",
        "hi",
        "hello",
        "how",
        "are",
        "you",
        "fine",
        "thanks",
        "bye",
    ];

    /// A word-level tokenizer that keeps every whitespace character as a token, with ChatML
    /// specials (`<|im_end|>` is eos) and a ChatML template.
    fn tokenizer(tag: &str) -> Tokenizer {
        let dir =
            std::env::temp_dir().join(format!("ferrotune-encode-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<unk>"];
        let mut vocab = serde_json::Map::new();
        for (i, t) in specials.iter().chain(["\n", " "].iter()).chain(WORDS).enumerate() {
            vocab.insert(t.to_string(), Json::from(i));
        }
        let added: Vec<Json> = specials
            .iter()
            .enumerate()
            .map(|(i, s)| serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
            .collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\\s"}, "behavior": "Isolated", "invert": false},
            "post_processor": null, "decoder": {"type": "Fuse"},
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
        let config = serde_json::json!({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML});
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        Tokenizer::from_dir(&dir).unwrap()
    }

    fn conversation() -> Sample {
        let m = Message::new;
        Sample {
            id: Some("t:1".into()),
            messages: vec![
                m("system", "Be brief"),
                m("user", "hi"),
                m("assistant", "hello"),
                m("user", "how are you"),
                m("assistant", "fine thanks"),
            ],
            ..Default::default()
        }
    }

    /// The labelled text, one string per labelled run (closed form: read off the preview).
    fn runs(tok: &Tokenizer, e: &Encoded) -> Vec<String> {
        let p = preview(tok, e);
        p.split('«').skip(1).map(|s| s.split('»').next().unwrap().to_string()).collect()
    }

    #[test]
    fn labels_assistant_content_and_end_of_turn_only() {
        let tok = tokenizer("basic");
        let e = encode_sample(&tok, &conversation(), &EncodeOptions::default()).unwrap();
        let text = "<|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n\
                    <|im_start|>user\nhow are you<|im_end|>\n<|im_start|>assistant\nfine thanks<|im_end|>\n";
        assert_eq!(e.input_ids, tok.encode(text, false).unwrap());
        assert_eq!(e.input_ids.len(), e.labels.len());
        assert_eq!(
            preview(&tok, &e),
            "<|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n«hello<|im_end|>»\n\
             <|im_start|>user\nhow are you<|im_end|>\n<|im_start|>assistant\n«fine thanks<|im_end|>»\n"
        );
        // Labels equal the ids where set.
        assert!(e.labels.iter().zip(&e.input_ids).all(|(&l, &t)| l == IGNORE_INDEX || l == t));
        assert_eq!(e.num_label_tokens(), 2 + 4);
        assert_eq!(e.truncated_from, None);
    }

    #[test]
    fn mask_history_train_flags_and_train_on_prompt() {
        let tok = tokenizer("flags");
        let opts = EncodeOptions { mask_history: true, ..Default::default() };
        assert_eq!(
            runs(&tok, &encode_sample(&tok, &conversation(), &opts).unwrap()),
            vec!["fine thanks<|im_end|>"]
        );

        let mut s = conversation();
        s.messages[4].train = Some(false);
        s.messages[1].train = Some(true);
        let e = encode_sample(&tok, &s, &EncodeOptions::default()).unwrap();
        assert_eq!(runs(&tok, &e), vec!["<|im_start|>user\nhi<|im_end|>", "hello<|im_end|>"]);

        let all = EncodeOptions { train_on_prompt: true, ..Default::default() };
        let e = encode_sample(&tok, &conversation(), &all).unwrap();
        assert_eq!(e.labels, e.input_ids);
        // train_on_prompt still honours a turn marked `train: false`.
        let e = encode_sample(&tok, &s, &all).unwrap();
        let p = preview(&tok, &e);
        assert!(p.ends_with("<|im_start|>assistant\n»fine thanks<|im_end|>«\n»"), "{p}");
    }

    #[test]
    fn truncation_is_reported_and_no_labels_is_an_error() {
        let tok = tokenizer("trunc");
        let full = encode_sample(&tok, &conversation(), &EncodeOptions::default()).unwrap();
        let n = full.input_ids.len();
        let e = encode_sample(
            &tok,
            &conversation(),
            &EncodeOptions { cutoff_len: n - 2, ..Default::default() },
        )
        .unwrap();
        assert_eq!((e.truncated_from, e.input_ids.len()), (Some(n), n - 2));
        assert_eq!(e.input_ids[..], full.input_ids[..n - 2]);
        assert_eq!(e.labels[..], full.labels[..n - 2]);
        // Cut before the first answer: nothing left to train on.
        let err = encode_sample(
            &tok,
            &conversation(),
            &EncodeOptions { cutoff_len: 12, ..Default::default() },
        )
        .unwrap_err();
        match err.downcast_ref::<EncodeError>() {
            Some(EncodeError::NoLabelTokens { id, truncated_from, cutoff_len }) => {
                assert_eq!((id.as_str(), *truncated_from, *cutoff_len), ("t:1", Some(n), 12))
            }
            _ => panic!("expected NoLabelTokens, got {err:#}"),
        }
        assert!(err.to_string().contains("truncating"), "{err}");
        let mut prompt_only = conversation();
        prompt_only.messages.truncate(2);
        let err = encode_sample(&tok, &prompt_only, &EncodeOptions::default()).unwrap_err();
        assert!(
            matches!(
                err.downcast_ref::<EncodeError>(),
                Some(EncodeError::NoLabelTokens { truncated_from: None, .. })
            ),
            "{err}"
        );
    }

    #[test]
    fn templates_that_rewrite_history_are_refused() {
        let mut tok = tokenizer("rewrite");
        // Marks the last turn: turn i renders differently once turn i+1 exists.
        let src = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}{% if loop.last %} bye{% endif %}\
                   {{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        tok.set_chat_template(Some(ChatTemplate::single(src, "rewriting-template.jinja").unwrap()));
        let err = encode_sample(&tok, &conversation(), &EncodeOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("rewriting-template.jinja") && err.contains("not a prefix"), "{err}");
        let tok = tokenizer("first");
        let s = Sample {
            messages: vec![Message::new("assistant", "hi"), Message::new("user", "hello")],
            ..Default::default()
        };
        let err = encode_sample(&tok, &s, &EncodeOptions::default()).unwrap_err().to_string();
        assert!(err.contains("turn 0 is an assistant turn"), "{err}");
    }

    #[test]
    fn function_calls_are_trained_like_assistant_turns() {
        let mut tok = tokenizer("calls");
        // Writes each call's name where the content would be.
        let src = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}{% if m.tool_calls %}\
                   {% for c in m.tool_calls %}{{ c.function.name }}{% endfor %}{% else %}{{ m.content }}{% endif %}\
                   {{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        tok.set_chat_template(Some(ChatTemplate::single(src, "calls.jinja").unwrap()));
        let m = Message::new;
        let s = Sample {
            id: Some("t:2".into()),
            messages: vec![
                m("user", "hi"),
                m(
                    ferrotune_plugin_api::FUNCTION_CALL_ROLE,
                    r#"{"name": "thanks", "arguments": {}}"#,
                ),
                m("tool", "fine"),
                m("assistant", "bye"),
            ],
            ..Default::default()
        };
        let e = encode_sample(&tok, &s, &EncodeOptions::default()).unwrap();
        assert_eq!(runs(&tok, &e), vec!["thanks<|im_end|>", "bye<|im_end|>"]);
        let last = EncodeOptions { mask_history: true, ..Default::default() };
        let mut call_last = s.clone();
        call_last.messages.truncate(2);
        let e = encode_sample(&tok, &call_last, &last).unwrap();
        assert_eq!(runs(&tok, &e), vec!["thanks<|im_end|>"]);
        // The CHATML template has no tool support: the sample and the template are named.
        let err =
            encode_sample(&tokenizer("calls-chatml"), &s, &EncodeOptions::default()).unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.starts_with("sample t:2: ") && err.contains("never reads `tool_calls`"),
            "{err}"
        );
    }

    #[test]
    fn pairs_share_the_prompt() {
        let tok = tokenizer("pair");
        let mut s = conversation();
        s.messages.truncate(4);
        s.chosen = Some(Message::new("assistant", "fine"));
        s.rejected = Some(Message::new("assistant", "bye"));
        let (c, r) = encode_pair(&tok, &s, &EncodeOptions::default()).unwrap();
        assert_eq!(runs(&tok, &c), vec!["hello<|im_end|>", "fine<|im_end|>"]);
        assert_eq!(runs(&tok, &r), vec!["hello<|im_end|>", "bye<|im_end|>"]);
        assert_eq!(c.input_ids[..c.input_ids.len() - 3], r.input_ids[..r.input_ids.len() - 3]);
        assert!(encode_pair(&tok, &conversation(), &EncodeOptions::default())
            .unwrap_err()
            .to_string()
            .contains("not a preference pair"));
    }
}
