//! A headless Chromium for the browser tests, driven over the Chrome DevTools Protocol (CDP).
//!
//! Chromium runs with `--remote-debugging-pipe`: it reads commands from its fd 3 and writes
//! replies and events to its fd 4, each message a JSON object ended by a NUL byte
//! (<https://chromedevtools.github.io/devtools-protocol/>). A pipe needs no port, so parallel
//! tests cannot race for one, and Chromium exits by itself when this process dies (its fd 3
//! reaches end of file). A reader thread turns the replies into a channel, so every wait has a
//! deadline and a dead browser is an error, never a hang.
//!
//! `make test` installs Debian's `chromium` and sets `FERROTUNE_EXPECT_CHROMIUM=1` and
//! `FERROTUNE_CHROMIUM=/usr/bin/chromium`; without them a test skips (with a note) where no
//! Chromium is found, so a plain `cargo test` on a machine without one still passes.
//!
//! ```ignore
//! let Some(browser) = Browser::launch().unwrap() else { return };
//! let page = browser.new_page().unwrap();
//! page.goto(&url).unwrap();
//! page.click("#go").unwrap();
//! page.wait_for("document.querySelector('#out').textContent === 'done'", secs(5)).unwrap();
//! assert!(page.js_errors().is_empty(), "{:?}", page.js_errors());
//! ```
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

/// How long one DevTools command, or a page load, may take before it is an error.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The viewport of a new page, in CSS pixels (device scale factor 1).
pub const DEFAULT_VIEWPORT: (u32, u32) = (1280, 800);
/// How much of `document.body.innerText` a [`Page::wait_for`] timeout quotes.
const PAGE_TEXT_CHARS: usize = 2000;
/// The poll period of [`Page::wait_for`].
const POLL: Duration = Duration::from_millis(100);

/// What went wrong driving the browser; `Debug` prints the message as is, so `unwrap()` shows
/// page text and stderr tails readably.
pub struct Error {
    message: String,
    /// A JavaScript exception in the page (the browser itself is fine).
    js: bool,
}

impl Error {
    fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), js: false }
    }

    /// Whether this is an exception thrown by page JavaScript (as opposed to the browser
    /// failing, a timeout, or a missing element).
    pub fn is_js_exception(&self) -> bool {
        self.js
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// The Chromium binary: `$FERROTUNE_CHROMIUM` when set, else `chromium` or `chromium-browser`
/// on `PATH`. `None` when there is none.
pub fn chromium_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FERROTUNE_CHROMIUM").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|p| p.is_file())
}

/// Whether `make test` promised a Chromium (`FERROTUNE_EXPECT_CHROMIUM=1`): then a missing or
/// broken one fails the test instead of skipping it.
pub fn chromium_expected() -> bool {
    std::env::var("FERROTUNE_EXPECT_CHROMIUM").is_ok_and(|v| v == "1")
}

/// What one page (a DevTools session) has reported so far.
#[derive(Default)]
struct SessionEvents {
    /// `(loaderId, name)` of `Page.lifecycleEvent`s since the last [`Page::goto`].
    lifecycle: Vec<(String, String)>,
    js_errors: Vec<String>,
    dialogs: Vec<String>,
    /// Why the page can no longer answer (crashed, detached), if it cannot.
    gone: Option<String>,
}

/// The pipe to Chromium and everything it has said that no one has read yet.
struct Connection {
    to_browser: RefCell<File>,
    from_browser: Receiver<Value>,
    next_id: Cell<u64>,
    sessions: RefCell<HashMap<String, SessionEvents>>,
    /// Set once the pipe has reached end of file (Chromium exited or closed it).
    closed: Cell<bool>,
    stderr_path: PathBuf,
}

