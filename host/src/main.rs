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

#[cfg(target_os = "linux")]
mod jemalloc_ctl {
    use std::ffi::{c_char, c_int, c_void, CStr};
    use std::ptr::null_mut;

    extern "C" {
        fn mallctl(
            name: *const c_char,
            oldp: *mut c_void,
            oldlenp: *mut usize,
            newp: *mut c_void,
            newlen: usize,
        ) -> c_int;
    }

    /// How long freed pages stay before they go back, once [`decay_at_once`] ran: long enough
    /// for a step's buffers, which are freed and reallocated within milliseconds, to be
    /// reused; short enough that one-off peaks do not add up.
    const DECAY_MS: isize = 1000;

    /// Writes `value` to the jemalloc control `name`; a failure changes nothing.
    fn write<T>(name: &CStr, mut value: T) {
        // SAFETY: a NUL-terminated name and a value of the control's type and size.
        unsafe {
            mallctl(
                name.as_ptr(),
                null_mut(),
                null_mut(),
                (&mut value as *mut T).cast(),
                std::mem::size_of::<T>(),
            );
        }
    }

    /// Returns the free pages of every arena to the system (`arena.<all>.purge`;
    /// MALLCTL_ARENAS_ALL is 4096), for `ferrotune::util::alloc::release_free_memory`.
    pub fn purge() {
        // SAFETY: a NUL-terminated name and no old/new values, as the purge takes them.
        unsafe {
            mallctl(c"arena.4096.purge".as_ptr(), null_mut(), null_mut(), null_mut(), 0);
        }
    }

    /// Purges freed pages at once from now on: decay times 0 for every existing arena and
    /// for arenas made later, for `ferrotune::util::alloc::return_freed_memory`.
    pub fn decay_at_once() {
        let mut narenas: u32 = 0;
        let mut len = std::mem::size_of::<u32>();
        // SAFETY: `arenas.narenas` is an unsigned int read into `narenas`.
        let read = unsafe {
            mallctl(
                c"arenas.narenas".as_ptr(),
                (&mut narenas as *mut u32).cast(),
                &mut len,
                null_mut(),
                0,
            )
        };
        let narenas = if read == 0 { narenas } else { 0 };
        for i in 0..narenas {
            for kind in ["dirty", "muzzy"] {
                if let Ok(name) = std::ffi::CString::new(format!("arena.{i}.{kind}_decay_ms")) {
                    write::<isize>(&name, DECAY_MS);
                }
            }
        }
        write::<isize>(c"arenas.dirty_decay_ms", DECAY_MS);
        write::<isize>(c"arenas.muzzy_decay_ms", DECAY_MS);
    }
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    #[cfg(target_os = "linux")]
    ferrotune::util::alloc::set_hooks(jemalloc_ctl::purge, jemalloc_ctl::decay_at_once);
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
