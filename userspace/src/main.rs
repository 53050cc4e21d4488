//! The `tern` command. Everything is in `cli/` (parsing and printing) and
//! the `tern` library (the work).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
