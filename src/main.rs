//! The `keygate` binary: parse the command line and dispatch.

use clap::Parser;

/// mimalloc, not glibc's malloc: the broker allocates and frees many small
/// objects per request on two threads, where glibc's frees and
/// consolidation cost about 15% of the CPU (`README.md`, Performance).
/// Its `override` feature also makes it `malloc` for the C inside the
/// binary (SQLite, aws-lc), whose glibc allocations were another 4%.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = keygate::cli::Cli::parse();
    let done = keygate::cli::runtime().and_then(|rt| rt.block_on(keygate::cli::run(cli)));
    match done {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Not `eprintln!`: with stderr closed it would panic (exit 101)
            // instead of failing with the documented code.
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
