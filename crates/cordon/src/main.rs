//! `cordon`: run untrusted code in a sandbox whose only way out is an audited egress gateway.

mod alerts;
mod attribution;
mod audit_cmd;
mod audit_sink;
mod canary;
mod cli;
mod doctor;
mod gateway_cmd;
mod gateway_run;
mod ids;
mod intercept_setup;
mod result;
mod session;
mod teardown;
mod workspace;

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let code = cli::main();
    let _ = std::io::stdout().flush();
    ExitCode::from(code.clamp(0, 255) as u8)
}