impl Connection {
    /// The last lines Chromium wrote to stderr, for error messages.
    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        if tail.is_empty() {
            "(chromium wrote nothing to stderr)".into()
        } else {
            format!("chromium's stderr (last lines):\n{tail}")
        }
    }

    fn gone_error(&self, doing: &str) -> Error {
        Error::new(format!(
            "chromium closed its DevTools pipe (it exited or crashed) while {doing}\n{}",
            self.stderr_tail()
        ))
    }

    /// Writes one command and returns its id, without waiting for the reply.
    fn send(&self, method: &str, params: Value, session: Option<&str>) -> Result<u64> {
        if self.closed.get() {
            return Err(self.gone_error(&format!("sending {method}")));
        }
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).expect("a JSON value serialises");
        bytes.push(0);
        let written = self.to_browser.borrow_mut().write_all(&bytes);
        written.map_err(|e| {
            self.closed.set(true);
            Error::new(format!(
                "chromium is gone: writing {method} to its DevTools pipe failed ({e})\n{}",
                self.stderr_tail()
            ))
        })?;
        Ok(id)
    }

    /// The next message from the browser before `deadline`, dispatching nothing.
    /// `Ok(None)` on timeout.
    fn next_message(&self, deadline: Instant, doing: &str) -> Result<Option<Value>> {
        if self.closed.get() {
            return Err(self.gone_error(doing));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match self.from_browser.recv_timeout(left) {
            Ok(msg) => Ok(Some(msg)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                self.closed.set(true);
                Err(self.gone_error(doing))
            }
        }
    }

    /// Sends a command and waits up to `timeout` for its reply, handling the events that come
    /// in meanwhile. A protocol error reply is an `Err` naming the method.
    fn call(
        &self,
        method: &str,
        params: Value,
        session: Option<&str>,
        timeout: Duration,
    ) -> Result<Value> {
        let id = self.send(method, params, session)?;
        let deadline = Instant::now() + timeout;
        let doing = format!("waiting for the reply to {method}");
        loop {
            let Some(msg) = self.next_message(deadline, &doing)? else {
                if let Some(why) = session.and_then(|s| self.session_gone(s)) {
                    return Err(Error::new(format!("{method}: the page is gone ({why})")));
                }
                return Err(Error::new(format!(
                    "no reply to {method} within {:.1} s (is chromium hung?)",
                    timeout.as_secs_f64()
                )));
            };
            if msg.get("id").and_then(Value::as_u64) == Some(id) {
                if let Some(err) = msg.get("error") {
                    let text = err.get("message").and_then(Value::as_str).unwrap_or("?");
                    let data = err.get("data").and_then(Value::as_str).unwrap_or("");
                    return Err(Error::new(format!("{method} failed: {text} {data}")));
                }
                return Ok(msg.get("result").cloned().unwrap_or(Value::Null));
            }
            self.dispatch(&msg);
        }
    }

    /// Handles all messages already received, without waiting.
    fn drain(&self) {
        while let Ok(msg) = self.from_browser.try_recv() {
            self.dispatch(&msg);
        }
    }

    /// Waits until `done` holds for `session`'s events, or `deadline` passes (`Ok(false)`).
    fn wait_session(
        &self,
        session: &str,
        deadline: Instant,
        doing: &str,
        done: impl Fn(&SessionEvents) -> bool,
    ) -> Result<bool> {
        loop {
            {
                let sessions = self.sessions.borrow();
                if let Some(ev) = sessions.get(session) {
                    if done(ev) {
                        return Ok(true);
                    }
                    if let Some(why) = &ev.gone {
                        return Err(Error::new(format!("{doing}: the page is gone ({why})")));
                    }
                }
            }
            match self.next_message(deadline, doing)? {
                Some(msg) => self.dispatch(&msg),
                None => return Ok(false),
            }
        }
    }

    fn session_gone(&self, session: &str) -> Option<String> {
        self.sessions.borrow().get(session).and_then(|e| e.gone.clone())
    }

    /// Records an event (replies to fire-and-forget commands land here too and are dropped).
    fn dispatch(&self, msg: &Value) {
        let Some(method) = msg.get("method").and_then(Value::as_str) else { return };
        let params = msg.get("params").cloned().unwrap_or(Value::Null);
        let session = msg.get("sessionId").and_then(Value::as_str);
        // The browser-level event that a page's session ended.
        if method == "Target.detachedFromTarget" {
            if let Some(s) = params.get("sessionId").and_then(Value::as_str) {
                let mut sessions = self.sessions.borrow_mut();
                let ev = sessions.entry(s.to_string()).or_default();
                ev.gone.get_or_insert_with(|| "detached from its target (tab closed)".into());
            }
            return;
        }
        let Some(session) = session else { return };
        let mut dialog_to_accept = false;
        {
            let mut sessions = self.sessions.borrow_mut();
            let ev = sessions.entry(session.to_string()).or_default();
            match method {
                "Page.lifecycleEvent" => {
                    let field = |k: &str| params.get(k).and_then(Value::as_str).unwrap_or("");
                    ev.lifecycle.push((field("loaderId").into(), field("name").into()));
                }
                "Runtime.exceptionThrown" => {
                    ev.js_errors.push(exception_text(&params["exceptionDetails"]));
                }
                "Runtime.consoleAPICalled" => {
                    let kind = params.get("type").and_then(Value::as_str).unwrap_or("");
                    if kind == "error" || kind == "assert" {
                        let args: Vec<String> = params["args"]
                            .as_array()
                            .map(|a| a.iter().map(remote_object_text).collect())
                            .unwrap_or_default();
                        ev.js_errors.push(format!("console.{kind}: {}", args.join(" ")));
                    }
                }
                "Page.javascriptDialogOpening" => {
                    let kind = params.get("type").and_then(Value::as_str).unwrap_or("dialog");
                    let text = params.get("message").and_then(Value::as_str).unwrap_or("");
                    ev.dialogs.push(format!("{kind}: {text}"));
                    dialog_to_accept = true;
                }
                "Inspector.targetCrashed" => {
                    ev.gone = Some("the renderer crashed".into());
                }
                "Inspector.detached" => {
                    let why = params.get("reason").and_then(Value::as_str).unwrap_or("?");
                    ev.gone.get_or_insert_with(|| format!("inspector detached: {why}"));
                }
                _ => {}
            }
        }
        if dialog_to_accept {
            // A dialog blocks the page's script until answered: accept it, and let the test
            // read it from `Page::dialogs`. Its reply is ignored.
            let _ =
                self.send("Page.handleJavaScriptDialog", json!({ "accept": true }), Some(session));
        }
    }
}

