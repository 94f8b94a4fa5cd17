//! Builds the machine: KVM VM, memory, irqchip, devices, ACPI, boot, vCPUs.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_superio::{I8042Device, Serial};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi;
use crate::boot::{self, BootSpec};
use crate::config::{LaunchConfig, SerialMode};
use crate::counters::ExitCounters;
use crate::cpu::{cpuid, msrs, regs};
use crate::device_manager::{Devices, DevicesState};
use crate::devices::acpi_pm::{self, AcpiPm};
use crate::devices::bus::Bus;
use crate::devices::cmos::Cmos;
use crate::devices::i8042::{ResetLine, I8042};
use crate::devices::serial::{InputSpace, IrqTrigger, SerialOutput, SerialPort, SocketClients};
use crate::error::{kvm_err, Error, Result};
use crate::kvm_state::{self, VcpuState, VmState};
use crate::layout;
use crate::lifecycle::Lifecycle;
use crate::memory::{self, GuestMemoryMmap};
use crate::vcpu::{self, Vcpu, VcpuSet};

const KVM_API_VERSION: i32 = 12;
const TSS_ADDRESS: usize = 0xfffb_d000;

/// A running machine.
pub struct Machine {
    pub vm: Arc<VmFd>,
    pub mem: Arc<GuestMemoryMmap>,
    pub lifecycle: Arc<Lifecycle>,
    pub counters: Arc<ExitCounters>,
    pub vcpus: VcpuSet,
    pub acpi_pm: Arc<Mutex<AcpiPm>>,
    pub serial: Arc<Mutex<SerialPort>>,
    /// Signalled when the guest drains the serial receive FIFO.
    pub serial_input_space: Arc<EventFd>,
    pub serial_clients: Option<SocketClients>,
    pub started: Instant,
    /// What the VM was launched with (`GET /vm` reports it; a snapshot keeps it).
    pub config: LaunchConfig,
    pub devices: Devices,
    /// The live migration of this VM, if one was asked for.
    pub migration: crate::migration::Tracker,
    /// Set for a restored or migrated machine: its first resume announces its NICs.
    pub announce: crate::announce::Pending,
}

/// Opens /dev/kvm and checks it is usable.
fn open_kvm() -> Result<Kvm> {
    let kvm = Kvm::new().map_err(|e| {
        let hint = match e.errno() {
            libc::ENOENT => {
                "the kvm module is not loaded or the host has no virtualization support"
            }
            libc::EACCES | libc::EPERM => "run as root or add your user to the kvm group",
            _ => "check that KVM works on this host",
        };
        Error::host(format!("cannot open /dev/kvm: {e} ({hint})"))
    })?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(Error::host(format!(
            "/dev/kvm speaks API version {version}, ferrovmm needs {KVM_API_VERSION}"
        )));
    }
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::host(format!(
                "this KVM lacks {name}, which ferrovmm needs"
            )));
        }
    }
    Ok(kvm)
}

fn serial_output(mode: &SerialMode) -> Result<(SerialOutput, Option<SocketClients>)> {
    Ok(match mode {
        SerialMode::Stdio => (SerialOutput::Stdout, None),
        SerialMode::None => (SerialOutput::Sink, None),
        SerialMode::File(path) => (
            SerialOutput::append_to(path)
                .map_err(|e| Error::usage(format!("--serial file={}: {e}", path.display())))?,
            None,
        ),
        SerialMode::Socket(_) => {
            let clients: SocketClients = Arc::default();
            (SerialOutput::Socket(clients.clone()), Some(clients))
        }
    })
}

/// The whole machine's state apart from RAM: what a snapshot stores beside the memory file.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct MachineState {
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

/// Where a machine's RAM and CPU state come from.
pub enum Origin {
    /// Load the kernel and start the boot vCPU at its entry point.
    Boot,
    /// Map RAM from a snapshot's memory file and load the saved state; the vCPUs
    /// start paused.
    Restore {
        memory: MemorySource,
        state: Box<MachineState>,
    },
}

/// Where a restored machine's RAM comes from.
pub enum MemorySource {
    /// A snapshot's memory file: mapped copy-on-write, or copied up front with `eager`.
    File {
        path: std::path::PathBuf,
        eager: bool,
    },
    /// RAM already filled (received by live migration).
    Ready(GuestMemoryMmap),
}

