//! TensorBoard event files of a run (`training.report_to: [tensorboard]`): every line rank 0
//! writes to `metrics.jsonl` also goes, as scalars, into
//! `<output_dir>/runs/<Mon DD_HH-MM-SS>_<host>/events.out.tfevents.<time>.<host>.<pid>`
//! (transformers' `TensorBoardCallback` default, the date in UTC), or into
//! `training.logging_dir`.
//!
//! The file is TensorFlow's TFRecord framing of `Event` protocol buffers, written here by
//! hand: each record is its length (u64, little-endian), the masked CRC-32C of the length,
//! the bytes, and their masked CRC-32C. The first event carries `file_version:
//! "brain.Event:2"`; each logged step is one event whose `summary` holds a
//! `Summary.Value{tag, simple_value}` per number of the line. Tags are transformers'
//! (`rewrite_logs`): `train/loss`, `train/learning_rate`, `train/grad_norm`, `train/epoch`,
//! `train/tokens_per_s`, the objective's `train/<metric>`, `eval/loss`, `eval/<metric>`.
//! Every event is written with one `write` call, so that a live TensorBoard sees it at once
//! and a killed run leaves whole records. A resumed run writes a new file into the newest
//! folder under `runs/` and opens it with a `SessionLog START` at the first step it takes, so
//! that TensorBoard drops what the interrupted run had logged after its checkpoint.
//!
//! Tracking never ends a run: when the folder or a record cannot be written, one warning says
//! why and the run goes on without TensorBoard.
//!
//! Format: <https://github.com/tensorflow/tensorboard/blob/master/tensorboard/compat/proto/event.proto>.
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::de::{self, Deserializer};
use serde::Deserialize;

// ------------------------------------------------------------------ config

/// Where metrics are reported besides `metrics.jsonl`: `training.report_to`, a name or a
/// list of names as in transformers' `TrainingArguments.report_to`. Accepted: `tensorboard`,
/// `all` (every integration ferrotune has, i.e. `tensorboard`) and `none` (the default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportTo {
    pub tensorboard: bool,
}

/// The names `training.report_to` accepts.
pub const REPORT_TO_NAMES: [&str; 3] = ["tensorboard", "all", "none"];

impl ReportTo {
    /// From the names of the config (`none` alone, or any of `tensorboard` / `all`).
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> std::result::Result<Self, String> {
        let mut out = ReportTo::default();
        for n in names {
            match n.as_ref() {
                "tensorboard" | "all" => out.tensorboard = true,
                "none" if names.len() == 1 => {}
                "none" => return Err("`none` cannot be listed with other integrations".into()),
                other => {
                    return Err(format!(
                        "unknown integration `{other}`: ferrotune reports to {} (wandb, mlflow, \
                         swanlab and the others are not supported; metrics.jsonl has every value)",
                        REPORT_TO_NAMES.join(", ")
                    ))
                }
            }
        }
        Ok(out)
    }
}

impl<'de> Deserialize<'de> for ReportTo {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Names {
            One(String),
            Many(Vec<String>),
        }
        let names = match Names::deserialize(d).map_err(|_| {
            de::Error::custom(format!(
                "expected a name or a list of names out of {}",
                REPORT_TO_NAMES.join(", ")
            ))
        })? {
            Names::One(n) => vec![n],
            Names::Many(v) => v,
        };
        ReportTo::from_names(&names).map_err(de::Error::custom)
    }
}

// ------------------------------------------------------------------ TFRecord framing

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord uses.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC: rotated right by 15 bits plus a constant.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xA282_EAD8)
}

/// One TFRecord: length, its masked CRC, the data, its masked CRC.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

