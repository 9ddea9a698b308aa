//! Bad-input cases: `serve` under a hostile client, each beside well-behaved ones. The real
//! binary on a loopback port; every case measures what the other clients see.
//!
//! - a pixel bomb (a 20000 × 20000 greyscale PNG, ~390 KB) while three clients stream: a 400
//!   `image_too_large` naming `messages[0].content[0].image_url` within seconds, the streams'
//!   time within a bound of an unloaded run, the server's peak RSS barely moved;
//! - 2000 half-open connections against `--max-connections 64`: `/health` still answers, and
//!   the half-open connections are closed after `--header-timeout-secs`;
//! - adapter churn at `--max-adapters 2`: an adapter with a queued request is never evicted, a
//!   load with nothing evictable is refused with 429 `adapter_capacity` saying why, and no
//!   request gets 404.
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ferrotune::model::CausalLM;
use ferrotune::peft::PeftModel;
use ferrotune_tests::*;
use serde_json::{json, Value};
use tch::{Device, Kind};

/// `(status, JSON body, Retry-After)` of a POST.
fn post(url: &str, body: &Value) -> (u16, Value, Option<String>) {
    let r = ureq::post(url).set("Content-Type", "application/json").send_string(&body.to_string());
    let (code, resp) = match r {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(code, r)) => (code, r),
        Err(e) => panic!("POST {url}: {e}"),
    };
    let retry = resp.header("retry-after").map(str::to_string);
    let text = resp.into_string().unwrap();
    (
        code,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({code}): {text}")),
        retry,
    )
}

/// A streamed completion: `(seconds to the end, chunks, longest wait between two chunks)`;
/// panics unless it ends in `[DONE]`.
fn stream_completion(url: &str, body: &Value) -> (f64, usize, f64) {
    let start = Instant::now();
    let resp = ureq::post(&format!("{url}/v1/completions"))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .unwrap_or_else(|e| panic!("stream: {e}"));
    let mut chunks = 0;
    let mut done = false;
    let (mut last, mut gap) = (None::<Instant>, 0f64);
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.unwrap();
        if let Some(t) = last {
            gap = gap.max(t.elapsed().as_secs_f64());
        }
        last = Some(Instant::now());
        if line == "data: [DONE]" {
            done = true;
        } else if line.starts_with("data: ") {
            assert!(!line.contains("\"error\""), "{line}");
            chunks += 1;
        }
    }
    assert!(done, "the stream ended without [DONE]");
    (start.elapsed().as_secs_f64(), chunks, gap)
}

/// A `data:` URL of `bytes`.
fn data_url(mime: &str, bytes: &[u8]) -> String {
    use base64::Engine as _;
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

#[test]
fn the_bomb_png_is_a_real_image() {
    // the same writer at a size that decodes quickly: every pixel 0, the size as announced
    for (w, h) in [(300, 200), (1031, 3)] {
        let img = image::load_from_memory(&zero_png(w, h)).unwrap().into_luma8();
        assert_eq!(img.dimensions(), (w, h));
        assert!(img.as_raw().iter().all(|&p| p == 0));
    }
    let bomb = zero_png(20_000, 20_000);
    assert!(bomb.len() < 400_000, "{} bytes", bomb.len());
}

/// A tiny random Qwen2-VL with the Qwen2 tokenizer.
fn vl_model() -> &'static PathBuf {
    static M: OnceLock<PathBuf> = OnceLock::new();
    M.get_or_init(|| {
        let model = temp_dir("bad-serve-vl").join("tiny-vl");
        init_tiny_vl_model(&model, 3);
        model
    })
}

/// Three clients streaming at once: the longest time to `[DONE]` and the longest wait
/// between two chunks.
fn three_streams(url: &str, tokens: u64) -> (f64, f64) {
    let clients: Vec<_> = (0..3)
        .map(|i| {
            let url = url.to_string();
            std::thread::spawn(move || {
                let body = json!({"model": "tiny-vl", "prompt": format!("client {i} says"), "max_tokens": tokens,
                                  "temperature": 0.8, "seed": i, "stream": true});
                stream_completion(&url, &body)
            })
        })
        .collect();
    let (mut longest, mut gap) = (0f64, 0f64);
    for c in clients {
        let (secs, chunks, g) = c.join().unwrap();
        assert!(chunks >= 2, "a stream of {chunks} chunks measures nothing");
        longest = longest.max(secs);
        gap = gap.max(g);
    }
    (longest, gap)
}

