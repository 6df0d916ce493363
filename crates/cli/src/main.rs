//! `pgstack`: the operator's command line for a service on pgstack. All of it
//! lives in the `pgstack_cli` library; see its docs.

fn main() -> std::process::ExitCode {
    pgstack_cli::run()
}
