//! Concurrent clients: parallel define/start/destroy/undefine (and the rest) on many domains and
//! on the same one end in a consistent state: every answer is a success or a clear refusal, no
//! job is left behind, running domains have distinct ids, and what the daemon shows is what it
//! stored (a restart shows the same).

mod common;

use std::thread;
use std::time::Duration;

use common::{wait_for, Daemon};
use ferrovirt_api::client::{Client, ClientError, DefFormat};
use ferrovirt_api::{DomainOp, ErrorCode};

const THREADS: u64 = 8;
const ROUNDS: u64 = 40;

fn toml_def(kernel: &str, name: &str) -> String {
    format!("name = \"{name}\"\ntype = \"test\"\nmemory_mib = 64\n[os]\nkernel = \"{kernel}\"\n")
}

/// xorshift: a fixed sequence per thread, so a failure can be replayed from its seed.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// The refusals a racing client may get; anything else (internal, driver ...) is a bug.
fn expected_refusal<T>(r: Result<T, ClientError>, what: &str) {
    match r {
        Ok(_) => {}
        Err(ClientError::Api(e))
            if matches!(
                e.code,
                ErrorCode::OperationInvalid
                    | ErrorCode::DomainBusy
                    | ErrorCode::NoDomain
                    | ErrorCode::DomainExists
            ) => {}
        Err(e) => panic!("{what}: unexpected error {e}"),
    }
}

fn one_round(c: &Client, kernel: &str, seed: &mut u64) {
    let name = format!("c{}", next(seed) % 6);
    let wait = next(seed).is_multiple_of(2).then_some(5);
    let what = next(seed) % 9;
    let label = format!("{what} on {name} (wait {wait:?})");
    match what {
        0 => expected_refusal(
            c.define(&toml_def(kernel, &name), DefFormat::Toml, false),
            &label,
        ),
        1 => expected_refusal(c.undefine(&name), &label),
        2 => expected_refusal(c.action_wait(&name, DomainOp::Start, wait), &label),
        3 => expected_refusal(c.action_wait(&name, DomainOp::Destroy, wait), &label),
        4 => expected_refusal(c.action_wait(&name, DomainOp::Suspend, wait), &label),
        5 => expected_refusal(c.action_wait(&name, DomainOp::Resume, wait), &label),
        6 => expected_refusal(c.action_wait(&name, DomainOp::Shutdown, wait), &label),
        7 => expected_refusal(
            c.define(
                &toml_def(kernel, &format!("t{}", next(seed) % 3)),
                DefFormat::Toml,
                true,
            ),
            &label,
        ),
        _ => {
            c.list(true).expect("list always answers");
        }
    }
}

/// (name, state, persistent, autostart) of every domain, sorted.
fn snapshot(c: &Client) -> Vec<(String, String, bool, Option<u32>)> {
    let mut rows: Vec<_> = c
        .list(true)
        .unwrap()
        .into_iter()
        .map(|d| (d.name, d.state.as_str().to_string(), d.persistent, d.id))
        .collect();
    rows.sort();
    rows
}

#[test]
fn parallel_clients_on_many_and_on_the_same_domain_end_consistent() {
    let mut d = Daemon::start();
    let kernel = d
        .file("vmlinuz", "not a kernel: the test driver boots nothing")
        .to_string_lossy()
        .into_owned();
    let base = std::process::id() as u64 * 7919 + 1;
    eprintln!("seed base {base}");
    let mut workers = Vec::new();
    for t in 0..THREADS {
        let c = d.client();
        let kernel = kernel.clone();
        workers.push(thread::spawn(move || {
            let mut seed = base + t;
            for _ in 0..ROUNDS {
                one_round(&c, &kernel, &mut seed);
            }
        }));
    }
    // Meanwhile everyone hammers one domain with start/destroy, waiting for each other.
    let c = d.client();
    c.define(&toml_def(&kernel, "same"), DefFormat::Toml, false)
        .unwrap();
    let hammer: Vec<_> = (0..4)
        .map(|i| {
            let c = d.client();
            thread::spawn(move || {
                for _ in 0..15 {
                    let op = if i % 2 == 0 {
                        DomainOp::Start
                    } else {
                        DomainOp::Destroy
                    };
                    expected_refusal(c.action_wait("same", op, Some(10)), "same");
                }
            })
        })
        .collect();
    for w in workers.into_iter().chain(hammer) {
        w.join().expect("a client thread failed");
    }

    // No job is left behind.
    let names: Vec<String> = c.list(true).unwrap().into_iter().map(|d| d.name).collect();
    for name in &names {
        wait_for("jobs to end", Duration::from_secs(20), || {
            matches!(c.job(name), Ok(j) if j.job.is_none()) || c.get(name).is_err()
        });
    }
    let before = snapshot(&c);
    let mut ids: Vec<u32> = before.iter().filter_map(|r| r.3).collect();
    let running = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        running,
        "running domains share an id: {before:?}"
    );
    for (name, state, persistent, _) in &before {
        assert!(
            *persistent || state != "shutoff",
            "an inactive transient domain {name} is still listed"
        );
    }
    // What the daemon showed is what it stored.
    d.kill9();
    d.spawn();
    assert_eq!(snapshot(&d.client()), before);
}