impl Machine {
    /// Runs the vCPUs again; the first resume of a restored or migrated machine also
    /// tells the network where its NICs are now.
    pub fn resume(self: &Arc<Self>) {
        self.vcpus.resume();
        if self.announce.take() {
            let machine = Arc::downgrade(self);
            crate::announce::start(move || {
                if let Some(m) = machine.upgrade() {
                    m.devices.announce();
                }
            });
        }
    }

    /// The state of a paused machine. The caller holds device I/O (`devices.pause_io`)
    /// so that devices and RAM do not move while it and the memory are saved.
    pub fn save_state(&self) -> std::result::Result<MachineState, String> {
        if !self.vcpus.pause.is_paused() {
            return Err("the VM is running; pause it first".into());
        }
        Ok(MachineState {
            vcpus: self.vcpus.save_states(&self.lifecycle)?,
            vm: VmState::save(&self.vm)?,
            devices: self.devices.save(),
        })
    }
}

/// Builds the VM described by `args` and starts its vCPUs.
pub fn build_and_start(args: &LaunchConfig) -> Result<Machine> {
    build(args, Origin::Boot)
}

/// Builds the machine `args` describe, from scratch or from a snapshot, and starts
/// its vCPU threads (paused when restoring).
pub fn build(args: &LaunchConfig, origin: Origin) -> Result<Machine> {
    let kvm = open_kvm()?;
    let max_vcpus = kvm.get_max_vcpus() as u32;
    if args.vcpus > max_vcpus {
        return Err(Error::usage(format!(
            "--vcpus {} is more than KVM allows on this host ({max_vcpus})",
            args.vcpus
        )));
    }
    let mem_bytes = args.memory_mib << 20;

    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    vm.set_tss_address(TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

    // Open disks and TAPs first: a bad --disk or --net fails before any guest setup.
    let devices = crate::pci_devices::open_devices(args)?;
    let (mem, restore) = match origin {
        Origin::Boot => (memory::create_guest_memory(mem_bytes)?, None),
        Origin::Restore { memory, state } => {
            if state.vcpus.len() != args.vcpus as usize {
                return Err(Error::usage(format!(
                    "the snapshot has {} vCPU states for {} vCPUs",
                    state.vcpus.len(),
                    args.vcpus
                )));
            }
            (
                match memory {
                    MemorySource::File { path, eager } => {
                        memory::map_from_file(&path, mem_bytes, eager)?
                    }
                    MemorySource::Ready(mem) => mem,
                },
                Some(state),
            )
        }
    };
    // Registering memory is a slow ioctl on some hosts (milliseconds under nested
    // virtualization); it runs while the kernel is loaded and the vCPUs are set up.
    let slots = memory::slots(&mem);
    let registration = {
        let vm = vm.clone();
        std::thread::Builder::new()
            .name("memslots".into())
            .spawn(move || memory::register_slots(&vm, &slots))
            .map_err(|e| Error::host(format!("cannot start a thread: {e}")))?
    };

    // A restored machine's RAM already holds its ACPI tables, kernel and boot structures.
    let boot_info = match restore {
        Some(_) => None,
        None => {
            let rsdp = acpi::write_tables(&mem, args.vcpus)?;
            Some(boot::load(
                &mem,
                &BootSpec {
                    kernel: &args.kernel,
                    initrd: args.initrd.as_deref(),
                    cmdline: &args.cmdline,
                    mem_bytes,
                    rsdp,
                },
            )?)
        }
    };

    let lifecycle = Arc::new(Lifecycle::new().map_err(|e| Error::host(format!("eventfd: {e}")))?);
    let counters = Arc::new(ExitCounters::default());

    // Devices on the port I/O bus.
    let pio = Bus::new();
    let serial_irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::host(format!("eventfd: {e}")))?;
    vm.register_irqfd(&serial_irq, layout::COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD"))?;
    let serial_input_space = Arc::new(
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::host(format!("eventfd: {e}")))?,
    );
    let (out, serial_clients) = serial_output(&args.serial)?;
    let serial = Arc::new(Mutex::new(SerialPort(Serial::with_events(
        IrqTrigger(serial_irq),
        InputSpace(serial_input_space.clone()),
        out,
    ))));
    let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(
        Box::new(vm.clone()),
        lifecycle.clone(),
    )));
    let i8042 = Arc::new(Mutex::new(I8042(I8042Device::new(ResetLine(
        lifecycle.clone(),
    )))));
    let below_4g = mem_bytes.min(layout::MMIO_HOLE_START);
    let cmos = Arc::new(Mutex::new(Cmos::new(below_4g, mem_bytes - below_4g)));
    let insert = |bus: &Bus, dev, start: u16, len: u64| {
        bus.insert(dev, u64::from(start), len)
            .map_err(|e| Error::host(format!("port bus: {e}")))
    };
    insert(&pio, serial.clone(), layout::COM1_PORT, 8)?;
    insert(&pio, i8042.clone(), layout::I8042_PORT, 5)?;
    insert(&pio, cmos.clone(), layout::CMOS_PORT, 2)?;
    insert(
        &pio,
        acpi_pm.clone(),
        layout::PM1A_EVT_PORT,
        acpi_pm::RANGE_LEN,
    )?;
    // Port 0x80 is the POST-code port Linux uses for I/O delays: accept and drop.
    insert(
        &pio,
        Arc::new(Mutex::new(crate::devices::bus::Sink)),
        0x80,
        1,
    )?;
    let mem = Arc::new(mem);
    let mmio = Arc::new(Bus::new());
    let pci = crate::pci_devices::attach(&vm, &mem, &pio, &mmio, devices)?;
    let pio = Arc::new(pio);
    let devices = Devices {
        serial: serial.clone(),
        i8042,
        cmos,
        acpi_pm: acpi_pm.clone(),
        pci,
    };

    // vCPUs: CPUID, MSRs, FPU and LAPIC on each; registers only on the boot vCPU.
    // A restore loads all of that from the snapshot instead.
    let base_cpuid = cpuid::supported(&kvm)?;
    let msr_indices = Arc::new(kvm_state::msr_index_list(&kvm).map_err(Error::host)?);
    let mut vcpus = Vec::with_capacity(args.vcpus as usize);
    for index in 0..args.vcpus {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        match (&restore, &boot_info) {
            (Some(state), _) => state.vcpus[index as usize]
                .restore(&fd)
                .map_err(|e| Error::usage(format!("cannot restore vcpu{index}: {e}")))?,
            (None, boot_info) => {
                fd.set_cpuid2(&cpuid::for_vcpu(&base_cpuid, index, args.vcpus))
                    .map_err(kvm_err("KVM_SET_CPUID2"))?;
                msrs::setup(&fd)?;
                regs::setup_fpu(&fd)?;
                regs::setup_lapic(&fd)?;
                if let (0, Some(info)) = (index, boot_info) {
                    regs::setup_boot_vcpu(&fd, &mem, info)?;
                }
            }
        }
        vcpus.push(Vcpu {
            fd,
            index,
            pio: pio.clone(),
            mmio: mmio.clone(),
            lifecycle: lifecycle.clone(),
            counters: counters.clone(),
            msr_indices: msr_indices.clone(),
        });
    }
    registration
        .join()
        .map_err(|_| Error::host("memory registration thread panicked"))??;
    let paused = restore.is_some();
    if let Some(state) = restore {
        let state = *state;
        state
            .vm
            .restore(&vm)
            .map_err(|e| Error::usage(format!("cannot restore the VM: {e}")))?;
        devices
            .restore(state.devices)
            .map_err(|e| Error::usage(format!("cannot restore the devices: {e}")))?;
    }
    vcpu::install_kick_handler()
        .map_err(|e| Error::host(format!("cannot install the vCPU kick handler: {e}")))?;
    let vcpus = vcpu::start(vcpus, paused)
        .map_err(|e| Error::host(format!("cannot start vCPU threads: {e}")))?;

    Ok(Machine {
        vm,
        mem,
        lifecycle,
        counters,
        vcpus,
        acpi_pm,
        serial,
        serial_input_space,
        serial_clients,
        started: Instant::now(),
        config: args.clone(),
        devices,
        migration: crate::migration::Tracker::default(),
        announce: crate::announce::Pending::new(paused),
    })
}
