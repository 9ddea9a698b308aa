//! A running `ferrotune serve` for the tests that talk to it over HTTP.
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

use crate::ferrotune_bin;

/// A running `ferrotune serve` on a free loopback port, killed on drop.
pub struct Server {
    pub child: Child,
    /// `http://ADDR`
    pub url: String,
    /// `host:port`
    pub addr: String,
    _stdout: BufReader<ChildStdout>,
}

impl Server {
    /// `ferrotune serve --model MODEL --port 0 EXTRA…`, returned once it prints its address.
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(ferrotune_bin())
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(extra)
            .env_remove("LD_LIBRARY_PATH")
            .env_remove("FERROTUNE_PLUGIN_PATH")
            .env_remove("FERROTUNE_API_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in `{line}`"))
            .to_string();
        let addr = url.trim_start_matches("http://").to_string();
        Server { child, url, addr, _stdout: stdout }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `(VmRSS, VmHWM)` of the server in bytes: resident now, and at its peak.
    pub fn rss(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} in {status}"))
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
