//! `anomalyd`: thin glue over the library (see `app`).

use std::process::ExitCode;

fn main() -> ExitCode {
    match anomalyd::app::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
