//! The keyexportd binary: the daemon (`serve`) and its command-line client.

use clap::Parser;

/// mimalloc instead of glibc's malloc: sled allocates and frees a node copy on every
/// write, and profiles of key creation and export spent 10-25% of their time in glibc's
/// `_int_malloc`, `malloc_consolidate` and `unlink_chunk` (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keyexportd::cli::main(keyexportd::cli::Cli::parse())
}
