//! `ferrotune board` end to end: its HTTP rules (token, folders) with a plain client, then the
//! page in headless Chromium (DevTools protocol, tests/common/browser.rs): a finished run's
//! loss curve has as many points as its metrics.jsonl has lines with a loss; a run started from
//! the form grows its curve and turns finished; stop and resume; the story sample's images in
//! the data preview; chat through a run's adapter equals `ferrotune generate --adapter`.
//!
//! With `FERROTUNE_BOARD_SCREENSHOTS=DIR` the browser test writes a screenshot of each page
//! there (the README's pictures come from `make board-screenshots`).
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrotune_tests::browser::{Browser, Page};
use ferrotune_tests::{ferrotune, ferrotune_bin, read_jsonl, stderr, stdout, TempDir};
use serde_json::{json, Value};

const TOKEN: &str = "board-test-token";
/// Optimizer steps of the finished run the fixture trains (enough for its adapter to answer
/// in words).
const DONE_STEPS: usize = 30;

/// A running `ferrotune board`, stopped (SIGTERM, then killed) on drop.
struct Board {
    child: Child,
    url: String,
}

impl Board {
    fn start(runs: &Path, models: &Path, data: &Path) -> Board {
        let mut child = Command::new(ferrotune_bin())
            .args(["board", "--port", "0", "--token", TOKEN])
            .args(["--runs", runs.to_str().unwrap()])
            .args(["--models", models.to_str().unwrap()])
            .args(["--data", data.to_str().unwrap()])
            .env_remove("LD_LIBRARY_PATH")
            .env_remove("FERROTUNE_PLUGIN_PATH")
            .env("OMP_NUM_THREADS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in `{line}`"))
            .split("/?")
            .next()
            .unwrap()
            .to_string();
        Board { child, url }
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req =
            ureq::request(method, &format!("{}{path}", self.url)).timeout(Duration::from_secs(120));
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let (code, r) = match resp {
            Ok(r) => (r.status(), r),
            Err(ureq::Error::Status(code, r)) => (code, r),
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let text = r.into_string().unwrap();
        (code, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    fn get(&self, path: &str) -> Value {
        let (code, v) = self.call("GET", path, Some(TOKEN), None);
        assert_eq!(code, 200, "GET {path}: {v}");
        v
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, Some(TOKEN), Some(body))
    }
}

impl Drop for Board {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Models, data and one finished run, made with the CLI.
struct Fixture {
    _dir: TempDir,
    runs: PathBuf,
    models: PathBuf,
    data: PathBuf,
    /// The tiny text model and its alpaca rows.
    model: PathBuf,
    alpaca: PathBuf,
    /// The tiny Qwen2-VL model and the StoryReasoning sample (copied under --data).
    vl_model: PathBuf,
    story: PathBuf,
}

fn run_config(
    model: &Path,
    alpaca: &Path,
    out: &Path,
    steps: usize,
    save_steps: Option<usize>,
) -> String {
    let save = save_steps.map(|s| format!("  save_steps: {s}\n")).unwrap_or_default();
    format!(
        "model: {}\noutput_dir: {}\nadapter:\n  plugin: lora\n  r: 4\n  lora_alpha: 8\n  target_modules: all-linear\n\
         optimizer:\n  lr: 5.0e-3\ndata:\n  plugin: alpaca\n  path: {}\n  cutoff_len: 64\n\
         training:\n  max_steps: {steps}\n  micro_batch_size: 2\n  logging_steps: 1\n{save}",
        model.display(),
        out.display(),
        alpaca.display()
    )
}

fn fixture(tag: &str) -> Fixture {
    let dir = TempDir::new(tag);
    let (runs, models, data) = (dir.0.join("runs"), dir.0.join("models"), dir.0.join("data"));
    for d in [&runs, &models, &data] {
        std::fs::create_dir_all(d).unwrap();
    }
    let model = models.join("tiny");
    // The real Qwen2 tokenizer, so that answers read as text.
    ferrotune_tests::init_tiny_model(&ferrotune_tests::qwen2_tokenizer(), &model, 3);
    let vl_model = models.join("tiny-vl");
    ferrotune_tests::init_tiny_vl_model(&vl_model, 5);
    let alpaca = data.join("alpaca.jsonl");
    ferrotune_tests::write_alpaca_rows(&alpaca, 32, 24, 7);
    let story = data.join("storyreasoning-sample");
    std::fs::create_dir_all(&story).unwrap();
    let sample = ferrotune_tests::repo_root().join("datasets/storyreasoning-sample");
    for f in ["train.parquet", "test.parquet"] {
        std::fs::copy(sample.join(f), story.join(f)).unwrap();
    }
    // One finished run, trained by the CLI.
    let cfg = dir.0.join("done.yaml");
    std::fs::write(&cfg, run_config(&model, &alpaca, &runs.join("done"), DONE_STEPS, None))
        .unwrap();
    let o = ferrotune(&["train", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "train: {}", stderr(&o));
    Fixture { _dir: dir, runs, models, data, model, alpaca, vl_model, story }
}

/// Polls `GET /api/runs/NAME` until `done(state)`; returns the state.
fn wait_state(b: &Board, name: &str, done: impl Fn(&str) -> bool, secs: u64) -> String {
    let t = Instant::now();
    loop {
        let state = b.get(&format!("/api/runs/{name}"))["state"].as_str().unwrap().to_string();
        if done(&state) {
            return state;
        }
        assert!(t.elapsed() < Duration::from_secs(secs), "run {name} still {state}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Lines of `metrics.jsonl` that carry `key`.
fn points(run: &Path, key: &str) -> usize {
    read_jsonl(&run.join("metrics.jsonl")).iter().filter(|l| l.get(key).is_some()).count()
}

fn wait(page: &Page, what: &str, condition: &str, secs: u64) -> Value {
    page.wait_for(condition, Duration::from_secs(secs)).unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn js(page: &Page, expr: &str) -> Value {
    page.eval(expr).unwrap_or_else(|e| panic!("{expr}: {e}"))
}

/// `data-points` of run `run`'s series in chart `metric` (-1 when there is none).
fn series_points(page: &Page, metric: &str, run: &str) -> i64 {
    js(
        page,
        &format!(
            "(() => {{ const s = document.querySelector('svg.chart[data-metric=\"{metric}\"] polyline.series[data-run=\"{run}\"]'); \
             return s ? Number(s.dataset.points) : -1; }})()"
        ),
    )
    .as_i64()
    .unwrap_or(-1)
}

fn screenshot(page: &Page, name: &str) {
    let Some(dir) = std::env::var_os("FERROTUNE_BOARD_SCREENSHOTS") else { return };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    page.screenshot(&dir.join(format!("{name}.png"))).unwrap();
}

/// Selects `value` in `select`, waiting for the option to be there.
fn choose(page: &Page, select: &str, value: &str) {
    let v = serde_json::to_string(value).unwrap();
    wait(
        page,
        &format!("option {value} in {select}"),
        &format!("[...document.querySelectorAll('{select} option')].some(o => o.value === {v})"),
        30,
    );
    page.set_value(select, value).unwrap();
}

#[test]
fn board_serves_only_with_the_token_and_only_its_folders() {
    let f = fixture("board-http");
    let b = Board::start(&f.runs, &f.models, &f.data);
    // No token, a wrong token: 401, on pages and API alike.
    for path in ["/", "/api/runs", "/assets/app.js", "/api/runs/done/metrics"] {
        let (code, _) = b.call("GET", path, None, None);
        assert_eq!(code, 401, "{path} without a token");
        let (code, _) = b.call("GET", path, Some("wrong-token-123"), None);
        assert_eq!(code, 401, "{path} with a wrong token");
    }
    let (code, v) = b.call("GET", "/?token=wrong-token-123", None, None);
    assert_eq!(code, 401, "{v}");
    // The page: with ?token= it is served and sets the cookie the page's requests carry.
    let r = ureq::get(&format!("{}/?token={TOKEN}", b.url)).call().unwrap();
    let cookie = r.header("set-cookie").unwrap_or_default().to_string();
    assert!(
        cookie.starts_with(&format!("ferrotune_board={TOKEN}")) && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let r = ureq::get(&format!("{}/api/runs", b.url))
        .set("Cookie", &format!("ferrotune_board={TOKEN}"))
        .call()
        .unwrap();
    assert_eq!(r.status(), 200);

    // Paths outside --runs/--models/--data: 403, links included.
    let outside = f.runs.parent().unwrap().join("done.yaml");
    let (code, v) =
        b.call("GET", &format!("/api/file?path={}", outside.display()), Some(TOKEN), None);
    assert_eq!(code, 403, "{v}");
    std::os::unix::fs::symlink(&outside, f.data.join("link.yaml")).unwrap();
    let (code, v) = b.call(
        "GET",
        &format!("/api/file?path={}", f.data.join("link.yaml").display()),
        Some(TOKEN),
        None,
    );
    assert_eq!(code, 403, "{v}");
    let (code, _) =
        b.call("GET", &format!("/api/file?path={}", f.alpaca.display()), Some(TOKEN), None);
    assert_eq!(code, 200);
    let (code, v) = b.post("/api/chat/start", json!({"model": "/usr"}));
    assert_eq!(code, 403, "{v}");
    // A run whose config reads a model from elsewhere is refused before anything starts.
    let elsewhere = ferrotune_tests::qwen2_tokenizer();
    let (code, v) =
        b.post("/api/runs", json!({"name": "escape", "yaml": run_config(&elsewhere, &f.alpaca, Path::new("x"), 2, None)}));
    assert_eq!(code, 403, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("model"), "{v}");
    assert!(!f.runs.join("escape").exists());
    // Names that would leave the folder.
    for name in ["../x", ".hidden", "a/b", ""] {
        let (code, v) = b.post("/api/runs", json!({"name": name, "yaml": "model: m"}));
        assert_eq!(code, 400, "{name}: {v}");
    }
    let (code, v) = b.call("GET", "/api/runs/..%2Fdata/metrics", Some(TOKEN), None);
    assert!(code == 400 || code == 404, "{code} {v}");

    // The finished run, as the list and the stream show it.
    let runs = b.get("/api/runs");
    let done = runs["runs"].as_array().unwrap().iter().find(|r| r["name"] == "done").unwrap();
    assert_eq!(done["state"], "finished", "{done}");
    assert_eq!(done["steps"], DONE_STEPS);
    assert!(done["has_adapter"].as_bool().unwrap());
    let (code, v) = b.post("/api/runs/done/resume", json!({}));
    assert_eq!(code, 409, "a finished run does not resume: {v}");
    let (code, v) = b.post("/api/runs/done/stop", json!({}));
    assert_eq!(code, 409, "{v}");

    // Two ranks through `launch --nproc 2`, to the end.
    let (code, v) = b.post(
        "/api/runs",
        json!({"name": "ddp", "nproc": 2, "yaml": run_config(&f.model, &f.alpaca, Path::new("x"), 4, None) + "memory:\n  plugin: ddp\n"}),
    );
    assert_eq!(code, 200, "{v}");
    let (code, v) = b.post("/api/runs", json!({"name": "ddp", "yaml": "model: m"}));
    assert_eq!(code, 409, "the name is taken: {v}");
    let state = wait_state(&b, "ddp", |s| s != "running", 180);
    let log = std::fs::read_to_string(f.runs.join("ddp/train.log")).unwrap_or_default();
    assert_eq!(state, "finished", "{log}");
    let detail = b.get("/api/runs/ddp");
    assert_eq!(
        detail["command"].as_array().unwrap()[1..4],
        [json!("launch"), json!("--nproc"), json!("2")],
        "{detail}"
    );
    assert_eq!(points(&f.runs.join("ddp"), "loss"), 4);

    // A run killed with SIGKILL is failed, and a board started later says so too.
    let (code, v) = b.post(
        "/api/runs",
        json!({"name": "killed", "yaml": run_config(&f.model, &f.alpaca, Path::new("x"), 100000, None)}),
    );
    assert_eq!(code, 200, "{v}");
    let t = Instant::now();
    while !f.runs.join("killed/metrics.jsonl").is_file()
        || points(&f.runs.join("killed"), "loss") == 0
    {
        assert!(t.elapsed() < Duration::from_secs(120), "no step logged");
        std::thread::sleep(Duration::from_millis(100));
    }
    let record: Value =
        serde_json::from_slice(&std::fs::read(f.runs.join("killed/board.json")).unwrap()).unwrap();
    unsafe {
        libc::kill(record["pid"].as_i64().unwrap() as libc::pid_t, libc::SIGKILL);
    }
    assert_eq!(wait_state(&b, "killed", |s| s != "running", 30), "failed");
    let detail = b.get("/api/runs/killed");
    assert!(detail["exit_code"].is_null(), "killed by a signal: {detail}");
    // A board killed with SIGKILL leaves its run going; the next board shows it running and
    // stops it.
    let (code, v) = b.post(
        "/api/runs",
        json!({"name": "orphan", "yaml": run_config(&f.model, &f.alpaca, Path::new("x"), 100000, None)}),
    );
    assert_eq!(code, 200, "{v}");
    let t = Instant::now();
    while !f.runs.join("orphan/metrics.jsonl").is_file()
        || points(&f.runs.join("orphan"), "loss") == 0
    {
        assert!(t.elapsed() < Duration::from_secs(120), "no step logged");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut b = b;
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    drop(b);
    let b = Board::start(&f.runs, &f.models, &f.data);
    assert_eq!(b.get("/api/runs/killed")["state"], "failed");
    assert_eq!(b.get("/api/runs/ddp")["state"], "finished");
    assert_eq!(b.get("/api/runs/orphan")["state"], "running");
    let record: Value =
        serde_json::from_slice(&std::fs::read(f.runs.join("orphan/board.json")).unwrap()).unwrap();
    let pid = record["pid"].as_i64().unwrap();
    let (code, v) = b.post("/api/runs/orphan/stop", json!({}));
    assert_eq!((code, &v["state"]), (200, &json!("stopped")), "{v}");
    let t = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z")
    {
        assert!(t.elapsed() < Duration::from_secs(20), "the orphaned run {pid} did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Chat over HTTP: serve's routes through the board, an adapter loaded from --runs only,
    // unloaded with serve's DELETE route.
    let (code, v) =
        b.post("/api/serve/v1/chat/completions", json!({"model": "tiny", "messages": []}));
    assert_eq!(code, 409, "no model loaded yet: {v}");
    let (code, v) = b.post("/api/chat/start", json!({"model": f.model}));
    assert_eq!((code, &v["base"]), (200, &json!("tiny")), "{v}");
    let (code, v) =
        b.post("/api/serve/v1/adapters", json!({"name": "done", "path": f.runs.join("done")}));
    assert_eq!(code, 200, "{v}");
    let (code, v) = b.post(
        "/api/serve/v1/adapters",
        json!({"name": "x", "path": f.runs.parent().unwrap().join("done.yaml")}),
    );
    assert_eq!(code, 403, "{v}");
    let (code, v) = b.call("DELETE", "/api/serve/v1/adapters/done", Some(TOKEN), None);
    assert_eq!(code, 200, "{v}");
    let (code, v) = b.call("GET", "/api/serve/v1/models", Some(TOKEN), None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["data"].as_array().unwrap().len(), 1, "{v}");

    // Plugins with their schemas, as `plugins --json`.
    let plugins = b.get("/api/plugins");
    let lora = plugins["plugins"].as_array().unwrap().iter().find(|p| p["name"] == "lora").unwrap();
    assert!(lora["schema"]["properties"]["r"].is_object(), "{lora}");
}

#[test]
fn board_in_a_browser() {
    let Some(browser) = Browser::launch().unwrap() else { return };
    let f = fixture("board-browser");
    let b = Board::start(&f.runs, &f.models, &f.data);
    let page = browser.new_page().unwrap();
    page.set_viewport(1280, 800).unwrap();
    page.goto(&format!("{}/?token={TOKEN}#runs", b.url)).unwrap();

    // Runs: the finished run, its loss curve with one point per metrics line.
    wait(
        &page,
        "the finished run listed",
        "document.querySelector('tr[data-run=\"done\"][data-state=\"finished\"]') !== null",
        30,
    );
    let want = points(&f.runs.join("done"), "loss") as i64;
    assert_eq!(want, DONE_STEPS as i64);
    page.goto(&format!("{}/#run/done", b.url)).unwrap();
    wait(
        &page,
        "the loss curve",
        &format!("(document.querySelector('svg.chart[data-metric=\"loss\"] polyline.series[data-run=\"done\"]')||{{dataset:{{}}}}).dataset.points === '{want}'"),
        30,
    );
    for (metric, key) in
        [("lr", "lr"), ("grad_norm", "grad_norm"), ("tokens_per_s", "tokens_per_s")]
    {
        let n = points(&f.runs.join("done"), key) as i64;
        wait(&page, metric, &format!("{} === {n}", series_expr(metric, "done")), 10);
    }
    assert_eq!(js(&page, "document.querySelector('#run-state').dataset.state"), "finished");
    screenshot(&page, "run");

    // New run from the form: model, data, LoRA from its schema, draft, check, start.
    page.goto(&format!("{}/#new", b.url)).unwrap();
    wait(&page, "the form", "document.querySelector('#new-run-form') !== null", 10);
    page.set_value("#run-name", "fromform").unwrap();
    choose(&page, "#model", f.model.to_str().unwrap());
    choose(&page, "select[data-section=\"adapter\"]", "lora");
    wait(&page, "lora's keys", "document.querySelector('[name=\"adapter.r\"]') !== null", 10);
    page.set_value("[name=\"adapter.r\"]", "4").unwrap();
    choose(&page, "#data-source", f.alpaca.to_str().unwrap());
    choose(&page, "select[data-section=\"data\"]", "alpaca");
    for (key, value) in [
        ("training.max_steps", "40"),
        ("training.logging_steps", "1"),
        // Slow enough (8 micro-batches a step) that the page sees the curve between its ends.
        ("training.micro_batch_size", "4"),
        ("training.gradient_accumulation_steps", "8"),
        ("data.cutoff_len", "64"),
        ("optimizer.lr", "0.005"),
    ] {
        wait(&page, key, &format!("document.querySelector('[name=\"{key}\"]') !== null"), 10);
        page.set_value(&format!("[name=\"{key}\"]"), value).unwrap();
    }
    page.click("#draft").unwrap();
    wait(
        &page,
        "the drafted YAML",
        "document.querySelector('#yaml').value.includes('max_steps: 40')",
        30,
    );
    let yaml = js(&page, "document.querySelector('#yaml').value");
    let yaml = yaml.as_str().unwrap();
    assert!(
        yaml.contains("plugin: lora") && yaml.contains("r: 4") && yaml.contains("plugin: alpaca"),
        "{yaml}"
    );
    page.click("#check").unwrap();
    wait(
        &page,
        "data check",
        "(document.querySelector('#check-result')||{dataset:{}}).dataset.ok === 'true'",
        60,
    );
    screenshot(&page, "new-run");
    page.click("#start").unwrap();
    wait(&page, "the run page", "location.hash === '#run/fromform'", 30);
    // The curve grows while it runs, and the state turns finished.
    let run = f.runs.join("fromform");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let n = series_points(&page, "loss", "fromform");
        if seen.last() != Some(&n) {
            seen.push(n);
        }
        let state =
            js(&page, "(document.querySelector('#run-state')||{dataset:{}}).dataset.state || ''");
        if state == "finished" && n == points(&run, "loss") as i64 {
            break;
        }
        assert!(
            state != "failed",
            "the run failed: {}",
            std::fs::read_to_string(run.join("train.log")).unwrap_or_default()
        );
        assert!(
            Instant::now() < deadline,
            "the run did not finish: points seen {seen:?}, state {state}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(*seen.last().unwrap(), 40);
    let growing: Vec<i64> = seen.iter().copied().filter(|&n| n > 0).collect();
    assert!(
        growing.len() >= 2 && growing.windows(2).all(|w| w[0] < w[1]),
        "the curve did not grow live: {seen:?}"
    );
    wait(
        &page,
        "the log",
        "document.querySelector('#run-log').textContent.includes('\"step\":40')",
        20,
    );
    // Overlay: the finished run's curves join this run's charts.
    wait(
        &page,
        "the overlay choice",
        "document.querySelector('input.overlay[data-run=\"done\"]') !== null",
        10,
    );
    page.click("input.overlay[data-run=\"done\"]").unwrap();
    wait(
        &page,
        "the overlaid curve",
        &format!(
            "{} === {DONE_STEPS} && {} === 40",
            series_expr("loss", "done"),
            series_expr("loss", "fromform")
        ),
        20,
    );
    screenshot(&page, "overlay");

    // Stop and resume: a long run with checkpoints, stopped from the page, resumed from it.
    let (code, v) = b.post(
        "/api/runs",
        json!({"name": "long", "yaml": run_config(&f.model, &f.alpaca, Path::new("ignored"), 100000, Some(2))}),
    );
    assert_eq!(code, 200, "{v}");
    page.goto(&format!("{}/#run/long", b.url)).unwrap();
    wait(
        &page,
        "a checkpoint",
        "[...document.querySelectorAll('#run-checkpoints li')].some(li => li.textContent.includes('checkpoint-'))",
        120,
    );
    page.click("#stop-run").unwrap();
    wait(&page, "stopped", "document.querySelector('#run-state').dataset.state === 'stopped'", 30);
    let stopped_at = points(&f.runs.join("long"), "loss");
    page.click("#resume-run").unwrap();
    wait(
        &page,
        "running again",
        "document.querySelector('#run-state').dataset.state === 'running'",
        30,
    );
    let log = f.runs.join("long").join("train.log");
    let t = Instant::now();
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("resumed from") {
        assert!(t.elapsed() < Duration::from_secs(60), "no resume in {}", log.display());
        std::thread::sleep(Duration::from_millis(100));
    }
    page.click("#stop-run").unwrap();
    wait(
        &page,
        "stopped again",
        "document.querySelector('#run-state').dataset.state === 'stopped'",
        30,
    );
    assert!(stopped_at >= 2);

    // Data: the story sample's images, in place, with their sizes and token counts.
    page.goto(&format!("{}/#data", b.url)).unwrap();
    let story_yaml = format!(
        "model: {}\noutput_dir: preview\nadapter: {{plugin: lora}}\ndata:\n  plugin: storyreasoning\n  path: {}\n  split: train\n  cutoff_len: 4096\n  image_max_pixels: 50176\n",
        f.vl_model.display(),
        f.story.display()
    );
    wait(&page, "the preview form", "document.querySelector('#preview-yaml') !== null", 10);
    page.set_value("#preview-yaml", &story_yaml).unwrap();
    page.click("#preview").unwrap();
    wait(&page, "samples", "document.querySelectorAll('div.sample').length > 0", 60);
    let (code, api) = b.post("/api/preview", json!({"yaml": story_yaml, "n": 3}));
    assert_eq!(code, 200, "{api}");
    let shown =
        js(&page, "document.querySelectorAll('div.sample').length").as_u64().unwrap() as usize;
    let images: usize = api["samples"].as_array().unwrap()[..shown]
        .iter()
        .map(|s| s["images"].as_array().unwrap().len())
        .sum();
    assert!(images > 0);
    wait(
        &page,
        "the images, decoded",
        &format!("[...document.querySelectorAll('img.sample-image')].filter(i => i.complete && i.naturalWidth > 0).length === {images}"),
        30,
    );
    let first = &api["samples"][0]["images"][0];
    let img = js(&page, "(() => { const i = document.querySelector('img.sample-image'); return [i.dataset.width, i.dataset.height, i.dataset.tokens]; })()");
    assert_eq!(
        img,
        json!([
            first["width"].to_string(),
            first["height"].to_string(),
            first["tokens"].to_string()
        ])
    );
    assert!(
        js(&page, "document.querySelectorAll('div.sample span.labelled').length").as_u64().unwrap()
            > 0
    );
    screenshot(&page, "data");

    // Chat: the base and the run's adapter side by side; the adapter's greedy answer is
    // `generate --adapter`'s.
    page.goto(&format!("{}/#chat", b.url)).unwrap();
    choose(&page, "#chat-model", f.model.to_str().unwrap());
    choose(&page, "#chat-adapter", f.runs.join("done").to_str().unwrap());
    page.click("#chat-start").unwrap();
    wait(
        &page,
        "the model loaded",
        "(document.querySelector('#chat-status')||{dataset:{}}).dataset.ready === 'true'",
        120,
    );
    let prompt = "w1 w2 w3";
    page.set_value("#chat-input", prompt).unwrap();
    page.click("#chat-send").unwrap();
    wait(
        &page,
        "both answers",
        "document.querySelector('#chat-base .reply[data-done=\"true\"]') && document.querySelector('#chat-tuned .reply[data-done=\"true\"]')",
        120,
    );
    let tuned = js(&page, "document.querySelector('#chat-tuned .reply').textContent");
    let base = js(&page, "document.querySelector('#chat-base .reply').textContent");
    let generate = |adapter: Option<&Path>| -> String {
        let mut args = vec![
            "generate",
            "--model",
            f.model.to_str().unwrap(),
            "--prompt",
            prompt,
            "--chat",
            "--greedy",
            "--max-new-tokens",
            "64",
            "--json",
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        let o = ferrotune(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        v["text"].as_str().unwrap().to_string()
    };
    let want_tuned = generate(Some(&f.runs.join("done")));
    assert_eq!(tuned.as_str().unwrap(), want_tuned);
    assert_eq!(base.as_str().unwrap(), generate(None));
    assert_ne!(want_tuned, generate(None), "the adapter should change the answer");
    screenshot(&page, "chat");

    // An image from the page's file input, to the vision-language model.
    let images = ferrotune_tests::repo_root().join("datasets/story-llava/images");
    let png = images.join("toy-test-008_1.png");
    choose(&page, "#chat-model", f.vl_model.to_str().unwrap());
    page.set_value("#chat-adapter", "").unwrap();
    page.click("#chat-start").unwrap();
    wait(
        &page,
        "the VL model loaded",
        "document.querySelector('#chat-status').dataset.ready === 'true' && !document.querySelector('#chat-image').disabled",
        120,
    );
    page.set_file_input("#chat-image", &png).unwrap();
    page.set_value("#chat-input", "Describe the picture.").unwrap();
    page.click("#chat-send").unwrap();
    wait(
        &page,
        "the answer about the image",
        "document.querySelector('#chat-base .reply[data-done=\"true\"]') !== null",
        120,
    );
    let reply = js(&page, "(() => { const r = document.querySelector('#chat-base .reply'); return [r.className, r.textContent]; })()");
    assert!(!reply[0].as_str().unwrap().contains("error"), "{reply}");

    // The list at the end: finished, stopped and the form's run.
    page.goto(&format!("{}/#runs", b.url)).unwrap();
    wait(&page, "the runs listed", "document.querySelectorAll('tr[data-run]').length === 3", 20);
    assert_eq!(
        js(&page, "document.querySelector('tr[data-run=\"long\"]').dataset.state"),
        "stopped"
    );
    screenshot(&page, "runs");

    let errors = page.js_errors();
    assert!(errors.is_empty(), "the page logged errors: {errors:?}");
}

/// The JS expression for `data-points` of `run`'s series in chart `metric`.
fn series_expr(metric: &str, run: &str) -> String {
    format!(
        "Number((document.querySelector('svg.chart[data-metric=\"{metric}\"] polyline.series[data-run=\"{run}\"]')||{{dataset:{{points:-1}}}}).dataset.points)"
    )
}