/// The text of a `Runtime.ExceptionDetails`: the exception's description (message and stack)
/// where there is one, with where it was thrown.
fn exception_text(details: &Value) -> String {
    // `text` says how it escaped ("Uncaught", "Uncaught (in promise)"), the description what
    // it was, with its stack.
    let how = details.get("text").and_then(Value::as_str).unwrap_or("");
    let text = match details.pointer("/exception/description").and_then(Value::as_str) {
        Some(what) if how.is_empty() => what.to_string(),
        Some(what) => format!("{how} {what}"),
        None if how.is_empty() => "unknown exception".to_string(),
        None => how.to_string(),
    };
    let url = details.get("url").and_then(Value::as_str).unwrap_or("");
    if url.is_empty() {
        text
    } else {
        let line = details.get("lineNumber").and_then(Value::as_u64).unwrap_or(0) + 1;
        let col = details.get("columnNumber").and_then(Value::as_u64).unwrap_or(0) + 1;
        format!("{text} ({url}:{line}:{col})")
    }
}

/// A console argument (`Runtime.RemoteObject`) as text.
fn remote_object_text(obj: &Value) -> String {
    match obj.get("value") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => obj
            .get("description")
            .or_else(|| obj.get("unserializableValue"))
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string(),
    }
}

/// JavaScript truthiness of a value returned by value.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// A JavaScript string literal holding `s`.
fn js_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// The first `max` characters of `s`, with a note when it was cut.
fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}… ({} more characters)", &s[..i], s[i..].chars().count()),
        None => s.to_string(),
    }
}

