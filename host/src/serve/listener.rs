//! The server's TCP listener: a cap on open connections and a header-read timeout, the two
//! knobs `axum::serve` lacks, so that half-open connections can neither pile up nor lock out
//! `/health`.
//!
//! Each accepted connection is wrapped in a [`Guarded`] stream that watches its own HTTP/1
//! framing from the outside: a connection waiting for a request's headers (just opened, or
//! kept alive after a response) must deliver them, up to the blank line, within the header
//! timeout (or, once kept alive after a response, [`KEEPALIVE_IDLE`]), else it is closed. A
//! request being answered has no deadline.
//!
//! At `--max-connections`, a new connection takes the place of the oldest one that is only
//! waiting for headers (open for at least [`MIN_AGE`], or quiet after its last response for the
//! header timeout); a connection with a request in flight is never closed for room. When no
//! such connection exists the newcomer gets `503` and is closed at once.
use std::collections::HashMap;
use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// How long a connection kept alive after a response may stay silent before it is closed.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(120);
/// A newly opened connection is not closed to make room before it is this old, so that a
/// client whose request is already on its way is not cut off by a flood of newer connections.
pub const MIN_AGE: Duration = Duration::from_millis(250);

/// What the listener enforces.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Open connections at most (`--max-connections`).
    pub max_connections: usize,
    /// Time a new connection has to send its request headers (`--header-timeout-secs`).
    pub header_timeout: Duration,
}

/// A connection's phase, as its bytes show it.
const FRESH: u8 = 0;
const IN_REQUEST: u8 = 1;
const RESPONDED: u8 = 2;

/// What the listener and a connection share.
struct Shared {
    opened: Instant,
    phase: AtomicU8,
    /// Milliseconds after `opened` of the last bytes written.
    last_write_ms: AtomicU64,
    /// Set to close the connection (to make room for a newer one).
    kill: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Shared {
    /// Whether the connection may be closed to make room, and since when it has waited.
    fn idle_since(&self, header_timeout: Duration) -> Option<Instant> {
        match self.phase.load(Ordering::Acquire) {
            FRESH if self.opened.elapsed() >= MIN_AGE => Some(self.opened),
            RESPONDED => {
                let last =
                    self.opened + Duration::from_millis(self.last_write_ms.load(Ordering::Relaxed));
                (last.elapsed() >= header_timeout).then_some(last)
            }
            _ => None,
        }
    }

    fn close(&self) {
        self.kill.store(true, Ordering::Release);
        if let Some(w) = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            w.wake();
        }
    }
}

/// The open connections.
#[derive(Default)]
struct Table {
    conns: Mutex<HashMap<u64, Arc<Shared>>>,
    next: AtomicU64,
}

/// A [`TcpListener`] that enforces [`ConnLimits`]; give it to `axum::serve`.
pub struct GuardedListener {
    inner: TcpListener,
    limits: ConnLimits,
    table: Arc<Table>,
    /// Connections refused since the last warning, and when it was logged.
    refused: u64,
    last_warning: Option<Instant>,
}

