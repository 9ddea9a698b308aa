//! What the alignment and RLHF end-to-end tests share: a tiny chat model and tokenizer, a
//! seeded word generator for synthetic preference and prompt rows, LoRA run configs, and
//! running `ferrotune train` (or `launch --nproc 2`) on them.
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::{json, Value};

use crate::{ferrotune, init_tiny_model, read_jsonl, stderr, temp_dir, write_chat_tokenizer};

/// A work folder with a chat tokenizer of `w0`..`w{words-1}` and a tiny model on it.
pub struct AlignFixture {
    pub work: PathBuf,
    pub model: PathBuf,
}

impl AlignFixture {
    /// A fresh fixture under `tag`; `edit_tokenizer` may rewrite `tokenizer.json` first.
    pub fn new(tag: &str, words: usize, edit_tokenizer: impl FnOnce(&Path)) -> Self {
        let work = temp_dir(tag);
        let tokenizer = write_chat_tokenizer(&work.join("tokenizer"), words);
        edit_tokenizer(&tokenizer);
        let model = work.join("model");
        init_tiny_model(&work.join("tokenizer"), &model, 3);
        Self { work, model }
    }

    /// Writes `<name>.yaml`: the model, `output_dir` `<name>`, a LoRA adapter on every
    /// decoder linear layer, then `body`.
    pub fn config(&self, name: &str, body: &str) -> PathBuf {
        let yaml = format!(
            "model: {model}\noutput_dir: {out}\n\
             adapter: {{plugin: lora, r: 8, lora_alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}\n{body}",
            model = self.model.display(),
            out = self.work.join(name).display(),
        );
        let path = self.work.join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        path
    }

    /// The `metrics.jsonl` lines of run `name`.
    pub fn metrics(&self, name: &str) -> Vec<Value> {
        read_jsonl(&self.work.join(name).join("metrics.jsonl"))
    }

    /// Metric `key` of every line of run `name` that has it.
    pub fn series(&self, name: &str, key: &str) -> Vec<f64> {
        self.metrics(name).iter().filter_map(|l| l[key].as_f64()).collect()
    }
}

/// A small seeded generator (the tests' data must not depend on anything else).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self, n: u64) -> u64 {
        self.0 =
            self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }

    /// `n` words `w{from}`..`w{to-1}`, space-separated.
    pub fn words(&mut self, n: usize, from: u64, to: u64) -> String {
        (0..n).map(|_| format!("w{}", from + self.next(to - from))).collect::<Vec<_>>().join(" ")
    }
}

/// Preference rows (alpaca ranking) over `words` words: the chosen answer uses the first half
/// of them, the rejected one the second half (a style that carries over to unseen prompts),
/// with TRL's `margin` column when given.
pub fn preference_rows(n: usize, seed: u64, words: u64, margin: Option<f64>) -> Vec<Value> {
    let mut g = Lcg(seed);
    (0..n)
        .map(|_| {
            let instruction = g.words(3, 0, words);
            let mut row = json!({"instruction": instruction, "chosen": g.words(3, 0, words / 2),
                "rejected": g.words(3, words / 2, words)});
            if let Some(m) = margin {
                row["margin"] = json!(m);
            }
            row
        })
        .collect()
}

/// Writes `rows` as JSON Lines.
pub fn write_rows(path: &Path, rows: &[Value]) -> PathBuf {
    std::fs::write(path, rows.iter().map(Value::to_string).collect::<Vec<_>>().join("\n") + "\n")
        .unwrap();
    path.to_path_buf()
}

/// `ferrotune train CONFIG`, with its stderr.
pub fn train(config: &Path) -> (Output, String) {
    let out = ferrotune(&["train", config.to_str().unwrap()]);
    let err = stderr(&out);
    (out, err)
}

/// `ferrotune launch --nproc 2 train CONFIG`, with its stderr.
pub fn launch2(config: &Path) -> (Output, String) {
    let out = ferrotune(&[
        "launch",
        "--nproc",
        "2",
        "--timeout",
        "120",
        "train",
        config.to_str().unwrap(),
    ]);
    let err = stderr(&out);
    (out, err)
}

pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}
