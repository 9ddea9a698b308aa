//! Helpers shared by the integration tests: where the workspace build put the plugins and
//! the CLI, and a registry loaded from there.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferrotune::plugins::{Registry, SearchPath};

pub mod adapter_parity;
pub mod align;
pub mod browser;
pub mod external;
pub mod server;
pub mod train_parity;
pub use server::Server;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The folder holding the built plugins and the `ferrotune` binary (`target/debug`).
pub fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/<test-binary>
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// The libtorch `lib/` folder this build links against.
pub fn libtorch_lib() -> PathBuf {
    PathBuf::from(env!("FERROTUNE_TEST_LIBTORCH_LIB"))
}

/// The test-kit plugin library, checked to exist.
pub fn testkit_library() -> PathBuf {
    let p = build_dir().join("libferrotune_testkit.so");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`; `make test` does)",
        p.display()
    );
    p
}

/// A registry holding only the plugins in the build folder.
pub fn registry() -> Registry {
    testkit_library();
    Registry::discover(&SearchPath::new(&[build_dir()], None, false))
}

/// The `ferrotune` binary of this build.
pub fn ferrotune_bin() -> PathBuf {
    let p = build_dir().join("ferrotune");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`)",
        p.display()
    );
    p
}

/// Runs the CLI with `args`, without LD_LIBRARY_PATH (the binary must find libtorch itself).
pub fn ferrotune(args: &[&str]) -> Output {
    Command::new(ferrotune_bin())
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("FERROTUNE_PLUGIN_PATH")
        .output()
        .expect("run ferrotune")
}

/// A fresh, empty temporary folder for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrotune-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Resident set size of this process in bytes (Linux `/proc/self/statm`).
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

// ------------------------------------------------------------------ model tests

/// The Python of the reference stack: `$PYTHON`, else the repository's `.venv` (`make setup` creates
/// it). Panics with what to do when none exists.
pub fn python() -> PathBuf {
    let candidates: Vec<PathBuf> = std::env::var_os("PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([repo_root().join(".venv/bin/python")])
        .collect();
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!(
            "no Python with the reference stack (transformers, torch) found; tried {:?}. \
             Run `make setup` or set PYTHON to a python that has requirements/reference.txt installed",
            candidates
        )
    })
}

/// Runs `python args...` offline (no Hugging Face hub), panicking with its output on failure.
pub fn run_python(args: &[&std::ffi::OsStr]) -> Output {
    let py = python();
    let out = Command::new(&py)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", py.display()));
    assert!(
        out.status.success(),
        "{} {:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        py.display(),
        args,
        out.status,
        stdout(&out),
        stderr(&out)
    );
    out
}

/// FNV-1a, for cache keys that stay the same across Rust versions.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// One libtorch thread per test: the model tests run several tests at once on tiny tensors, and
/// libtorch's default (a thread per core in every test) oversubscribes a small machine.
pub fn one_torch_thread() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| tch::set_num_threads(1));
}

/// The tiny checkpoints and reference outputs of `tests/python/make_parity_models.py`, built
/// once into `target/parity-models/<hash>/` (see [`cached_reference`]).
pub fn parity_models() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    one_torch_thread();
    DIR.get_or_init(|| cached_reference("make_parity_models.py", "parity-models")).clone()
}