/// The answer to a connection beyond the cap when none can make room.
fn busy_response() -> String {
    let body = r#"{"error":{"message":"too many open connections (--max-connections); retry later","type":"server_error","code":"too_many_connections"}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

impl GuardedListener {
    pub fn new(inner: TcpListener, limits: ConnLimits) -> Self {
        Self { inner, limits, table: Arc::default(), refused: 0, last_warning: None }
    }

    /// Registers `stream`, making room first; `None`: no room, refused.
    fn admit(&mut self, stream: TcpStream) -> Option<Guarded> {
        let mut conns = self.table.conns.lock().unwrap_or_else(|p| p.into_inner());
        if conns.len() >= self.limits.max_connections {
            let victim = conns
                .iter()
                .filter_map(|(id, c)| c.idle_since(self.limits.header_timeout).map(|t| (t, *id)))
                .min_by_key(|(t, _)| *t)
                .map(|(_, id)| id);
            match victim {
                // Out of the table at once, so that it makes room for one newcomer only.
                Some(id) => {
                    if let Some(v) = conns.remove(&id) {
                        v.close();
                    }
                }
                None => {
                    let _ = stream.try_write(busy_response().as_bytes());
                    self.refused += 1;
                    if self.last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::warn!(
                            "refused {} connection(s) since the last warning: {} open (--max-connections), none only waiting for headers",
                            self.refused,
                            conns.len()
                        );
                        self.refused = 0;
                        self.last_warning = Some(Instant::now());
                    }
                    return None;
                }
            }
        }
        let id = self.table.next.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            opened: Instant::now(),
            phase: AtomicU8::new(FRESH),
            last_write_ms: AtomicU64::new(0),
            kill: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        conns.insert(id, shared.clone());
        let deadline = tokio::time::Instant::now() + self.limits.header_timeout;
        Some(Guarded {
            stream,
            id,
            shared,
            table: self.table.clone(),
            deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
            tail: [0; 3],
            header_timeout: self.limits.header_timeout,
            head_started: false,
        })
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    if let Some(g) = self.admit(stream) {
                        return (g, addr);
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait for some to be released.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted connection under the listener's watch.
pub struct Guarded {
    stream: TcpStream,
    id: u64,
    shared: Arc<Shared>,
    table: Arc<Table>,
    /// When the request headers awaited must have arrived; `None` while a request is answered.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The last bytes read, to find a blank line split across reads.
    tail: [u8; 3],
    header_timeout: Duration,
    /// Whether bytes of the next request arrived on a kept-alive connection (its headers
    /// then have the header timeout, not [`KEEPALIVE_IDLE`], to complete).
    head_started: bool,
}

/// Whether `bytes`, read after `tail`, hold the blank line that ends a request's headers.
fn ends_headers(tail: &mut [u8; 3], bytes: &[u8]) -> bool {
    let mut window = [0u8; 4];
    window[1..].copy_from_slice(tail);
    for &b in bytes {
        window.rotate_left(1);
        window[3] = b;
        if &window == b"\r\n\r\n" || window[2..] == *b"\n\n" {
            *tail = [0; 3];
            return true;
        }
    }
    tail.copy_from_slice(&window[1..]);
    false
}

impl Guarded {
    fn rearm(&mut self, after: Duration) {
        let at = tokio::time::Instant::now() + after;
        match &mut self.deadline {
            Some(s) => s.as_mut().reset(at),
            None => self.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.table.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.shared.kill.load(Ordering::Acquire) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room for a new connection (--max-connections)",
            )));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if this.deadline.is_some() && !new.is_empty() {
                    if ends_headers(&mut this.tail, new) {
                        this.deadline = None;
                        this.head_started = false;
                        this.shared.phase.store(IN_REQUEST, Ordering::Release);
                    } else if !this.head_started {
                        this.head_started = true;
                        if this.shared.phase.load(Ordering::Acquire) == RESPONDED {
                            this.rearm(this.header_timeout);
                        }
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                {
                    let mut w = this.shared.waker.lock().unwrap_or_else(|p| p.into_inner());
                    if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *w = Some(cx.waker().clone());
                    }
                }
                if this.shared.kill.load(Ordering::Acquire) {
                    cx.waker().wake_by_ref();
                }
                if let Some(d) = &mut this.deadline {
                    if d.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no complete request headers within the header timeout",
                        )));
                    }
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                let ms = this.shared.opened.elapsed().as_millis() as u64;
                this.shared.last_write_ms.store(ms, Ordering::Relaxed);
                let phase = this.shared.phase.load(Ordering::Acquire);
                // A final (not 1xx) status line starts the response; from then on the
                // connection waits for the next request's headers, for as long as it is
                // kept alive, each write counting as activity.
                let final_status = buf.starts_with(b"HTTP/1.") && buf.get(9) != Some(&b'1');
                if (phase == IN_REQUEST && final_status) || phase == RESPONDED {
                    this.shared.phase.store(RESPONDED, Ordering::Release);
                    this.tail = [0; 3];
                    this.head_started = false;
                    this.rearm(KEEPALIVE_IDLE);
                }
            }
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blank_line_is_found_across_reads() {
        let mut tail = [0; 3];
        assert!(!ends_headers(&mut tail, b"GET /health HTTP/1.1\r\nhost: x\r"));
        assert!(!ends_headers(&mut tail, b"\n"));
        assert!(ends_headers(&mut tail, b"\r\nbody"));
        let mut tail = [0; 3];
        assert!(ends_headers(&mut tail, b"GET / HTTP/1.0\n\n"));
        let mut tail = [0; 3];
        assert!(!ends_headers(&mut tail, b"GET / HTTP/1.1\r\nhost: x\r\n"));
        assert!(!ends_headers(&mut tail, b""));
        assert!(ends_headers(&mut tail, b"\r\n"));
    }
}
