//! The `keyward` binary: parses arguments, calls the library, maps errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use keyward::cli::{Cli, Command};
use keyward::daemon::{ServeOptions, serve};
use keyward::seal::alloc::ZeroOnFree;

/// Every freed heap block is wiped, so copies of a key in HTTP and TLS buffers do not outlive
/// their request. jemalloc underneath: the per-request churn of small buffers costs it about a
/// tenth less CPU than glibc's malloc (`cargo bench --bench compare`).
#[global_allocator]
static ALLOCATOR: ZeroOnFree<tikv_jemallocator::Jemalloc> = ZeroOnFree(tikv_jemallocator::Jemalloc);

fn main() -> ExitCode {
    // Keeps jemalloc's built-in options in the binary (see `JEMALLOC_CONF`).
    std::hint::black_box(&keyward::seal::alloc::JEMALLOC_CONF);
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            master_key_file,
            dev,
        } => match serve(ServeOptions {
            config,
            master_key_file,
            dev,
        }) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let e = anyhow::Error::from(e);
                eprintln!("keyward: {e:#}");
                ExitCode::FAILURE
            }
        },
        _ => keyward::cli::run(cli),
    }
}
