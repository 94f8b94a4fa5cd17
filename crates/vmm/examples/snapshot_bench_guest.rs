//! Writes the tiny PVH guest the snapshot benchmark saves and restores: it writes to the
//! first word of every page of TOUCH MiB of RAM from 4 MiB on (so a snapshot has that much
//! non-zero memory to store), prints a marker on COM1 and halts.
//!
//! Usage: cargo run --example snapshot_bench_guest -- OUT.elf TOUCH_MIB

#[allow(dead_code)]
#[path = "../tests/common/asm.rs"]
mod asm;
#[allow(dead_code)]
#[path = "../tests/common/image.rs"]
mod image;

use iced_x86::code_asm::*;

const TOUCH_FROM: u32 = 4 << 20;

fn main() {
    let mut args = std::env::args().skip(1);
    let out = args
        .next()
        .expect("usage: snapshot_bench_guest OUT.elf TOUCH_MIB");
    let touch_mib: u32 = args
        .next()
        .and_then(|m| m.parse().ok())
        .expect("usage: snapshot_bench_guest OUT.elf TOUCH_MIB");
    let mut g = asm::Guest::new(32);
    let mut touch = g.label();
    g.a.mov(esp, asm::STACK_TOP).unwrap();
    g.a.mov(ebx, TOUCH_FROM).unwrap();
    g.a.mov(ecx, (touch_mib << 20) / 4096).unwrap();
    g.set(&mut touch);
    g.a.mov(dword_ptr(ebx), ebx).unwrap();
    g.a.add(ebx, 4096).unwrap();
    g.a.dec(ecx).unwrap();
    g.a.jnz(touch).unwrap();
    g.print("FERROVIRT-BENCH-READY\n");
    g.halt_forever();
    let code = g.assemble(asm::CODE_BASE);
    let elf = image::elf(
        &[image::Segment {
            addr: asm::CODE_BASE,
            data: code,
        }],
        asm::CODE_BASE,
        Some(asm::CODE_BASE as u32),
    );
    std::fs::write(&out, elf).expect("write guest");
}
