//! `cargo xtask bench`: setup and a release build, then the benchmark
//! ([`tern_bench`]).

use anyhow::Result;
pub use tern_bench::BenchArgs;

pub fn run(args: BenchArgs) -> Result<()> {
    if args.measures() {
        crate::build::run()?;
    }
    tern_bench::run(args)
}