/// Runs the reference script `tests/python/<script> OUT_DIR` once and keeps its outputs in
/// `target/<cache>/<hash>/`, reused while the script, `reference_common.py` it imports and the
/// pinned reference stack (`requirements/*.txt`) are unchanged; outputs of older versions are
/// removed. The script writes a `DONE` file last.
pub fn cached_reference(script: &str, cache: &str) -> PathBuf {
    let script = repo_root().join("tests/python").join(script);
    let mut text =
        std::fs::read(&script).unwrap_or_else(|e| panic!("cannot read {}: {e}", script.display()));
    for input in
        ["tests/python/reference_common.py", "requirements/reference.txt", "requirements/torch.txt"]
    {
        text.extend(std::fs::read(repo_root().join(input)).unwrap_or_default());
    }
    let base = repo_root().join("target").join(cache);
    let dir = base.join(format!("{:016x}", fnv1a(&text)));
    if dir.join("DONE").is_file() {
        return dir;
    }
    for old in std::fs::read_dir(&base).into_iter().flatten().flatten() {
        let name = old.file_name().to_string_lossy().into_owned();
        if name.len() == 16 && name.chars().all(|c| c.is_ascii_hexdigit()) {
            let _ = std::fs::remove_dir_all(old.path());
        }
    }
    let tmp = base.join(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    run_python(&[script.as_os_str(), tmp.as_os_str()]);
    assert!(
        tmp.join("DONE").is_file(),
        "{} did not finish (no DONE file in {})",
        script.display(),
        tmp.display()
    );
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another process built the same folder meanwhile.
        let _ = std::fs::remove_dir_all(&tmp);
        assert!(
            dir.join("DONE").is_file(),
            "cannot move the outputs of {} into {}",
            script.display(),
            dir.display()
        );
    }
    dir
}

/// `max |a - b| / max |b|` over all elements (both converted to f64).
pub fn relative_error(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let a = a.to_kind(tch::Kind::Double);
    let b = b.to_kind(tch::Kind::Double);
    let diff = (&a - &b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[]).max(1e-30)
}

/// Writes a small WordLevel `tokenizer.json` (plus `tokenizer_config.json`) into `dir` and
/// returns the tokenizer.json path. Ids: `<unk>` 0, `<|endoftext|>` 1 (eos), `<pad>` 2, then
/// `w0`..`w{words-1}`.
pub fn write_tiny_tokenizer(dir: &Path, words: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let specials = ["<unk>", "<|endoftext|>", "<pad>"];
    let mut vocab = serde_json::Map::new();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), serde_json::json!(i));
    }
    for w in 0..words {
        vocab.insert(format!("w{w}"), serde_json::json!(specials.len() + w));
    }
    let added = special_added_tokens(&specials);
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string_pretty(&tokenizer).unwrap()).unwrap();
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<pad>",
        "unk_token": "<unk>", "bos_token": null, "model_max_length": 2048
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    path
}

/// tokenizer.json `added_tokens` entries for special tokens with ids 0, 1, ….
fn special_added_tokens(specials: &[&str]) -> Vec<serde_json::Value> {
    specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                               "normalized": false, "special": true})
        })
        .collect()
}

// ------------------------------------------------------------------ training tests

/// A ChatML chat template (no default system turn), as Qwen2's without its extras.
pub const CHATML_TEMPLATE: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Writes a small WordLevel tokenizer with ChatML special tokens and [`CHATML_TEMPLATE`] into
/// `dir` (`tokenizer.json`, `tokenizer_config.json`), which both ferrotune and transformers'
/// `AutoTokenizer` load. Ids: `<|endoftext|>` 0 (pad), `<|im_start|>` 1, `<|im_end|>` 2 (eos),
/// `<unk>` 3, `"\n"` 4, `" "` 5, `system` 6, `user` 7, `assistant` 8, then `w0`..`w{words-1}`.
/// Every whitespace character is a token of its own.
pub fn write_chat_tokenizer(dir: &Path, words: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"];
    let mut vocab = serde_json::Map::new();
    let plain = ["\n", " ", "system", "user", "assistant"].map(String::from);
    for (i, t) in specials
        .iter()
        .map(|s| s.to_string())
        .chain(plain)
        .chain((0..words).map(|w| format!("w{w}")))
        .enumerate()
    {
        vocab.insert(t, serde_json::json!(i));
    }
    let added = special_added_tokens(&specials);
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\\s"}, "behavior": "Isolated", "invert": false},
        "post_processor": null, "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string_pretty(&tokenizer).unwrap()).unwrap();
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": "<unk>", "bos_token": null, "model_max_length": 2048, "chat_template": CHATML_TEMPLATE
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    path
}