// ------------------------------------------------------------------ Event protocol buffers

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, (u64::from(field) << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// What an [`event`] carries besides its time and step.
pub enum EventBody<'a> {
    /// `file_version` (field 3), the first event of a file.
    FileVersion(&'a str),
    /// `summary` (field 5): `Summary{repeated Value value = 1}`, each
    /// `Value{string tag = 1; float simple_value = 2}`.
    Scalars(&'a [(String, f32)]),
    /// `session_log` (field 7) with `status: START`: the run (re)starts at this step.
    SessionStart,
}

/// An `Event` message: `wall_time` (double, field 1), `step` (int64, field 2; left out when
/// 0, as proto3 does) and the body.
pub fn event(wall_time: f64, step: i64, body: EventBody) -> Vec<u8> {
    let mut out = Vec::new();
    out.push(1 << 3 | 1);
    out.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        out.push(2 << 3);
        varint(&mut out, step as u64);
    }
    match body {
        EventBody::FileVersion(v) => bytes_field(&mut out, 3, v.as_bytes()),
        EventBody::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, v) in values {
                let mut value = Vec::new();
                bytes_field(&mut value, 1, tag.as_bytes());
                value.push(2 << 3 | 5);
                value.extend_from_slice(&v.to_le_bytes());
                bytes_field(&mut summary, 1, &value);
            }
            bytes_field(&mut out, 5, &summary);
        }
        // SessionLog{status (field 1, enum) = START (1)}.
        EventBody::SessionStart => bytes_field(&mut out, 7, &[1 << 3, 1]),
    }
    out
}

// ------------------------------------------------------------------ metrics lines → scalars

/// The scalars of a `metrics.jsonl` line under transformers' tag names: `lr` →
/// `train/learning_rate`, `eval_loss` → `eval/loss`, `train/…` and `eval/…` as they are, any
/// other number `x` → `train/x`. `step` and values that are not numbers (`skipped`, a NaN
/// written as `null`) are left out.
pub fn scalars(line: &serde_json::Value) -> Vec<(String, f32)> {
    let Some(fields) = line.as_object() else { return Vec::new() };
    fields
        .iter()
        .filter(|(k, _)| k.as_str() != "step")
        .filter_map(|(k, v)| {
            let v = v.as_f64()?;
            let tag = match k.as_str() {
                "lr" => "train/learning_rate".to_string(),
                "eval_loss" => "eval/loss".to_string(),
                k if k.starts_with("train/") || k.starts_with("eval/") => k.to_string(),
                k => format!("train/{k}"),
            };
            Some((tag, v as f32))
        })
        .collect()
}

// ------------------------------------------------------------------ the writer

/// An open event file.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The machine's name for file names (`localhost` when it cannot be read).
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let name: String = name
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' })
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

impl EventWriter {
    /// Creates `dir` and a new event file in it, opened by its `file_version` event.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let wall = now();
        let base = format!(
            "events.out.tfevents.{:010}.{}.{}",
            wall as u64,
            hostname(),
            std::process::id()
        );
        // A second writer of this process in the same second gets a numbered name.
        let mut n = 0;
        let (file, path) = loop {
            let name = if n == 0 { base.clone() } else { format!("{base}.{n}") };
            let path = dir.join(name);
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()))
                }
            }
        };
        let mut w = EventWriter { file, path };
        w.write(&event(wall, 0, EventBody::FileVersion("brain.Event:2")))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event as a record, in one `write` call, and flushes it.
    pub fn write(&mut self, event: &[u8]) -> Result<()> {
        self.file
            .write_all(&record(event))
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// The scalars of one step.
    pub fn scalars(&mut self, step: usize, values: &[(String, f32)]) -> Result<()> {
        self.write(&event(now(), step as i64, EventBody::Scalars(values)))
    }

    /// Marks a (re)start at `step`: TensorBoard drops the events of this folder from that
    /// step on that earlier files hold.
    pub fn session_start(&mut self, step: usize) -> Result<()> {
        self.write(&event(now(), step as i64, EventBody::SessionStart))
    }
}

/// The event folder of a run: `logging_dir` as given, else, on resume, the newest folder
/// under `<output_dir>/runs/` that holds event files, else a new
/// `<output_dir>/runs/<Mon DD_HH-MM-SS>_<host>` (UTC).
pub fn logging_dir(output_dir: &Path, logging_dir: Option<&Path>, resumed: bool) -> PathBuf {
    if let Some(dir) = logging_dir {
        return dir.to_path_buf();
    }
    let runs = output_dir.join("runs");
    if resumed {
        let newest = std::fs::read_dir(&runs).ok().and_then(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().is_dir() && holds_events(&e.path()))
                .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                .max()
        });
        if let Some((_, dir)) = newest {
            return dir;
        }
    }
    let secs = now() as i64;
    let date = crate::text::pyformat::strftime_utc("%b%d_%H-%M-%S", secs)
        .unwrap_or_else(|_| secs.to_string());
    runs.join(format!("{date}_{}", hostname()))
}

