//! The `banger` binary: everything is in [`cli`].

mod cli;

fn main() -> std::process::ExitCode {
    cli::complete::answer_if_asked();
    cli::run().into()
}
