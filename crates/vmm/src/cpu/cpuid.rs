//! CPUID for each vCPU: what KVM supports, with topology and hypervisor leaves filled in.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::error::{kvm_err, Result};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_AMD_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;

const ECX_HYPERVISOR_BIT: u32 = 1 << 31;
const EDX_HTT_BIT: u32 = 1 << 28;
const ECX_AMD_CMP_LEGACY_BIT: u32 = 1 << 1;
const KVM_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";

/// KVM's supported CPUID, read once and patched per vCPU.
pub fn supported(kvm: &Kvm) -> Result<CpuId> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
}

/// Number of bits needed to hold values below `n` (x86 topology shift width).
fn topology_shift(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// The CPUID table for vCPU `index` of `count` (one socket, one thread per core).
pub fn for_vcpu(base: &CpuId, index: u32, count: u32) -> CpuId {
    let mut cpuid = base.clone();
    let apic_id = index;
    for entry in cpuid.as_mut_slice().iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX: initial APIC ID, logical processors per package, CLFLUSH line size (8 * 8 bytes).
                entry.ebx = (apic_id << 24) | ((count.min(255)) << 16) | (8 << 8);
                entry.ecx |= ECX_HYPERVISOR_BIT;
                if count > 1 {
                    entry.edx |= EDX_HTT_BIT;
                } else {
                    entry.edx &= !EDX_HTT_BIT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1.
                entry.eax = (entry.eax & 0x03ff_ffff) | ((count - 1).min(63) << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        // SMT level: one thread per core.
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        // Core level: every vCPU is a core of the one package.
                        entry.eax = topology_shift(count);
                        entry.ebx = count;
                        entry.ecx = (2 << 8) | 1;
                    }
                    level => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = level;
                    }
                }
            }
            LEAF_HYPERVISOR => {
                entry.ebx = u32::from_le_bytes([
                    KVM_SIGNATURE[0],
                    KVM_SIGNATURE[1],
                    KVM_SIGNATURE[2],
                    KVM_SIGNATURE[3],
                ]);
                entry.ecx = u32::from_le_bytes([
                    KVM_SIGNATURE[4],
                    KVM_SIGNATURE[5],
                    KVM_SIGNATURE[6],
                    KVM_SIGNATURE[7],
                ]);
                entry.edx = u32::from_le_bytes([
                    KVM_SIGNATURE[8],
                    KVM_SIGNATURE[9],
                    KVM_SIGNATURE[10],
                    KVM_SIGNATURE[11],
                ]);
            }
            LEAF_AMD_EXT_FEATURES if count > 1 => entry.ecx |= ECX_AMD_CMP_LEGACY_BIT,
            LEAF_AMD_SIZE_IDS => {
                // ECX[7:0]: cores - 1; ECX[15:12]: APIC ID size.
                entry.ecx =
                    (entry.ecx & !0xf0ff) | ((count - 1) & 0xff) | (topology_shift(count) << 12);
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_shift_covers_the_count() {
        assert_eq!(topology_shift(1), 0);
        assert_eq!(topology_shift(2), 1);
        assert_eq!(topology_shift(3), 2);
        assert_eq!(topology_shift(4), 2);
        assert_eq!(topology_shift(5), 3);
    }
}

/// Feature registers a guest may have relied on: (leaf, subleaf, register name,
/// bits that are not features but reflect state or topology and so may differ).
const FEATURE_REGS: &[(u32, u32, &str, u32)] = &[
    // ECX: OSXSAVE (27) mirrors CR4; HYPERVISOR (31) is ours.
    (LEAF_FEATURES, 0, "ecx", (1 << 27) | ECX_HYPERVISOR_BIT),
    // EDX: HTT depends on the vCPU count.
    (LEAF_FEATURES, 0, "edx", EDX_HTT_BIT),
    // ECX: OSPKE (4) mirrors CR4.
    (0x7, 0, "ebx", 0),
    (0x7, 0, "ecx", 1 << 4),
    (0x7, 0, "edx", 0),
    (0xd, 1, "eax", 0),
    (LEAF_AMD_EXT_FEATURES, 0, "ecx", ECX_AMD_CMP_LEGACY_BIT),
    (LEAF_AMD_EXT_FEATURES, 0, "edx", 0),
];

fn reg(e: &kvm_bindings::kvm_cpuid_entry2, name: &str) -> u32 {
    match name {
        "eax" => e.eax,
        "ebx" => e.ebx,
        "ecx" => e.ecx,
        _ => e.edx,
    }
}

/// CPU features in `saved` (a vCPU's CPUID from a snapshot) that this host cannot give
/// a guest, e.g. "leaf 0x7.0 ebx bits 0x20". Empty when the guest can run here.
/// A feature is there when the host's CPU has it or KVM offers it: on PVM, KVM hands
/// guests the host's values whatever the VMM sets, so KVM's "supported" list says less
/// than they saw; elsewhere KVM emulates features the CPU lacks (ARCH_CAPABILITIES,
/// x2APIC, the TSC deadline timer), so the host's CPUID says less than KVM gives.
pub fn missing_features(saved: &[kvm_bindings::kvm_cpuid_entry2]) -> Vec<String> {
    let kvm_offers = Kvm::new().ok().and_then(|kvm| supported(&kvm).ok());
    let mut missing = Vec::new();
    for &(leaf, sub, name, ignore) in FEATURE_REGS {
        let Some(want) = saved.iter().find(|e| e.function == leaf && e.index == sub) else {
            continue;
        };
        let max_leaf = std::arch::x86_64::__cpuid_count(leaf & 0x8000_0000, 0).eax;
        let have = if leaf <= max_leaf {
            let r = std::arch::x86_64::__cpuid_count(leaf, sub);
            kvm_bindings::kvm_cpuid_entry2 {
                eax: r.eax,
                ebx: r.ebx,
                ecx: r.ecx,
                edx: r.edx,
                ..Default::default()
            }
        } else {
            kvm_bindings::kvm_cpuid_entry2::default()
        };
        let offered = kvm_offers
            .as_ref()
            .and_then(|c| {
                c.as_slice()
                    .iter()
                    .find(|e| e.function == leaf && e.index == sub)
            })
            .map_or(0, |e| reg(e, name));
        let lacking = reg(want, name) & !(reg(&have, name) | offered) & !ignore;
        if lacking != 0 {
            missing.push(format!(
                "CPUID leaf {leaf:#x}.{sub} {name} bits {lacking:#x}"
            ));
        }
    }
    missing
}

#[cfg(test)]
mod host_tests {
    use super::*;

    #[test]
    fn our_own_cpuid_needs_nothing_the_host_lacks_and_more_is_refused() {
        let Ok(kvm) = Kvm::new() else { return };
        let mine = for_vcpu(&supported(&kvm).unwrap(), 0, 2);
        assert_eq!(missing_features(mine.as_slice()), Vec::<String>::new());
        let mut more = mine.as_slice().to_vec();
        let leaf7 = more.iter_mut().find(|e| e.function == 7 && e.index == 0);
        if let Some(e) = leaf7 {
            e.ebx = u32::MAX;
            let missing = missing_features(&more);
            assert!(
                missing.iter().any(|m| m.contains("leaf 0x7.0 ebx")),
                "{missing:?}"
            );
        }
    }
}
