//! Per-vCPU architectural setup: CPUID, MSRs, LAPIC and boot registers.

pub mod cpuid;
pub mod msrs;
pub mod regs;
