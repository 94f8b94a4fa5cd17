//! Puts the PCI bus and the virtio devices the command line asks for into the machine.

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{
    ConsoleMode, DiskCache, DiskConfig, LaunchConfig, NetBackend, NetConfig, SerialMode,
};
use crate::devices::bus::Bus;
use crate::devices::serial::SerialOutput;
use crate::error::{Error, Result};
use crate::irq::{KvmGsiRouter, MsiRouter};
use crate::layout;
use crate::pci::msix::{IrqfdSink, MsixTable};
use crate::pci::root::{PciConfigIo, PciEcam, PciRoot, CONFIG_ADDRESS_PORT, CONFIG_PORTS_LEN};
use crate::virtio::block::{Block, BlockOptions};
use crate::virtio::console::Console;
use crate::virtio::net::Net;
use crate::virtio::rng::Rng;
use crate::virtio::tap::Tap;
use crate::virtio::transport::{VirtioPciDevice, BAR_SIZE};
use crate::virtio::{EventLoop, GuestMem, VirtioDevice};

/// Opens a `--disk` image, refusing what the guest could not use as asked.
pub fn open_disk(spec: &DiskConfig) -> Result<Block> {
    let path = &spec.path;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| Error::usage(format!("--disk {shown}: {e}")))?;
    if meta.is_dir() {
        return Err(Error::usage(format!(
            "--disk {shown}: is a directory, not a disk image"
        )));
    }
    if !spec.readonly && meta.permissions().mode() & 0o222 == 0 {
        return Err(Error::usage(format!(
            "--disk {shown}: the file is read-only (mode {:o}); add readonly=on, or make it writable",
            meta.permissions().mode() & 0o777
        )));
    }
    let opts = ferrovirt_disk::OpenOptions {
        format: spec.format,
        read_only: spec.readonly,
        direct: spec.cache == DiskCache::None,
    };
    let backend = ferrovirt_disk::open(path, &opts)
        .map_err(|e| Error::usage(format!("--disk {shown}: {e}")))?;
    Ok(Block::new(
        backend,
        BlockOptions {
            read_only: spec.readonly,
            serial: spec.serial.clone().unwrap_or_default(),
        },
    ))
}

fn random_mac() -> [u8; 6] {
    let mut b = [0u8; 3];
    // SAFETY: getrandom writes at most 3 bytes into our buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 3 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = [(t >> 16) as u8, (t >> 8) as u8, t as u8];
    }
    [0x52, 0x54, 0x00, b[0], b[1], b[2]]
}

pub fn open_net(spec: &NetConfig) -> Result<Net> {
    let tap = match &spec.backend {
        NetBackend::Tap(name) => Tap::open(name),
        NetBackend::Fd(fd) => Tap::from_fd(*fd),
    }
    .map_err(|e| Error::usage(format!("--net: {e}")))?;
    Ok(Net::new(tap, spec.mac.map_or_else(random_mac, |m| m.0)))
}

fn console_device(mode: &SerialMode) -> Result<Console> {
    Ok(match mode {
        SerialMode::Stdio => Console::new(SerialOutput::Stdout, true),
        SerialMode::File(path) => Console::new(
            SerialOutput::append_to(path)
                .map_err(|e| Error::usage(format!("--console file={}: {e}", path.display())))?,
            false,
        ),
        _ => Console::new(SerialOutput::Sink, false),
    })
}

/// Opens every device named on the command line; all failures happen here, before the guest runs.
pub fn open_devices(args: &LaunchConfig) -> Result<Vec<Box<dyn VirtioDevice>>> {
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for d in &args.disks {
        devices.push(Box::new(open_disk(d)?));
    }
    for n in &args.nets {
        devices.push(Box::new(open_net(n)?));
    }
    if let ConsoleMode::On(mode) = &args.console {
        devices.push(Box::new(console_device(mode)?));
    }
    if args.rng {
        devices.push(Box::new(Rng::default()));
    }
    Ok(devices)
}

/// What `attach` built: handles the device manager keeps for pause, save and restore.
pub struct PciBus {
    pub root: Arc<PciRoot>,
    pub config_io: Arc<Mutex<PciConfigIo>>,
    /// Each virtio function with its slot on bus 0, in command-line order.
    pub virtio: Vec<(usize, Arc<Mutex<VirtioPciDevice>>)>,
    pub event_loop: Arc<EventLoop>,
}

/// Builds bus 0 with `devices`, maps config access (ports and ECAM) and starts the device thread.
pub fn attach(
    vm: &Arc<VmFd>,
    mem: &GuestMem,
    pio: &Bus,
    mmio: &Arc<Bus>,
    devices: Vec<Box<dyn VirtioDevice>>,
) -> Result<PciBus> {
    let router: Arc<dyn MsiRouter> = Arc::new(KvmGsiRouter::new(vm.clone()));
    let event_loop = EventLoop::new().map_err(|e| Error::host(format!("epoll: {e}")))?;
    let mut root = PciRoot::new(mmio.clone());
    let mut next_bar = layout::PCI_MMIO_START;
    let mut virtio = Vec::new();
    for device in devices {
        let vectors = device.queue_max_sizes().len() as u16 + 1;
        let gsi_base = router.allocate(u32::from(vectors))?;
        let mut irqfds = Vec::with_capacity(usize::from(vectors));
        for v in 0..u32::from(vectors) {
            let fd = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| Error::host(format!("eventfd: {e}")))?;
            vm.register_irqfd(&fd, gsi_base + v)
                .map_err(|e| Error::host(format!("KVM_IRQFD: {e}")))?;
            irqfds.push(fd);
        }
        let msix = MsixTable::new(
            vectors,
            gsi_base,
            router.clone(),
            Arc::new(IrqfdSink { irqfds }),
        );
        if next_bar + u64::from(BAR_SIZE) > layout::PCI_MMIO_END {
            return Err(Error::usage("too many devices for the PCI memory window"));
        }
        let transport = VirtioPciDevice::new(
            device,
            mem.clone(),
            event_loop.clone(),
            msix,
            next_bar as u32,
            Some(Box::new(vm.clone())),
        )
        .map_err(Error::host)?;
        let transport = Arc::new(Mutex::new(transport));
        let slot = root.add_device(transport.clone()).map_err(Error::usage)?;
        virtio.push((slot, transport));
        next_bar += u64::from(BAR_SIZE);
    }
    let root = Arc::new(root);
    let config_io = Arc::new(Mutex::new(PciConfigIo::new(root.clone())));
    pio.insert(
        config_io.clone(),
        u64::from(CONFIG_ADDRESS_PORT),
        CONFIG_PORTS_LEN,
    )
    .map_err(Error::host)?;
    mmio.insert(
        Arc::new(Mutex::new(PciEcam::new(root.clone()))),
        layout::PCI_ECAM_START,
        layout::PCI_ECAM_SIZE,
    )
    .map_err(Error::host)?;
    event_loop
        .spawn()
        .map_err(|e| Error::host(format!("cannot start the device thread: {e}")))?;
    Ok(PciBus {
        root,
        config_io,
        virtio,
        event_loop,
    })
}
