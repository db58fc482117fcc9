//! The `keyward` binary: parses arguments, calls the library, maps errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use keyward::cli::{Cli, Command};
use keyward::daemon::{ServeOptions, serve};
use keyward::seal::alloc::ZeroOnFree;

/// Every freed heap block is wiped, so copies of a key in HTTP and TLS buffers do not outlive
/// their request.
#[global_allocator]
static ALLOCATOR: ZeroOnFree = ZeroOnFree(std::alloc::System);

fn main() -> ExitCode {
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