/// Dups `fd` to a number of 10 or more, close-on-exec, so that the `dup2` onto 3 and 4 in the
/// child can never overwrite the other pipe end.
fn high_fd(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_DUPFD_CLOEXEC on a valid open fd returns a new fd that we own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// A close-on-exec pipe as `(read end, write end)`, both numbered 10 or more.
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((high_fd(r)?, high_fd(w)?))
}

/// A headless Chromium in its own process group and temporary profile; closed, killed (with
/// every process it started) and its profile removed on drop.
pub struct Browser {
    conn: Rc<Connection>,
    child: Child,
    /// Holds `profile/`, `home/` (its HOME and TMPDIR) and `stderr.log`.
    dir: PathBuf,
}

impl Browser {
    /// Starts Chromium. `Ok(None)` (after a note on stderr) when there is no Chromium and
    /// `FERROTUNE_EXPECT_CHROMIUM` is not `1`: the caller skips its test. An error when it is
    /// expected but missing, or when it is there but does not start.
    pub fn launch() -> Result<Option<Browser>> {
        let Some(bin) = chromium_binary() else {
            let looked = match std::env::var_os("FERROTUNE_CHROMIUM").filter(|p| !p.is_empty()) {
                Some(p) => format!("FERROTUNE_CHROMIUM={}", PathBuf::from(p).display()),
                None => "`chromium` / `chromium-browser` on PATH".to_string(),
            };
            if chromium_expected() {
                return Err(Error::new(format!(
                    "FERROTUNE_EXPECT_CHROMIUM=1 but no Chromium found ({looked} does not exist); \
                     `make test` installs Debian's `chromium` with apt-get"
                )));
            }
            eprintln!(
                "note: skipping a browser test: no Chromium found ({looked}); install Debian's \
                 `chromium` (`make test` does, as root) to run it"
            );
            return Ok(None);
        };
        Self::launch_binary(&bin).map(Some)
    }

