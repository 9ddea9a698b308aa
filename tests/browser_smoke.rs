//! The headless-Chromium driver of the browser tests (`common::browser`) against a tiny page
//! served here: clicks, waits, typed values, a chosen file, evaluation, a screenshot whose
//! pixels match the page, JavaScript errors, and a clean shutdown. Skips (with a note) where
//! no Chromium is installed unless `FERROTUNE_EXPECT_CHROMIUM=1` (`make test` sets it).
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use ferrotune_tests::browser::Browser;
use ferrotune_tests::TempDir;
use serde_json::json;

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>smoke</title>
<style>body { margin: 0; background: #ffffff; font: 16px sans-serif; }</style></head>
<body>
<button id="go">Press</button>
<p id="out">waiting</p>
<input id="name"><p id="echo"></p>
<input type="file" id="file"><p id="file-info">no file</p>
<svg id="chart" width="200" height="100" style="display:block">
  <rect id="bar" x="10" y="10" width="60" height="80" fill="rgb(70, 130, 180)"/>
</svg>
<script>
let presses = 0;
document.getElementById("go").addEventListener("click", () => {
  // Later, so that the test has to wait for it.
  setTimeout(() => { document.getElementById("out").textContent = "pressed " + (++presses); }, 150);
});
document.getElementById("name").addEventListener("input", (e) => {
  document.getElementById("echo").textContent = "hello " + e.target.value;
});
document.getElementById("file").addEventListener("change", (e) => {
  const f = e.target.files[0];
  document.getElementById("file-info").textContent = f ? f.name + " " + f.size : "no file";
});
document.getElementById("bar").addEventListener("click", (e) => {
  e.target.setAttribute("fill", "rgb(200, 30, 30)");
});
</script>
</body></html>
"#;

/// A page whose scripts fail while it loads: a syntax error and an uncaught exception.
const BROKEN: &str = r#"<!doctype html><html><head><title>broken</title></head><body>
<p>still renders</p>
<script>let x = ;</script>
<script>window.undefinedFunction();</script>
</body></html>
"#;

/// Serves [`PAGE`] at `/` and [`BROKEN`] at `/broken` (404 elsewhere) on a free loopback port, from a thread that lives
/// as long as the test process; returns `http://127.0.0.1:PORT`.
fn serve_page() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            // Skip the headers.
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match path {
                "/" => ("200 OK", PAGE),
                "/broken" => ("200 OK", BROKEN),
                _ => ("404 Not Found", ""),
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

/// The processes (other than zombies) in process group `pgid`, from `/proc`.
fn live_group_members(pgid: u32) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid pgrp ...; comm may hold spaces, so split after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[2] == pgid.to_string() && fields[0] != "Z" {
            found.push(stat.chars().take(80).collect());
        }
    }
    found
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn drives_a_page_and_shuts_down_cleanly() {
    let Some(browser) = Browser::launch().unwrap() else { return };
    let url = serve_page();
    let tmp = TempDir::new("browser-smoke");
    let page = browser.new_page().unwrap();
    page.goto(&url).unwrap();
    assert_eq!(page.eval("document.title").unwrap(), json!("smoke"));
    assert_eq!(page.eval("Promise.resolve(6 * 7)").unwrap(), json!(42), "promises are awaited");
    assert_eq!(page.eval("undefined").unwrap(), json!(null));

    // A click whose effect comes later: wait_for returns the truthy value it waited for.
    page.click("#go").unwrap();
    let out = page
        .wait_for("document.getElementById('out').textContent === 'pressed 1' && 'seen'", secs(5))
        .unwrap();
    assert_eq!(out, json!("seen"));

    // Typed text, quotes and non-ASCII included, reaches the page's input handler.
    let typed = "Ada \"the\" Lovelace, naïve \\ ok";
    page.set_value("#name", typed).unwrap();
    assert_eq!(
        page.eval("document.getElementById('echo').textContent").unwrap(),
        json!(format!("hello {typed}"))
    );

    // A chosen file reaches the change handler with its name and size.
    let png_path = tmp.0.join("tiny.png");
    image::RgbImage::from_pixel(3, 2, image::Rgb([1, 2, 3])).save(&png_path).unwrap();
    let size = std::fs::metadata(&png_path).unwrap().len();
    page.set_file_input("#file", &png_path).unwrap();
    let info = format!("tiny.png {size}");
    page.wait_for(
        &format!("document.getElementById('file-info').textContent === {info:?}"),
        secs(5),
    )
    .unwrap();

    // The screenshot has the viewport's size and shows the page: the SVG bar's colour at its
    // centre, before and after a click on the bar changes it.
    page.set_viewport(640, 480).unwrap();
    let centre = page
        .eval("(() => { const r = document.getElementById('bar').getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        .unwrap();
    let (cx, cy) = (centre[0].as_f64().unwrap() as u32, centre[1].as_f64().unwrap() as u32);
    let pixel_at = |name: &str| {
        let path = tmp.0.join(name);
        let bytes = page.screenshot(&path).unwrap();
        assert_eq!(bytes, std::fs::read(&path).unwrap());
        let img =
            image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (640, 480), "the screenshot has the viewport's size");
        img.get_pixel(cx, cy).0
    };
    assert_eq!(pixel_at("before.png"), [70, 130, 180]);
    page.click("#bar").unwrap();
    assert_eq!(pixel_at("after.png"), [200, 30, 30]);

    // Errors: an exception in eval names the expression; the page's own errors are collected.
    let err = page.eval("null.missing").unwrap_err();
    assert!(err.is_js_exception(), "{err}");
    assert!(
        err.to_string().contains("null.missing") && err.to_string().contains("TypeError"),
        "{err}"
    );
    assert!(page.js_errors().is_empty(), "no page errors yet: {:?}", page.js_errors());
    page.eval("console.error('logged problem', 7); setTimeout(() => { throw new Error('boom from the page'); }, 0); \
               setTimeout(() => Promise.reject(new Error('rejected, unhandled')), 0); 1")
        .unwrap();
    page.wait_for("new Promise(r => setTimeout(() => r(true), 50))", secs(2)).unwrap();
    let errors = page.js_errors();
    assert!(errors.iter().any(|e| e.contains("console.error: logged problem 7")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("boom from the page")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("rejected, unhandled")), "{errors:?}");
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(errors[2].contains("(in promise)"), "{errors:?}");

    // Element problems are errors that name the selector.
    let err = page.click("#nowhere").unwrap_err().to_string();
    assert!(err.contains("#nowhere") && err.contains("no element matches"), "{err}");
    let err = page.set_file_input("#nowhere", &png_path).unwrap_err().to_string();
    assert!(err.contains("#nowhere"), "{err}");
    let err = page.set_value("#chart", "x").unwrap_err().to_string();
    assert!(err.contains("#chart") && err.contains("no value"), "{err}");

    // An alert does not block the page.
    assert_eq!(page.eval("alert('hi there'); 5").unwrap(), json!(5));
    assert_eq!(page.dialogs(), vec!["alert: hi there".to_string()]);

    // A page nobody serves is an error naming it.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/", l.local_addr().unwrap())
    };
    let err = page.goto(&dead).unwrap_err().to_string();
    assert!(err.contains(&dead) && err.contains("ERR_CONNECTION_REFUSED"), "{err}");

    // Drop: the browser and every process it started are gone, and so is its profile.
    let pid = browser.pid();
    let dir = browser.temp_dir().to_path_buf();
    assert!(dir.exists());
    drop(page);
    drop(browser);
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "chromium {pid} was not reaped");
    let deadline = Instant::now() + secs(5);
    while !live_group_members(pid).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(live_group_members(pid), Vec::<String>::new(), "chromium's helpers outlived it");
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[test]
fn wait_for_a_false_condition_times_out_with_the_page_text() {
    let Some(browser) = Browser::launch().unwrap() else { return };
    let url = serve_page();
    let page = browser.new_page().unwrap();
    page.goto(&url).unwrap();
    let start = Instant::now();
    let err = page
        .wait_for("document.getElementById('out').textContent === 'never'", secs(1))
        .unwrap_err();
    let took = start.elapsed();
    assert!(took >= secs(1) && took < secs(4), "timed out after {took:?}");
    let msg = err.to_string();
    assert!(msg.contains("textContent === 'never'"), "{msg}");
    assert!(msg.contains("last value: false"), "{msg}");
    assert!(msg.contains("Press") && msg.contains("waiting"), "the page text is quoted: {msg}");
    // A condition that throws until the timeout reports its exception.
    let err = page
        .wait_for("document.getElementById('absent').textContent", Duration::from_millis(300))
        .unwrap_err();
    assert!(
        err.to_string().contains("last exception") && err.to_string().contains("TypeError"),
        "{err}"
    );

    // Errors of the page's own scripts while it loads are collected, each once, in order;
    // the first page's (none) do not carry over.
    assert!(page.js_errors().is_empty(), "{:?}", page.js_errors());
    page.goto(&format!("{url}/broken")).unwrap();
    let errors = page.js_errors();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].contains("SyntaxError") && errors[0].contains("/broken"), "{errors:?}");
    assert!(errors[1].contains("undefinedFunction is not a function"), "{errors:?}");
}

#[test]
fn a_dead_browser_is_an_error_not_a_hang() {
    let Some(browser) = Browser::launch().unwrap() else { return };
    let page = browser.new_page().unwrap();
    assert_eq!(page.eval("1 + 1").unwrap(), json!(2));
    // SAFETY: a plain kill of the chromium this test started.
    unsafe {
        libc::kill(browser.pid() as libc::pid_t, libc::SIGKILL);
    }
    let start = Instant::now();
    let err = page.eval("1 + 1").unwrap_err().to_string();
    assert!(start.elapsed() < secs(5), "took {:?}", start.elapsed());
    assert!(err.contains("chromium"), "{err}");
    let err = page.wait_for("true", secs(10)).unwrap_err().to_string();
    assert!(err.contains("chromium"), "{err}");
    assert!(!page.js_errors().is_empty(), "a dead browser shows in js_errors");
}