/// Writes `rows` alpaca rows as JSON Lines, made of the words `w0`..`w{words-1}` of
/// [`write_chat_tokenizer`]: an instruction of 2–7 words, an input of 0 or 1–4 words (every
/// other row has none) and an output of 1–8 words, drawn from a generator seeded by `seed`.
pub fn write_alpaca_rows(path: &Path, rows: usize, words: usize, seed: u64) {
    let mut state = seed;
    let mut next = move |n: u64| {
        state =
            state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) % n
    };
    let mut text = |n: u64| (0..n).map(|_| format!("w{}", next(words as u64))).collect::<Vec<_>>();
    let mut lines = Vec::new();
    for i in 0..rows {
        let instruction = text(2 + (i as u64 * 7 + 3) % 6).join(" ");
        let input = if i % 2 == 0 { String::new() } else { text(1 + (i as u64 * 5) % 4).join(" ") };
        let output = text(1 + (i as u64 * 3 + 1) % 8).join(" ");
        lines.push(
            serde_json::json!({"instruction": instruction, "input": input, "output": output})
                .to_string(),
        );
    }
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// `ferrotune init-model --preset tiny --dtype f32 --seed SEED` with `tokenizer` into `out`.
pub fn init_tiny_model(tokenizer: &Path, out: &Path, seed: u64) {
    let o = ferrotune(&[
        "init-model",
        "--preset",
        "tiny",
        "--dtype",
        "f32",
        "--seed",
        &seed.to_string(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "init-model: {}", stderr(&o));
}

/// The real Qwen2 tokenizer the set-up generates (`assets/qwen2-tokenizer`).
pub fn qwen2_tokenizer() -> PathBuf {
    let d = repo_root().join("assets/qwen2-tokenizer");
    assert!(
        d.join("tokenizer.json").is_file(),
        "{} is missing: `make test` generates it",
        d.display()
    );
    d
}

/// `ferrotune init-model --preset tiny-vl --dtype f32 --seed SEED` with the real Qwen2
/// tokenizer into `out`: a tiny random Qwen2-VL.
pub fn init_tiny_vl_model(out: &Path, seed: u64) {
    let o = ferrotune(&[
        "init-model",
        "--preset",
        "tiny-vl",
        "--dtype",
        "f32",
        "--seed",
        &seed.to_string(),
        "--tokenizer",
        qwen2_tokenizer().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "init-model: {}", stderr(&o));
}

/// A valid `w`×`h` 8-bit greyscale PNG of zeros, small on the wire: its one IDAT is a zlib
/// stream of a single dynamic-Huffman deflate block in which a copy of 258 zeros costs 2 bits
/// (`w`·`h` = 400 M pixels → ~390 KB), the shape of a decompression bomb.
pub fn zero_png(w: u32, h: u32) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        bit: u32,
    }
    impl Bits {
        /// `n` bits of `v`, least significant first (deflate's header fields and extra bits).
        fn put(&mut self, v: u32, n: u32) {
            for i in 0..n {
                if self.bit == 0 {
                    self.out.push(0);
                }
                let last = self.out.len() - 1;
                self.out[last] |= (((v >> i) & 1) as u8) << self.bit;
                self.bit = (self.bit + 1) % 8;
            }
        }
        /// A Huffman code of `n` bits, most significant first.
        fn code(&mut self, c: u32, n: u32) {
            for i in (0..n).rev() {
                self.put((c >> i) & 1, 1);
            }
        }
    }
    let raw = u64::from(h) * (u64::from(w) + 1); // a filter byte (0) before each row
    let mut b = Bits { out: Vec::new(), bit: 0 };
    b.put(1, 1); // BFINAL
    b.put(2, 2); // dynamic Huffman
    b.put(29, 5); // HLIT: 286 literal/length codes
    b.put(1, 5); // HDIST: 2 distance codes (1 and 2 back), a complete code
    b.put(14, 4); // HCLEN: 18 code-length codes
                  // code-length code lengths in deflate's order 16 17 18 0 8 7 9 6 10 5 11 4 12 3 13 2 14 1:
                  // 18 (runs of zeros) → 1 bit, lengths 1 and 2 → 2 bits
    for len in [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 2] {
        b.put(len, 3);
    }
    // canonical codes: 18 = 0, 1 = 10, 2 = 11; 18 takes a run length - 11 in 7 bits
    let zeros = |b: &mut Bits, n: u32| {
        b.code(0, 1);
        b.put(n - 11, 7);
    };
    // literal/length lengths: 0 → 2, 1..=255 → 0, 256 → 2, 257..=284 → 0, 285 → 1;
    // distances 0 and 1 → 1
    b.code(0b11, 2);
    zeros(&mut b, 138);
    zeros(&mut b, 117);
    b.code(0b11, 2);
    zeros(&mut b, 28);
    for _ in 0..3 {
        b.code(0b10, 2);
    }
    // canonical codes: 285 = 0, literal 0 = 10, end of block = 11; distance 0 (1 back) = 0
    b.code(0b10, 2);
    let copies = (raw - 1) / 258;
    for _ in 0..copies {
        b.code(0, 1);
        b.code(0, 1);
    }
    for _ in 0..(raw - 1) % 258 {
        b.code(0b10, 2);
    }
    b.code(0b11, 2);
    let mut zlib = vec![0x78, 0x01];
    zlib.extend_from_slice(&b.out);
    let adler = ((raw % 65521) << 16) | 1; // a stays 1 and b sums it over every zero byte
    zlib.extend_from_slice(&(adler as u32).to_be_bytes());

    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        png.extend_from_slice(kind);
        png.extend_from_slice(data);
        png.extend_from_slice(&crc.sum().to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &zlib);
    chunk(b"IEND", &[]);
    png
}

/// What most training tests start from: a work folder holding a chat tokenizer of `words`
/// words ([`write_chat_tokenizer`]), a tiny model initialised with `model_seed`
/// ([`init_tiny_model`]) and `rows` alpaca rows drawn with `data_seed` ([`write_alpaca_rows`]).
pub struct TextFixture {
    pub work: PathBuf,
    pub model: PathBuf,
    pub data: PathBuf,
}

pub fn text_fixture(
    tag: &str,
    words: usize,
    model_seed: u64,
    rows: usize,
    data_seed: u64,
) -> TextFixture {
    let work = temp_dir(tag);
    write_chat_tokenizer(&work.join("tokenizer"), words);
    let model = work.join("model");
    init_tiny_model(&work.join("tokenizer"), &model, model_seed);
    let data = work.join("alpaca.jsonl");
    write_alpaca_rows(&data, rows, words, data_seed);
    TextFixture { work, model, data }
}

/// The JSON objects of a JSON Lines file (a metrics file).
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: `{l}`: {e}", path.display()))
        })
        .collect()
}

