//! Writes the tiny PVH guest the boot benchmark runs: it prints a marker on COM1
//! and ends with a triple fault, which ends both ferrovmm ("guest reset") and
//! QEMU run with -no-reboot, so the two are timed on identical work.
//!
//! Usage: cargo run --example bench_guest -- OUT.elf

#[allow(dead_code)]
#[path = "../tests/common/asm.rs"]
mod asm;
#[allow(dead_code)]
#[path = "../tests/common/image.rs"]
mod image;

use iced_x86::code_asm::*;

fn main() {
    let out = std::env::args().nth(1).expect("usage: bench_guest OUT.elf");
    let mut g = asm::Guest::new(32);
    g.a.mov(esp, asm::STACK_TOP).unwrap();
    g.print("FERROVIRT-BENCH-MARKER\n");
    g.a.push(0).unwrap();
    g.a.push(0).unwrap();
    g.a.lidt(ptr(esp + 2)).unwrap();
    g.a.ud2().unwrap();
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