fn holds_events(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| e.file_name().to_string_lossy().contains("tfevents"))
    })
}

/// What rank 0 reports to besides `metrics.jsonl`. Failures warn once and turn the
/// integration off; they never end the run.
#[derive(Default)]
pub struct Tracker {
    tensorboard: Option<EventWriter>,
}

impl Tracker {
    /// Opens the integrations `report_to` names. `step` is the step the run starts after (the
    /// checkpoint's on resume).
    pub fn start(
        report_to: &ReportTo,
        output_dir: &Path,
        logging_dir_key: Option<&Path>,
        resumed: bool,
        step: usize,
    ) -> Self {
        if !report_to.tensorboard {
            return Tracker::default();
        }
        let dir = logging_dir(output_dir, logging_dir_key, resumed);
        let opened = EventWriter::create(&dir).and_then(|mut w| {
            if resumed {
                w.session_start(step + 1)?;
            }
            Ok(w)
        });
        match opened {
            Ok(w) => {
                eprintln!(
                    "TensorBoard: writing {} (view with `tensorboard --logdir {}`)",
                    w.path().display(),
                    dir.parent().filter(|_| logging_dir_key.is_none()).unwrap_or(&dir).display()
                );
                Tracker { tensorboard: Some(w) }
            }
            Err(e) => {
                tracing::warn!("report_to tensorboard: {e:#}; the run goes on without it");
                Tracker::default()
            }
        }
    }

