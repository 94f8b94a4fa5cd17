//! ferrovmm command-line entry point.

use clap::Parser;

fn main() {
    let args = match ferrovmm::Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    ferrovmm::logger::init(args.log_level);
    match ferrovmm::run(args.clone()) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ferrovmm: {e}");
            ferrovmm::cleanup(&args);
            std::process::exit(e.exit_code());
        }
    }
}
