//! `ferrovirt img` as a standalone program (same code path as the ferrovirt binary);
//! the CLI tests run it so that `cargo test -p ferrovirt-disk` needs nothing else.

fn main() {
    let code = ferrovirt_disk::img_cli::run(std::env::args_os().skip(1).collect());
    std::process::exit(code);
}
