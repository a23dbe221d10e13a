//! The keyexportd binary: the daemon (`serve`) and its command-line client.

use clap::Parser;

fn main() -> std::process::ExitCode {
    keyexportd::cli::main(keyexportd::cli::Cli::parse())
}