    /// Starts the Chromium at `bin` and waits until it answers over the pipe.
    pub fn launch_binary(bin: &Path) -> Result<Browser> {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let dir = crate::temp_dir(&format!("chromium-{n}"));
        let profile = dir.join("profile");
        let stderr_path = dir.join("stderr.log");
        let home = dir.join("home");
        let cleanup = |e: Error| {
            let _ = std::fs::remove_dir_all(&dir);
            e
        };
        let io_err = |what: &str, e: std::io::Error| cleanup(Error::new(format!("{what}: {e}")));
        std::fs::create_dir_all(&home)
            .map_err(|e| io_err(&format!("creating {}", home.display()), e))?;
        let stderr = File::create(&stderr_path)
            .map_err(|e| io_err(&format!("creating {}", stderr_path.display()), e))?;
        // commands: we write `cmd_w`, chromium reads fd 3; replies: chromium writes fd 4, we
        // read `reply_r`.
        let (cmd_r, cmd_w) = pipe().map_err(|e| io_err("creating a pipe", e))?;
        let (reply_r, reply_w) = pipe().map_err(|e| io_err("creating a pipe", e))?;
        let (child_in, child_out) = {
            use std::os::fd::AsRawFd;
            (cmd_r.as_raw_fd(), reply_w.as_raw_fd())
        };
        let (w, h) = DEFAULT_VIEWPORT;
        let mut cmd = Command::new(bin);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--mute-audio",
            "--hide-scrollbars",
            "--password-store=basic",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--window-size={w},{h}"))
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        // Everything it writes outside the profile (the singleton socket's folder in $TMPDIR,
        // ~/.pki, dconf's cache) goes to the same folder, so that drop leaves nothing behind
        // even after a kill.
        .env("TMPDIR", &home)
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        // Its own process group, so that drop can kill the renderers and helpers with it.
        .process_group(0);
        // SAFETY: only dup2, which is async-signal-safe, runs between fork and exec. The
        // sources are numbered 10 or more (see `pipe`), so neither dup2 clobbers the other's
        // source; dup2 clears close-on-exec on 3 and 4.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(child_in, 3) < 0 || libc::dup2(child_out, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| io_err(&format!("starting {}", bin.display()), e))?;
        // The child's ends live on in the child only: without this, its death would never
        // reach the reader as end of file.
        drop((cmd_r, reply_w));

        let (tx, rx) = mpsc::channel();
        let reader = File::from(reply_r);
        std::thread::Builder::new()
            .name("chromium-cdp-reader".into())
            .spawn(move || {
                let mut reader = BufReader::new(reader);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match reader.read_until(0, &mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if buf.last() == Some(&0) {
                        buf.pop();
                    }
                    let Ok(msg) = serde_json::from_slice::<Value>(&buf) else { continue };
                    if tx.send(msg).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| io_err("starting the DevTools reader thread", e))?;

        let browser = Browser {
            conn: Rc::new(Connection {
                to_browser: RefCell::new(File::from(cmd_w)),
                from_browser: rx,
                next_id: Cell::new(1),
                sessions: RefCell::new(HashMap::new()),
                closed: Cell::new(false),
                stderr_path,
            }),
            child,
            dir,
        };
        // Ready once it answers; on failure drop kills it and removes the folder.
        match browser.conn.call("Browser.getVersion", json!({}), None, COMMAND_TIMEOUT) {
            Ok(_) => Ok(browser),
            Err(e) => Err(Error::new(format!(
                "{} did not start: {e}\n{}",
                bin.display(),
                if e.message.contains("stderr") {
                    String::new()
                } else {
                    browser.conn.stderr_tail()
                }
            ))),
        }
    }

    /// Chromium's `product` string, e.g. `Chrome/148.0.7778.167`.
    pub fn version(&self) -> Result<String> {
        let v = self.conn.call("Browser.getVersion", json!({}), None, COMMAND_TIMEOUT)?;
        Ok(v.get("product").and_then(Value::as_str).unwrap_or("?").to_string())
    }

    /// The browser process's id (also its process group's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The temporary folder holding the profile; removed on drop.
    pub fn temp_dir(&self) -> &Path {
        &self.dir
    }

    /// A new tab on `about:blank` with a [`DEFAULT_VIEWPORT`] viewport, its console errors,
    /// uncaught exceptions and dialogs recorded from now on.
    pub fn new_page(&self) -> Result<Page> {
        let c = &self.conn;
        let target =
            c.call("Target.createTarget", json!({ "url": "about:blank" }), None, COMMAND_TIMEOUT)?;
        let target_id = target["targetId"]
            .as_str()
            .ok_or_else(|| {
                Error::new(format!("Target.createTarget returned no targetId: {target}"))
            })?
            .to_string();
        let attached = c.call(
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
            None,
            COMMAND_TIMEOUT,
        )?;
        let session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| {
                Error::new(format!("Target.attachToTarget returned no sessionId: {attached}"))
            })?
            .to_string();
        c.sessions.borrow_mut().entry(session.clone()).or_default();
        let page = Page { conn: Rc::clone(c), session, target_id };
        page.call("Page.enable", json!({}))?;
        page.call("Page.setLifecycleEventsEnabled", json!({ "enabled": true }))?;
        page.call("Runtime.enable", json!({}))?;
        page.set_viewport(DEFAULT_VIEWPORT.0, DEFAULT_VIEWPORT.1)?;
        Ok(page)
    }

    /// Asks Chromium to close (`Browser.close`) and waits up to `grace` for it to close its
    /// end of the pipe. True if it did.
    fn close_gracefully(&self, grace: Duration) -> bool {
        if self.conn.send("Browser.close", json!({}), None).is_err() {
            return self.conn.closed.get();
        }
        let deadline = Instant::now() + grace;
        loop {
            match self.conn.next_message(deadline, "closing") {
                Ok(Some(_)) => continue,
                Ok(None) => return false,
                Err(_) => return true,
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.close_gracefully(Duration::from_secs(5));
        // Whatever of the group is left (renderers, zygotes, a hung browser). The leader is not
        // reaped yet, so the group id cannot have been reused.
        // SAFETY: plain syscall; the group is the one `process_group(0)` made for the child.
        unsafe {
            libc::killpg(self.child.id() as libc::pid_t, libc::SIGKILL);
        }
        let _ = self.child.wait();
        // Helpers killed just now may still hold files open for a moment.
        for _ in 0..20 {
            if std::fs::remove_dir_all(&self.dir).is_ok() || !self.dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One tab, attached through a flattened DevTools session. Commands fail (never hang) once
/// its [`Browser`] is dropped or dies.
pub struct Page {
    conn: Rc<Connection>,
    session: String,
    target_id: String,
}

impl Page {
    /// Sends a raw DevTools command to this page and returns its `result`.
    pub fn call(&self, method: &str, params: Value) -> Result<Value> {
        self.call_within(method, params, COMMAND_TIMEOUT)
    }

    fn call_within(&self, method: &str, params: Value, timeout: Duration) -> Result<Value> {
        self.conn.call(method, params, Some(&self.session), timeout)
    }

    /// Navigates to `url` and waits for its `load` event. A network failure (refused
    /// connection, unknown host) is an error naming the URL; an HTTP error page is not.
    pub fn goto(&self, url: &str) -> Result<()> {
        self.conn.drain();
        if let Some(ev) = self.conn.sessions.borrow_mut().get_mut(&self.session) {
            ev.lifecycle.clear();
        }
        let nav = self.call("Page.navigate", json!({ "url": url }))?;
        if let Some(err) = nav.get("errorText").and_then(Value::as_str) {
            return Err(Error::new(format!("loading {url}: {err}")));
        }
        // A same-document navigation (only the #fragment changes) has no loader and no load.
        let Some(loader) = nav.get("loaderId").and_then(Value::as_str) else { return Ok(()) };
        let doing = format!("waiting for {url} to load");
        let loaded = self.conn.wait_session(
            &self.session,
            Instant::now() + COMMAND_TIMEOUT,
            &doing,
            |ev| ev.lifecycle.iter().any(|(l, name)| l == loader && name == "load"),
        )?;
        if !loaded {
            return Err(Error::new(format!(
                "{url} did not finish loading within {:.0} s",
                COMMAND_TIMEOUT.as_secs_f64()
            )));
        }
        Ok(())
    }

    /// Evaluates `js` (an expression or a script; a promise is awaited) in the page and
    /// returns its value as JSON (`undefined`, `NaN` and DOM nodes' identity do not survive:
    /// `undefined`/`NaN` become `null`, a node `{}`). A thrown exception is an `Err` that
    /// names the expression and quotes the exception.
    pub fn eval(&self, js: &str) -> Result<Value> {
        self.eval_within(js, COMMAND_TIMEOUT)
    }

    fn eval_within(&self, js: &str, timeout: Duration) -> Result<Value> {
        let r = self.call_within(
            "Runtime.evaluate",
            json!({
                "expression": js,
                "returnByValue": true,
                "awaitPromise": true,
                "userGesture": true,
            }),
            timeout,
        )?;
        if let Some(details) = r.get("exceptionDetails") {
            return Err(Error {
                message: format!("evaluating `{js}` threw: {}", exception_text(details)),
                js: true,
            });
        }
        let result = &r["result"];
        Ok(match result.get("value") {
            Some(v) => v.clone(),
            None if result.get("unserializableValue").and_then(Value::as_str) == Some("-0") => {
                json!(0)
            }
            None => Value::Null,
        })
    }

    /// Evaluates `condition` every 100 ms until it is truthy and returns that value. An
    /// exception counts as not yet true (the element may not exist yet). On timeout the error
    /// quotes the condition, its last value or exception, and the page's text.
    pub fn wait_for(&self, condition: &str, timeout: Duration) -> Result<Value> {
        let start = Instant::now();
        let mut last;
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            match self.eval_within(condition, left.max(Duration::from_secs(1))) {
                Ok(v) if truthy(&v) => return Ok(v),
                Ok(v) => last = format!("last value: {v}"),
                Err(e) if e.is_js_exception() => last = format!("last exception: {e}"),
                Err(e) => return Err(Error::new(format!("waiting for `{condition}`: {e}"))),
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(POLL));
        }
        let text = match self
            .eval_within("document.body ? document.body.innerText : ''", Duration::from_secs(2))
        {
            Ok(Value::String(s)) => truncate(&s, PAGE_TEXT_CHARS),
            Ok(v) => v.to_string(),
            Err(e) => format!("(unavailable: {e})"),
        };
        Err(Error::new(format!(
            "`{condition}` was not true within {:.1} s ({last}); the page's text:\n{text}",
            timeout.as_secs_f64()
        )))
    }

    /// Clicks the centre of the first element matching `selector` with real mouse events
    /// (scrolled into view first). An error when nothing matches, the element has no size
    /// (hidden), or another element covers its centre.
    pub fn click(&self, selector: &str) -> Result<()> {
        let js = format!(
            r##"(() => {{
  const el = document.querySelector({sel});
  if (!el) return {{ error: "no element matches" }};
  el.scrollIntoView({{ block: "center", inline: "center" }});
  const r = el.getBoundingClientRect();
  if (r.width === 0 || r.height === 0) return {{ error: `is not visible (its box is ${{r.width}}x${{r.height}})` }};
  const x = r.left + r.width / 2, y = r.top + r.height / 2;
  const hit = document.elementFromPoint(x, y);
  if (!hit || !(hit === el || el.contains(hit))) {{
    const name = hit ? hit.tagName.toLowerCase() + (hit.id ? "#" + hit.id : "") : "nothing (outside the viewport)";
    return {{ error: `is covered at its centre by ${{name}}` }};
  }}
  return {{ x, y }};
}})()"##,
            sel = js_string(selector)
        );
        let at = self.eval(&js)?;
        if let Some(err) = at.get("error").and_then(Value::as_str) {
            return Err(Error::new(format!("clicking `{selector}`: the element {err}")));
        }
        let (x, y) = (at["x"].as_f64().unwrap_or(0.0), at["y"].as_f64().unwrap_or(0.0));
        let mouse = |kind: &str, buttons: u32| {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "buttons": buttons, "clickCount": 1 }),
            )
        };
        mouse("mouseMoved", 0)?;
        mouse("mousePressed", 1)?;
        mouse("mouseReleased", 0)?;
        Ok(())
    }

    /// Sets the value of the `<input>`, `<textarea>` or `<select>` matching `selector` the
    /// way typing would be seen: focus, value, then bubbling `input` and `change` events.
    pub fn set_value(&self, selector: &str, text: &str) -> Result<()> {
        let js = format!(
            r#"(() => {{
  const el = document.querySelector({sel});
  if (!el) return "no element matches";
  const desc = Object.getOwnPropertyDescriptor(Object.getPrototypeOf(el), "value");
  if (!desc || !desc.set) return `is a <${{el.tagName.toLowerCase()}}>, which has no value to set`;
  el.focus();
  desc.set.call(el, {val});
  if (el.value !== {val}) return `did not take the value (a <select> without that option?)`;
  el.dispatchEvent(new Event("input", {{ bubbles: true }}));
  el.dispatchEvent(new Event("change", {{ bubbles: true }}));
  return null;
}})()"#,
            sel = js_string(selector),
            val = js_string(text)
        );
        match self.eval(&js)? {
            Value::Null => Ok(()),
            v => Err(Error::new(format!(
                "setting `{selector}` to {text:?}: the element {}",
                v.as_str().unwrap_or(&v.to_string())
            ))),
        }
    }

    /// Chooses `path` in the `<input type=file>` matching `selector`, as a user would (the
    /// page sees `input` and `change` events).
    pub fn set_file_input(&self, selector: &str, path: &Path) -> Result<()> {
        self.set_file_inputs(selector, &[path])
    }

    /// [`Page::set_file_input`] with several files (the input needs `multiple`).
    pub fn set_file_inputs(&self, selector: &str, paths: &[&Path]) -> Result<()> {
        let mut files = Vec::new();
        for p in paths {
            let abs = std::fs::canonicalize(p).map_err(|e| {
                Error::new(format!("choosing {} for `{selector}`: {e}", p.display()))
            })?;
            files.push(abs.to_string_lossy().into_owned());
        }
        let doc = self.call("DOM.getDocument", json!({ "depth": 0 }))?;
        let root = doc.pointer("/root/nodeId").cloned().unwrap_or(Value::Null);
        let found =
            self.call("DOM.querySelector", json!({ "nodeId": root, "selector": selector }))?;
        let node = found.get("nodeId").and_then(Value::as_u64).unwrap_or(0);
        if node == 0 {
            return Err(Error::new(format!("choosing files for `{selector}`: no element matches")));
        }
        self.call("DOM.setFileInputFiles", json!({ "files": files, "nodeId": node }))
            .map_err(|e| Error::new(format!("choosing files for `{selector}`: {e}")))?;
        Ok(())
    }

    /// Sets the viewport to `width`×`height` CSS pixels at device scale factor 1, so that
    /// screenshots are exactly that size.
    pub fn set_viewport(&self, width: u32, height: u32) -> Result<()> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )?;
        Ok(())
    }

    /// Writes a PNG of the viewport to `path` and returns its bytes.
    pub fn screenshot(&self, path: &Path) -> Result<Vec<u8>> {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }))?;
        let data = shot["data"].as_str().unwrap_or("");
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| Error::new(format!("Page.captureScreenshot returned bad base64: {e}")))?;
        std::fs::write(path, &png)
            .map_err(|e| Error::new(format!("writing the screenshot {}: {e}", path.display())))?;
        Ok(png)
    }

    /// The console errors (`console.error`, failed `console.assert`) and uncaught exceptions
    /// (with their unhandled promise rejections) the page has reported so far, in order. If
    /// the browser cannot be reached, that is one more entry, so asserting emptiness fails.
    pub fn js_errors(&self) -> Vec<String> {
        // A round trip, so that everything the page reported before now has arrived.
        let flushed = self.call_within(
            "Runtime.evaluate",
            json!({ "expression": "0" }),
            Duration::from_secs(10),
        );
        self.conn.drain();
        let mut errors = self
            .conn
            .sessions
            .borrow()
            .get(&self.session)
            .map(|e| e.js_errors.clone())
            .unwrap_or_default();
        if let Err(e) = flushed {
            errors.push(format!("(the page could not be asked for more: {e})"));
        }
        errors
    }

    /// The `alert`/`confirm`/`prompt` dialogs the page opened (each accepted at once), as
    /// `"alert: text"`.
    pub fn dialogs(&self) -> Vec<String> {
        self.conn.drain();
        self.conn
            .sessions
            .borrow()
            .get(&self.session)
            .map(|e| e.dialogs.clone())
            .unwrap_or_default()
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // Best effort: a dead browser answers at once with an error.
        let _ = self.conn.call(
            "Target.closeTarget",
            json!({ "targetId": self.target_id }),
            None,
            Duration::from_secs(2),
        );
    }
}