    /// Reports one `metrics.jsonl` line.
    pub fn log(&mut self, line: &serde_json::Value) {
        let Some(w) = self.tensorboard.as_mut() else { return };
        let Some(step) = line["step"].as_u64() else { return };
        let values = scalars(line);
        if values.is_empty() {
            return;
        }
        if let Err(e) = w.scalars(step as usize, &values) {
            tracing::warn!(
                "report_to tensorboard: {e:#}; no more TensorBoard events for this run \
                 (metrics.jsonl has them)"
            );
            self.tensorboard = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn crc32c_and_its_mask_match_known_values() {
        // The CRC-32C check value and RFC 3720's 32 zero bytes.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        // Masked values from tensorboard's own `masked_crc32c`
        // (tensorboard.compat.tensorflow_stub.pywrap_tensorflow, tensorboard 2.21.0).
        assert_eq!(masked_crc32c(b""), 0xA282_EAD8);
        assert_eq!(masked_crc32c(b"a"), 0x28E4_6E78);
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
        let ramp: Vec<u8> = (0..32).collect();
        assert_eq!(masked_crc32c(&ramp), 0x951F_7892);
    }

    #[test]
    fn a_record_frames_length_data_and_their_checksums() {
        let r = record(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[8..12], &masked_crc32c(&3u64.to_le_bytes()).to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(&r[15..], &masked_crc32c(b"abc").to_le_bytes());
    }

    #[test]
    fn events_encode_as_tensorboards_protobuf_does() {
        // Expected bytes: `event_pb2.Event(...).SerializeToString()` of tensorboard 2.21.0.
        let values = [("a".to_string(), 2.0f32)];
        assert_eq!(
            hex(&event(1.5, 3, EventBody::Scalars(&values))),
            "09000000000000f83f10032a0a0a080a01611500000040"
        );
        assert_eq!(
            hex(&event(1.5, 0, EventBody::FileVersion("brain.Event:2"))),
            "09000000000000f83f1a0d627261696e2e4576656e743a32"
        );
        assert_eq!(hex(&event(1.5, 7, EventBody::SessionStart)), "09000000000000f83f10073a020801");
        // A step past 127 takes a two-byte varint.
        assert_eq!(&event(0.0, 300, EventBody::SessionStart)[9..12], &[0x10, 0xAC, 0x02]);
    }

    #[test]
    fn metrics_lines_map_to_transformers_tags() {
        let line = serde_json::json!({"step": 4, "epoch": 0.5, "loss": 1.25, "lr": 1e-4,
            "grad_norm": 0.75, "skipped": false, "tokens_per_s": 10.0, "train/rewards/chosen": 0.5,
            "eval_loss": 2.0, "eval/accuracy": 1.0, "nan": null});
        let mut got = scalars(&line);
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let want = [
            ("eval/accuracy", 1.0),
            ("eval/loss", 2.0),
            ("train/epoch", 0.5),
            ("train/grad_norm", 0.75),
            ("train/learning_rate", 1e-4),
            ("train/loss", 1.25),
            ("train/rewards/chosen", 0.5),
            ("train/tokens_per_s", 10.0),
        ];
        let want: Vec<(String, f32)> = want.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn report_to_takes_a_name_or_a_list_and_refuses_others_by_name() {
        let parse = |y: &str| serde_yaml::from_str::<ReportTo>(y);
        assert!(parse("tensorboard").unwrap().tensorboard);
        assert!(parse("[tensorboard]").unwrap().tensorboard);
        assert!(parse("all").unwrap().tensorboard);
        assert!(!parse("none").unwrap().tensorboard);
        assert!(!parse("[none]").unwrap().tensorboard);
        let e = parse("[tensorboard, wandb]").unwrap_err().to_string();
        assert!(e.contains("`wandb`") && e.contains("tensorboard, all, none"), "{e}");
        assert!(parse("[none, tensorboard]").unwrap_err().to_string().contains("`none`"));
        assert!(parse("{a: 1}").unwrap_err().to_string().contains("list of names"));
    }

    #[test]
    fn the_config_key_is_named_and_left_out_of_the_training_record() {
        use crate::train::config::TrainConfig;
        const MINIMAL: &str = "model: m\noutput_dir: out\nadapter: {plugin: lora, r: 8}\n\
                               data: {plugin: alpaca, path: d.json}\n";
        let e = TrainConfig::from_yaml(&format!("{MINIMAL}training: {{report_to: [mlflow]}}\n"))
            .unwrap_err();
        assert!(format!("{e:#}").contains("`training.report_to`"), "{e:#}");
        let plain = TrainConfig::from_yaml(MINIMAL).unwrap();
        assert!(!plain.training.report_to.tensorboard && plain.training.logging_dir.is_none());
        let tracked = TrainConfig::from_yaml(&format!(
            "{MINIMAL}training: {{report_to: tensorboard, logging_dir: tb}}\n"
        ))
        .unwrap();
        assert!(tracked.training.report_to.tensorboard);
        // Switching TensorBoard on changes nothing a checkpoint compares on --resume.
        assert_eq!(tracked.training_record(), plain.training_record());
    }

    #[test]
    fn the_writer_appends_whole_records_and_a_failure_only_warns() {
        let dir = std::env::temp_dir().join(format!("ferrotune-tb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut t =
            Tracker::start(&ReportTo { tensorboard: true }, &dir, Some(&dir.join("tb")), false, 0);
        t.log(&serde_json::json!({"step": 1, "loss": 2.5}));
        let path = t.tensorboard.as_ref().unwrap().path().to_path_buf();
        assert!(path.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."));
        let bytes = std::fs::read(&path).unwrap();
        // Walk the records: two events, each framed with valid checksums.
        let (mut at, mut events) = (0, Vec::new());
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(&bytes[at + 8..at + 12], &masked_crc32c(&bytes[at..at + 8]).to_le_bytes());
            let data = &bytes[at + 12..at + 12 + len];
            let crc = &bytes[at + 12 + len..at + 16 + len];
            assert_eq!(crc, &masked_crc32c(data).to_le_bytes());
            events.push(data.to_vec());
            at += 16 + len;
        }
        assert_eq!(events.len(), 2);
        assert!(hex(&events[0]).ends_with(&hex(b"brain.Event:2")));
        assert!(hex(&events[1]).contains(&hex(b"train/loss")));
        // A record that cannot be written turns TensorBoard off for the run, once.
        #[cfg(target_os = "linux")]
        {
            let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
            t.tensorboard = Some(EventWriter { file: full, path: "/dev/full".into() });
            t.log(&serde_json::json!({"step": 2, "loss": 2.0}));
            assert!(t.tensorboard.is_none());
            t.log(&serde_json::json!({"step": 3, "loss": 1.0}));
        }
        // A writer that cannot create its folder leaves the run without TensorBoard.
        std::fs::write(dir.join("blocker"), "").unwrap();
        let none = Tracker::start(
            &ReportTo { tensorboard: true },
            &dir,
            Some(&dir.join("blocker").join("tb")),
            false,
            0,
        );
        assert!(none.tensorboard.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
