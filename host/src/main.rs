//! `ferrotune`: the command line.
use std::process::ExitCode;

use clap::Parser;
use ferrotune::cli::args::Cli;

/// The process's allocator, libtorch's included (the binary exports `malloc`, `free`, … so the
/// libraries it loads use them too): jemalloc, keeping freed pages for reuse instead of
/// returning them to the system (no decay purging, as Intel's PyTorch-on-CPU tuning advice has
/// it). A training step frees and allocates the same large buffers every step (logits-sized,
/// hundreds of MiB): glibc maps each afresh (page faults, zeroing and unmapping every step) and
/// its heap keeps more resident; on `make bench-train` glibc was 10–15 % slower with a 30 %
/// higher peak RSS. `MALLOC_CONF` in the environment still overrides these options.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's compiled-in options (read at its first allocation): never purge freed pages, and
/// serve large allocations from the ordinary arenas (no eagerly purged "oversize" arena).
#[cfg(target_os = "linux")]
#[allow(non_upper_case_globals)]
#[no_mangle]
pub static malloc_conf: &[u8; 57] = b"dirty_decay_ms:-1,muzzy_decay_ms:-1,oversize_threshold:0\0";

/// Exit status of a command whose stdout was closed under it (`ferrotune data check | head`):
/// 128 + SIGPIPE, what a Unix tool killed by SIGPIPE reports.
const CLOSED_STDOUT: i32 = 141;

/// A closed stdout ends the command quietly: `println!` panics on EPIPE (Rust ignores SIGPIPE
/// so that sockets get errors instead), and that panic is turned into a quiet exit with
/// status 141 instead of a panic message and status 101. Other panics keep the default hook.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(CLOSED_STDOUT);
        }
        default(info)
    }));
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let cli = Cli::parse();
    init_logging(cli.global.verbose);
    match ferrotune::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
