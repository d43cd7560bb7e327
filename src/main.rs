//! The `catena-ingest` binary: parse the command line and run one subcommand (see `cli/`).

mod cli;

use clap::Parser;

/// mimalloc instead of glibc malloc: under load glibc spent ~19% of the relay's CPU in
/// malloc/free/consolidate (perf, README "Performance"); mimalloc's per-thread free lists
/// suit a runtime that allocates on one thread and frees on another.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    cli.runtime()?.block_on(cli.run())
}