#[test]
fn a_pixel_bomb_is_refused_from_its_header_while_other_clients_stream_on() {
    let s = Server::start(vl_model(), &["--max-batch", "8"]);
    let tokens = 128;
    three_streams(&s.url, 4); // warm-up
    let (unloaded, _) = three_streams(&s.url, tokens);
    let (rss_before, peak_before) = s.rss();

    let bomb = zero_png(20_000, 20_000);
    let body = json!({"model": "tiny-vl", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url("image/png", &bomb)}},
        {"type": "text", "text": "what is this?"}]}]});
    let url = s.url.clone();
    let streams = std::thread::spawn(move || three_streams(&url, tokens));
    std::thread::sleep(Duration::from_millis(100)); // the streams are running
    let start = Instant::now();
    let (code, v, _) = post(&format!("{}/v1/chat/completions", s.url), &body);
    let bomb_secs = start.elapsed().as_secs_f64();
    let (loaded, _) = streams.join().unwrap();
    let (rss_after, peak_after) = s.rss();
    println!(
        "pixel bomb ({} bytes): {code} in {bomb_secs:.3} s; 3 streams of {tokens} tokens: {unloaded:.2} s unloaded, {loaded:.2} s beside the bomb; server RSS {} MB → {} MB, peak {} MB → {} MB",
        bomb.len(),
        rss_before >> 20,
        rss_after >> 20,
        peak_before >> 20,
        peak_after >> 20
    );
    assert_eq!((code, v["error"]["code"].as_str()), (400, Some("image_too_large")), "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("messages[0].content[0].image_url") && msg.contains("20000x20000"),
        "{msg}"
    );
    assert!(bomb_secs < 3.0, "the bomb took {bomb_secs:.2} s to be refused");
    assert!(
        loaded <= 3.0 * unloaded + 2.0,
        "the streams took {loaded:.2} s beside the bomb, {unloaded:.2} s alone"
    );
    let grown = peak_after.saturating_sub(peak_before.max(rss_before));
    assert!(grown < 500 << 20, "the server's peak RSS grew by {} MB", grown >> 20);
    // and a small image still works
    let small = image::GrayImage::from_pixel(64, 48, image::Luma([200]));
    let mut png = std::io::Cursor::new(Vec::new());
    small.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let body = json!({"model": "tiny-vl", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url("image/png", png.get_ref())}},
        {"type": "text", "text": "what is this?"}]}]});
    let (code, v, _) = post(&format!("{}/v1/chat/completions", s.url), &body);
    assert_eq!(code, 200, "{v}");
}

/// Raises this process's open-file limit to its hard limit (the server started after inherits it).
fn more_files() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        r.rlim_cur
    }
}

