//! Measures the nested harness: `cargo run -p ferrovirt-testkit --example nested_timing [RUNS] [SMP]`.
//! Prints the median time to the outer /init, to the payload start, and of a whole trivial run.

use std::time::Duration;

use ferrovirt_testkit::Nested;

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5).max(1);
    let smp: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1).max(1);
    let (mut init, mut payload, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        match Nested::new().smp(smp).run("true") {
            Ok(out) => {
                println!(
                    "run {run}: init {:?} payload {:?} total {:?}",
                    out.time_to_init, out.time_to_payload, out.total
                );
                init.push(out.time_to_init);
                payload.push(out.time_to_payload);
                total.push(out.total);
            }
            Err(e) => {
                eprintln!("nested_timing: run {run} failed: {e}");
                std::process::exit(1);
            }
        }
    }
    println!(
        "median of {runs} (smp {smp}): outer init {:?}, payload start {:?}, total {:?}",
        median(init),
        median(payload),
        median(total)
    );
}
