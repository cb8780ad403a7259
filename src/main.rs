//! The `certgate` binary: everything happens in [`certgate::cli`].

use std::process::ExitCode;

fn main() -> ExitCode {
    certgate::cli::main()
}