/// Whether the server still holds `sock` open (reads would block), draining what it sent.
fn still_open(mut sock: &TcpStream) -> bool {
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

/// `/health` over a fresh connection, retried while the server refuses for room: seconds to a 200.
fn health_within(s: &Server, limit: Duration) -> Option<f64> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(2)).build();
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(r) = agent.get(&format!("{}/health", s.url)).call() {
            if r.status() == 200 && r.into_string().unwrap().contains("\"ok\"") {
                return Some(start.elapsed().as_secs_f64());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn text_model() -> &'static TextFixture {
    static F: OnceLock<TextFixture> = OnceLock::new();
    F.get_or_init(|| text_fixture("bad-serve", 40, 3, 1, 1))
}

#[test]
fn half_open_connections_neither_lock_out_health_nor_stay_open() {
    let files = more_files();
    let flood = 2000.min(files.saturating_sub(200) as usize);
    assert!(flood >= 500, "an open-file limit of {files} leaves too few connections");
    let f = text_model();
    let s = Server::start(&f.model, &["--max-connections", "64", "--header-timeout-secs", "2"]);
    let alone = health_within(&s, Duration::from_secs(5)).expect("/health unloaded");

    let opened = Arc::new(std::sync::Mutex::new(Vec::new()));
    let flooding = {
        let (addr, opened) = (s.addr.parse().unwrap(), opened.clone());
        std::thread::spawn(move || {
            for _ in 0..flood {
                if let Ok(c) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                    opened.lock().unwrap().push(c);
                }
            }
        })
    };
    while opened.lock().unwrap().len() < flood / 4 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let during = health_within(&s, Duration::from_secs(5));
    flooding.join().unwrap();
    let flood_end = Instant::now();
    let after = health_within(&s, Duration::from_secs(5));
    let socks = std::mem::take(&mut *opened.lock().unwrap());
    let open_mid = socks.iter().filter(|c| still_open(c)).count();
    let mid_at = flood_end.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2) + Duration::from_millis(1500));
    let open_late = socks.iter().filter(|c| still_open(c)).count();
    println!(
        "{} half-open connections (limit 64, header timeout 2 s): /health in {alone:.3} s alone, {during:?} s during the flood, {after:?} s after it; {open_mid} still open {mid_at:.2} s after the flood, {open_late} 3.5 s after",
        socks.len()
    );
    assert!(socks.len() >= flood * 9 / 10, "only {} of {flood} connects succeeded", socks.len());
    let during = during.expect("/health never answered during the flood");
    assert!(during < 2.0, "/health took {during:.2} s during the flood");
    let after = after.expect("/health never answered after the flood");
    assert!(after < 1.0, "/health took {after:.2} s after the flood");
    assert!(open_mid <= 64 + 8, "{open_mid} connections held open past --max-connections 64");
    assert!(open_mid > 0, "some connections should wait for their header timeout");
    assert_eq!(open_late, 0, "half-open connections outlived the 2 s header timeout");
    // a slow client that sends part of its headers and stops is closed too
    let mut slow = TcpStream::connect(&s.addr).unwrap();
    std::io::Write::write_all(&mut slow, b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(!still_open(&slow), "a connection with unfinished headers stayed open");
    assert!(health_within(&s, Duration::from_secs(1)).is_some());
}

/// Three copies of one LoRA adapter (a, b, c) and a fourth (d), in an adapter folder.
fn adapter_dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let f = text_model();
        let dir = f.work.join("adapters");
        let mut model = PeftModel::new(CausalLM::load(&f.model, Device::Cpu, Kind::Float).unwrap());
        let lora = r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}"#;
        model
            .attach_adapter("default", Box::new(registry().adapter("lora", lora).unwrap()))
            .unwrap();
        perturb_adapter(&mut model, 5, 0.1);
        for name in ["a", "b", "c", "d"] {
            model.save_peft_adapter(&dir.join(name)).unwrap();
        }
        dir
    })
}

