//! Human output in virsh's shapes.

use ferrovirt_api::state::{Event, EventKind};
use ferrovirt_api::{DomainInfo, JobInfo};

/// Active domains first by id, then inactive ones by name (as virsh lists them).
pub fn sort_like_virsh(doms: &mut [DomainInfo]) {
    doms.sort_by(|a, b| match (a.id, b.id) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.name.cmp(&b.name),
    });
}

/// The State column: virsh's "saved" for an inactive domain with a managed save when asked
/// (`list --managed-save`).
fn list_state(d: &DomainInfo, mark_saved: bool) -> &'static str {
    if mark_saved && d.managed_save && !d.state.is_active() {
        "saved"
    } else {
        d.state.display()
    }
}

pub fn list_table(doms: &[DomainInfo], mark_saved: bool) -> String {
    let ids: Vec<String> = doms
        .iter()
        .map(|d| d.id.map(|i| i.to_string()).unwrap_or("-".into()))
        .collect();
    let id_w = ids.iter().map(String::len).max().unwrap_or(0).max(2);
    let name_w = doms.iter().map(|d| d.name.len()).max().unwrap_or(0).max(4);
    let state_w = doms
        .iter()
        .map(|d| list_state(d, mark_saved).len())
        .max()
        .unwrap_or(0)
        .max(5);
    // virsh's rule: the rule under the header spans all columns at full width, plus two.
    let rule = 1 + id_w + 3 + name_w + 3 + state_w + 2;
    let mut out = format!(
        " {:<id_w$}   {:<name_w$}   State\n{}\n",
        "Id",
        "Name",
        "-".repeat(rule)
    );
    for (d, id) in doms.iter().zip(&ids) {
        out.push_str(&format!(
            " {id:<id_w$}   {:<name_w$}   {}\n",
            d.name,
            list_state(d, mark_saved)
        ));
    }
    out.push('\n');
    out
}

pub fn dominfo(d: &DomainInfo) -> String {
    let yes = |b: bool| if b { "yes" } else { "no" };
    let rows = [
        ("Id", d.id.map(|i| i.to_string()).unwrap_or("-".into())),
        ("Name", d.name.clone()),
        ("UUID", d.uuid.clone()),
        ("OS Type", "hvm".into()),
        ("Driver", d.virt_type.as_str().into()),
        ("Engine", d.engine.describe()),
        ("Engine reason", d.engine.reason.clone()),
        ("State", d.state.display().into()),
        ("State reason", d.reason.as_str().into()),
        ("CPU(s)", d.vcpus.to_string()),
        ("Max memory", format!("{} KiB", d.memory_kib)),
        ("Used memory", format!("{} KiB", d.memory_kib)),
        ("Persistent", yes(d.persistent).into()),
        (
            "Autostart",
            if d.autostart { "enable" } else { "disable" }.into(),
        ),
        ("Managed save", yes(d.managed_save).into()),
        ("PID", d.pid.map(|p| p.to_string()).unwrap_or("-".into())),
        ("Console log", d.console_log.clone().unwrap_or("-".into())),
    ];
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{:<16}{v}\n", format!("{k}:")));
    }
    if let Some(why) = &d.engine.cannot_start {
        out.push_str(&format!("{:<16}{why}\n", "Cannot start:"));
    }
    out.push('\n');
    out
}

/// What `start` says: virsh's line, then for a kvm domain the engine that runs it and why.
pub fn started(domain: &str, d: &DomainInfo) -> String {
    let mut out = format!("Domain '{domain}' started");
    if d.virt_type == ferrovirt_api::VirtType::Kvm {
        out.push_str(&format!(
            "\nEngine: {} ({})",
            d.engine.describe(),
            d.engine.reason
        ));
    }
    out
}

/// virsh domjobinfo: "Job type: None" when idle; otherwise the job, its elapsed time, and its
/// progress where known ("Bounded" when the total is known, as in libvirt).
pub fn jobinfo(info: &JobInfo) -> String {
    let mut rows: Vec<(&str, String)> = Vec::new();
    match &info.job {
        None => rows.push(("Job type", "None".into())),
        Some(job) => {
            let bounded = job.progress.as_ref().is_some_and(|p| p.total.is_some());
            rows.push((
                "Job type",
                if bounded { "Bounded" } else { "Unbounded" }.into(),
            ));
            rows.push(("Operation", job.name.clone()));
            rows.push(("Time elapsed", format!("{} ms", job.elapsed_ms)));
            if let Some(p) = &job.progress {
                if let Some(phase) = &p.phase {
                    rows.push(("Phase", phase.clone()));
                }
                rows.push(("Processed", format!("{} {}", p.done, p.unit)));
                if let Some(total) = p.total {
                    rows.push(("Total", format!("{total} {}", p.unit)));
                    rows.push((
                        "Remaining",
                        format!("{} {}", total.saturating_sub(p.done), p.unit),
                    ));
                }
            }
            let yes = |b: bool| if b { "yes" } else { "no" };
            rows.push(("Cancellable", yes(job.cancellable).into()));
            if job.cancel_requested {
                rows.push(("Cancel requested", "yes".into()));
            }
            if job.timed_out {
                rows.push(("Timed out", "yes (waiting for the driver to return)".into()));
            }
        }
    }
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{:<18}{v}\n", format!("{k}:")));
    }
    out.push('\n');
    out
}

pub fn warnings(ws: &[String]) {
    for w in ws {
        eprintln!("warning: {w}");
    }
}

pub fn parse_event_kind(s: &str) -> Option<EventKind> {
    [
        EventKind::Defined,
        EventKind::Undefined,
        EventKind::Started,
        EventKind::Suspended,
        EventKind::Resumed,
        EventKind::Stopped,
        EventKind::Shutdown,
        EventKind::Crashed,
    ]
    .into_iter()
    .find(|k| k.as_str() == s)
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// virsh: `event 'lifecycle' for domain 'NAME': Started Booted`
pub fn event_line(ev: &Event) -> String {
    format!(
        "event 'lifecycle' for domain '{}': {} {}",
        ev.domain,
        capitalize(ev.kind.as_str()),
        capitalize(&ev.detail)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrovirt_api::{JobProgress, JobStatus};

    #[test]
    fn jobinfo_reads_like_virsh() {
        let idle = JobInfo {
            domain: "a".into(),
            job: None,
        };
        assert_eq!(jobinfo(&idle), "Job type:         None\n\n");
        let busy = JobInfo {
            domain: "a".into(),
            job: Some(JobStatus {
                name: "shutdown".into(),
                kind: ferrovirt_api::JobKind::Operation,
                started_ms: 0,
                elapsed_ms: 1500,
                cancellable: false,
                cancel_requested: false,
                timed_out: false,
                progress: Some(JobProgress {
                    phase: None,
                    done: 3,
                    total: Some(10),
                    unit: "steps".into(),
                }),
            }),
        };
        let text = jobinfo(&busy);
        assert!(text.starts_with("Job type:         Bounded\nOperation:        shutdown\nTime elapsed:     1500 ms\n"), "{text}");
        assert!(
            text.contains("Remaining:        7 steps\n") && text.contains("Cancellable:      no\n"),
            "{text}"
        );
    }
}