/// Moves every adapter tensor of `model` away from its initial value (B = 0 would leave the
/// base unchanged, and a test comparing adapter outputs trivial): by N(0, `scale`²), DoRA's
/// magnitude by a factor 1 + N(0, 0.2²); drawn from libtorch's generator seeded with `seed`.
pub fn perturb_adapter(model: &mut ferrotune::peft::PeftModel, seed: i64, scale: f64) {
    tch::manual_seed(seed);
    let state: Vec<_> = model
        .adapter_state_dict()
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let noise = t.randn_like();
            let t = if k.ends_with("lora_magnitude_vector") {
                &t * (noise * 0.2 + 1.0)
            } else {
                &t + noise * scale
            };
            (k, t)
        })
        .collect();
    model.load_adapter_state_dict(state).unwrap();
}

/// What [`launch_and_kill_rank1`] saw: launch's exit status, its stderr, and how long launch
/// took to exit after rank 1 was killed.
pub struct KilledLaunch {
    pub status: std::process::ExitStatus,
    pub stderr: String,
    pub exit_after_kill: std::time::Duration,
}

/// Runs `ferrotune launch --nproc 2 --timeout 20 train CONFIG`, waits until `checkpoint`
/// exists (at most `wait`), then SIGKILLs rank 1 and waits for launch to exit.
pub fn launch_and_kill_rank1(
    config: &Path,
    checkpoint: &Path,
    wait: std::time::Duration,
) -> KilledLaunch {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let mut child = Command::new(ferrotune_bin())
        .args(["launch", "--nproc", "2", "--timeout", "20", "train", config.to_str().unwrap()])
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("FERROTUNE_PLUGIN_PATH")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in err.lines().map_while(Result::ok) {
            if let Some(pid) = line.strip_prefix("[launch] rank 1 pid ") {
                tx.send(pid.trim().parse::<i32>().unwrap()).unwrap();
            }
            all.push(line);
        }
        all.join("\n")
    });
    let pid = rx.recv_timeout(Duration::from_secs(30)).expect("launch prints the ranks' pids");
    let t0 = Instant::now();
    while !checkpoint.exists() {
        assert!(t0.elapsed() < wait, "no {}", checkpoint.display());
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed_at = Instant::now();
    assert!(Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    let status = child.wait().unwrap();
    let exit_after_kill = killed_at.elapsed();
    KilledLaunch { status, stderr: reader.join().unwrap(), exit_after_kill }
}

/// A temporary folder ([`temp_dir`]) removed when the test ends, passed or not.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        Self(temp_dir(tag))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// [`ferrotune`] on one intra-op thread: a tiny model's operations are too small to share
/// out, and on a busy machine the thread pool's spinning costs more than it saves.
pub fn ferrotune_one_thread(args: &[&str]) -> Output {
    Command::new(ferrotune_bin())
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("FERROTUNE_PLUGIN_PATH")
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("run ferrotune")
}

/// Reference-file helpers of the parity tests (inputs and outputs a Python script wrote).
pub mod reference {
    use std::path::Path;

    use ferrotune::model::CausalLM;
    use ferrotune::peft::PeftModel;
    use serde_json::Value;
    use tch::{Device, Kind, Tensor};

    /// A JSON file.
    pub fn json(path: &Path) -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Token-id rows.
    pub fn rows(v: &Value) -> Vec<Vec<i64>> {
        serde_json::from_value(v.clone()).unwrap()
    }

    /// `[t, h, w]` grids.
    pub fn grids(v: &Value) -> Vec<[i64; 3]> {
        serde_json::from_value(v.clone()).unwrap()
    }

    /// Equal-length rows as a `[rows, len]` tensor.
    pub fn tensor2(rows: &[Vec<i64>]) -> Tensor {
        let flat: Vec<i64> = rows.iter().flatten().copied().collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, -1])
    }

    /// One tensor of a safetensors file.
    pub fn read(path: &Path, name: &str) -> Tensor {
        Tensor::read_safetensors(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} not in {}", path.display()))
            .1
    }

    /// A model directory in fp32 on the CPU, wrapped for adapters.
    pub fn load(dir: &Path) -> PeftModel {
        CausalLM::load(dir, Device::Cpu, Kind::Float)
            .map(PeftModel::new)
            .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()))
    }

    /// Logits at the positions where `mask` is 1, flattened.
    pub fn unpadded(logits: &Tensor, mask: &Tensor) -> Tensor {
        logits.masked_select(&mask.ne(0).unsqueeze(-1).expand_as(logits))
    }

    pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }
}