#[test]
fn eviction_spares_adapters_with_queued_or_recent_requests_and_a_full_server_says_429() {
    let f = text_model();
    let dir = adapter_dir();
    let grace = 2.0;
    let s = Server::start(
        &f.model,
        &[
            "--adapter-dir",
            dir.to_str().unwrap(),
            "--max-adapters",
            "2",
            "--adapter-grace-secs",
            "2",
            "--max-batch",
            "1",
            "--max-tokens-limit",
            "1500",
        ],
    );
    let load =
        |name: &str| post(&format!("{}/v1/adapters", s.url), &json!({"name": name, "path": name}));
    let long =
        json!({"model": "model", "prompt": "w1 w2 w3", "max_tokens": 1500, "temperature": 0});
    // the base model's long request, to size the wait below
    let start = Instant::now();
    let (code, v, _) = post(&format!("{}/v1/completions", s.url), &long);
    let base_secs = start.elapsed().as_secs_f64();
    assert_eq!((code, v["choices"][0]["finish_reason"].as_str()), (200, Some("length")), "{v}");
    println!("a base request of 1500 tokens alone: {base_secs:.2} s");

    assert_eq!(load("a").0, 200);
    assert_eq!(load("b").0, 200);
    // two clients keep the one batch row busy with the base model
    let stop = Arc::new(AtomicBool::new(false));
    let holders: Vec<_> = (0..2)
        .map(|_| {
            let (url, stop, long) = (s.url.clone(), stop.clone(), long.clone());
            std::thread::spawn(move || {
                let mut codes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    codes.push(post(&format!("{url}/v1/completions"), &long).0);
                }
                codes
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(grace + 0.5)); // a and b are no longer recent
                                                              // a request for a waits in the queue behind them; a is the least recently used adapter
    let queued = {
        let url = s.url.clone();
        std::thread::spawn(move || {
            post(
                &format!("{url}/v1/completions"),
                &json!({"model": "a", "prompt": "w1", "max_tokens": 4}),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let (code, v, _) = load("c");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["evicted"], json!("b"), "a has a queued request: b must go, not a: {v}");
    // a (queued or running or just used) and c (just loaded): nothing can go
    let (code, v, retry) = load("d");
    let msg = v["error"]["message"].as_str().unwrap_or_default().to_string();
    println!("the fourth load: {code} {msg} (Retry-After {retry:?})");
    assert_eq!((code, v["error"]["code"].as_str()), (429, Some("adapter_capacity")), "{v}");
    assert!(
        msg.contains("2 adapters are loaded")
            && msg.contains("`a` ")
            && msg.contains("`c` was loaded or used"),
        "{msg}"
    );
    assert!(
        retry.as_ref().is_some_and(|r| r.parse::<u64>().is_ok_and(|r| (1..=2).contains(&r))),
        "{retry:?}"
    );
    let (code, v, _) = queued.join().unwrap();
    assert_eq!(code, 200, "the queued request for a: {v}");
    stop.store(true, Ordering::Relaxed);
    for h in holders {
        let codes = h.join().unwrap();
        assert!(codes.iter().all(|&c| c == 200), "{codes:?}");
    }
    let models =
        ureq::get(&format!("{}/v1/models", s.url)).call().unwrap().into_json::<Value>().unwrap();
    let ids: Vec<&str> =
        models["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, ["model", "a", "c"]);
    // once nothing is busy or recent, the least recently used adapter makes room again
    std::thread::sleep(Duration::from_secs_f64(grace + 0.3));
    let (code, v, _) = load("d");
    assert_eq!(code, 200, "{v}");
    assert!(v["evicted"] == json!("a") || v["evicted"] == json!("c"), "{v}");
}

#[test]
fn a_large_allowed_image_is_decoded_beside_the_running_streams() {
    // 25 MP, under --max-image-pixels: decoded and shrunk to 112×112 in the image pool
    let s = Server::start(
        vl_model(),
        &[
            "--max-batch",
            "8",
            "--image-max-pixels",
            "12544",
            "--max-image-pixels",
            "30000000",
            "--image-timeout-secs",
            "60",
        ],
    );
    let tokens = 128;
    three_streams(&s.url, 4); // warm-up
    let (unloaded, unloaded_gap) = three_streams(&s.url, tokens);
    let big = zero_png(5000, 5000);
    let body = json!({"model": "tiny-vl", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url("image/png", &big)}},
        {"type": "text", "text": "what is this?"}]}]});
    let url = s.url.clone();
    let image = std::thread::spawn(move || {
        let start = Instant::now();
        let (code, v, _) = post(&format!("{url}/v1/chat/completions"), &body);
        (code, v, start.elapsed().as_secs_f64())
    });
    std::thread::sleep(Duration::from_millis(50));
    let mut rounds = Vec::new();
    while !image.is_finished() || rounds.is_empty() {
        rounds.push(three_streams(&s.url, tokens));
    }
    let (code, v, image_secs) = image.join().unwrap();
    let loaded = rounds.iter().map(|r| r.0).fold(0f64, f64::max);
    let loaded_gap = rounds.iter().map(|r| r.1).fold(0f64, f64::max);
    println!(
        "a 5000×5000 image: {code} in {image_secs:.2} s; 3 streams of {tokens} tokens: {unloaded:.2} s (longest gap {unloaded_gap:.3} s) unloaded, at most {loaded:.2} s (gap {loaded_gap:.3} s) in {} rounds beside the image",
        rounds.len()
    );
    assert_eq!(code, 200, "{v}");
    // On the engine thread the image would stop every stream for as long as it takes.
    assert!(image_secs > 1.0, "an image decoded in {image_secs:.2} s measures nothing");
    assert!(
        loaded_gap < (image_secs / 2.0).max(3.0 * unloaded_gap + 0.3),
        "a stream waited {loaded_gap:.2} s between two chunks while the image took {image_secs:.2} s"
    );
    // The streams' total time is printed, not bounded: the decoder shares the CPU cores with
    // the model, so the streams slow down (1.5 → 5 s on 2 busy cores), but they never stop.
}
