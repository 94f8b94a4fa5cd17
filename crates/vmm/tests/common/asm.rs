//! Building blocks for tiny test guests, on iced-x86's code assembler.
//! Every guest talks through COM1 (0x3f8) and ends through a known port.

use iced_x86::code_asm::*;

/// Where test guest code is loaded (and entered).
pub const CODE_BASE: u64 = 0x10_0000;
/// Scratch stack for 32-bit guests (PVH gives no stack).
pub const STACK_TOP: u32 = 0x8_0000;
pub const COM1: i32 = 0x3f8;
/// SLP_TYP=5 | SLP_EN written to PM1a_CNT: ferrovmm's S5.
pub const S5_VALUE: i32 = (5 << 10) | (1 << 13);
pub const PM1A_CNT: i32 = 0x604;

pub struct Guest {
    pub a: CodeAssembler,
    pub bits: u32,
}

impl Guest {
    pub fn new(bits: u32) -> Self {
        Guest {
            a: CodeAssembler::new(bits).expect("assembler"),
            bits,
        }
    }

    pub fn label(&mut self) -> CodeLabel {
        self.a.create_label()
    }

    pub fn set(&mut self, l: &mut CodeLabel) {
        self.a.set_label(l).expect("label");
    }

    /// Prints a literal string: two instructions per byte, no loop.
    pub fn print(&mut self, s: &str) {
        self.a.mov(dx, COM1).unwrap();
        for b in s.bytes() {
            self.a.mov(al, b as i32).unwrap();
            self.a.out(dx, al).unwrap();
        }
    }

    /// Prints eax as 8 hex digits. Clobbers eax, ecx, edx, edi.
    pub fn print_hex32(&mut self) {
        let a = &mut self.a;
        let mut top = a.create_label();
        let mut digit = a.create_label();
        a.mov(edi, eax).unwrap();
        a.mov(ecx, 8).unwrap();
        a.mov(dx, COM1).unwrap();
        a.set_label(&mut top).unwrap();
        a.rol(edi, 4).unwrap();
        a.mov(eax, edi).unwrap();
        a.and(eax, 0xf).unwrap();
        a.cmp(eax, 10).unwrap();
        a.jb(digit).unwrap();
        a.add(eax, 0x27).unwrap(); // 'a' - '0' - 10
        a.set_label(&mut digit).unwrap();
        a.add(eax, 0x30).unwrap();
        a.out(dx, al).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
    }

    /// Prints rax as 16 hex digits (64-bit guests). Clobbers rax, rcx, rdx, rdi.
    pub fn print_hex64(&mut self) {
        let a = &mut self.a;
        let mut top = a.create_label();
        let mut digit = a.create_label();
        a.mov(rdi, rax).unwrap();
        a.mov(ecx, 16).unwrap();
        a.mov(dx, COM1).unwrap();
        a.set_label(&mut top).unwrap();
        a.rol(rdi, 4).unwrap();
        a.mov(rax, rdi).unwrap();
        a.and(eax, 0xf).unwrap();
        a.cmp(eax, 10).unwrap();
        a.jb(digit).unwrap();
        a.add(eax, 0x27).unwrap();
        a.set_label(&mut digit).unwrap();
        a.add(eax, 0x30).unwrap();
        a.out(dx, al).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
    }

    /// Prints the NUL-terminated string at esi/rsi. Clobbers eax, edx, esi.
    pub fn print_zstring(&mut self) {
        let a = &mut self.a;
        let mut top = a.create_label();
        let mut done = a.create_label();
        a.mov(dx, COM1).unwrap();
        a.set_label(&mut top).unwrap();
        a.lodsb().unwrap();
        a.test(al, al).unwrap();
        a.jz(done).unwrap();
        a.out(dx, al).unwrap();
        a.jmp(top).unwrap();
        a.set_label(&mut done).unwrap();
        a.nop().unwrap();
    }

    /// Prints ecx bytes at esi/rsi. Clobbers eax, ecx, edx, esi.
    pub fn print_bytes(&mut self) {
        let a = &mut self.a;
        let mut top = a.create_label();
        let mut done = a.create_label();
        a.mov(dx, COM1).unwrap();
        a.set_label(&mut top).unwrap();
        a.test(ecx, ecx).unwrap();
        a.jz(done).unwrap();
        a.lodsb().unwrap();
        a.out(dx, al).unwrap();
        a.dec(ecx).unwrap();
        a.jmp(top).unwrap();
        a.set_label(&mut done).unwrap();
        a.nop().unwrap();
    }

    /// Powers off through ferrovmm's PM1a control port (S5), then halts.
    pub fn poweroff(&mut self) {
        self.a.mov(dx, PM1A_CNT).unwrap();
        self.a.mov(ax, S5_VALUE).unwrap();
        self.a.out(dx, ax).unwrap();
        self.halt_forever();
    }

    pub fn halt_forever(&mut self) {
        let mut l = self.a.create_label();
        self.a.set_label(&mut l).unwrap();
        self.a.cli().unwrap();
        self.a.hlt().unwrap();
        self.a.jmp(l).unwrap();
    }

    pub fn assemble(mut self, base: u64) -> Vec<u8> {
        self.a.assemble(base).expect("assemble test guest")
    }
}
