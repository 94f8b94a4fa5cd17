//! libvirt domain XML: import (define) and export (dumpxml) for the elements ferrovirt supports.
//!
//! Supported: `domain/@type`, `name`, `uuid`, `memory`/`currentMemory` (with `unit`), `vcpu`,
//! `os` (`type`, `kernel`, `initrd`, `cmdline`, `boot/@dev`), `devices` (`emulator`, `disk`, `interface`,
//! `serial`, `console`, `graphics`), `on_poweroff`, `on_reboot`, `on_crash`.
//! Any other element, and any attribute not honored, produces a warning naming it; nothing is
//! dropped silently.

use std::collections::HashSet;

use roxmltree::{Node, NodeId};

use crate::def::{
    Action, BootDev, DiskDef, DiskDevice, DiskFormat, DomainDef, GraphicsDef, GraphicsKind,
    InterfaceDef, InterfaceKind, VirtType,
};
use crate::error::ApiError;
use crate::size;

/// A parsed definition and the warnings about what was ignored.
#[derive(Debug)]
pub struct Parsed {
    pub def: DomainDef,
    pub warnings: Vec<String>,
}

/// Parse libvirt domain XML.
pub fn parse(text: &str) -> Result<Parsed, ApiError> {
    let doc = crate::xml_limits::parse(text)?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(ApiError::malformed(format!(
            "the XML root element is <{}>, expected <domain>",
            root.tag_name().name()
        )));
    }
    let mut p = Parser::default();
    let def = p.domain(root)?;
    p.sweep(root);
    let mut warnings = p.warnings;
    if p.dropped > 0 {
        warnings.push(format!(
            "... and {} more items not supported by ferrovirt were ignored (only the first {MAX_WARNINGS} are named)",
            p.dropped
        ));
    }
    Ok(Parsed { def, warnings })
}

/// Walks the document recording every element and attribute it honors (or has already warned
/// about); [`Parser::sweep`] then names everything else, so nothing is dropped silently.
#[derive(Default)]
struct Parser {
    /// At most [`MAX_WARNINGS`]; the rest are counted in `dropped`.
    warnings: Vec<String>,
    dropped: usize,
    /// Elements read (or already warned about as a whole, with their contents).
    visited: HashSet<NodeId>,
    /// Attributes read or already warned about: (element, attribute name).
    used: HashSet<(NodeId, String)>,
}

fn text(node: Node) -> String {
    node.text().unwrap_or("").trim().to_string()
}

/// Where an element is, for warnings: `domain/devices/disk/driver`.
fn path(node: Node) -> String {
    let mut names: Vec<&str> = node
        .ancestors()
        .filter(|n| n.is_element())
        .map(|n| n.tag_name().name())
        .collect();
    names.reverse();
    names.join("/")
}

/// Warnings named one by one; a document can hold many thousands of ignored items.
const MAX_WARNINGS: usize = 100;

impl Parser {
    fn warn(&mut self, warning: String) {
        if self.warnings.len() < MAX_WARNINGS {
            self.warnings.push(warning);
        } else {
            self.dropped += 1;
        }
    }

    /// The element children of `node`, each marked as read.
    fn children<'a, 'i>(&mut self, node: Node<'a, 'i>) -> Vec<Node<'a, 'i>> {
        let out: Vec<Node> = node.children().filter(|n| n.is_element()).collect();
        for n in &out {
            self.visited.insert(n.id());
        }
        out
    }

    /// An attribute's value, marked as honored.
    fn attr<'a>(&mut self, node: Node<'a, '_>, name: &str) -> Option<&'a str> {
        let value = node.attribute(name)?;
        self.used.insert((node.id(), name.to_string()));
        Some(value)
    }

    /// An attribute whose only honored values are `honored` (what ferrovirt does anyway); any
    /// other value gets a warning saying what ferrovirt does instead.
    fn honor(&mut self, node: Node, name: &str, honored: &[&str], instead: &str) {
        let Some(value) = self.attr(node, name) else {
            return;
        };
        if !honored.contains(&value) {
            self.warn(format!(
                "attribute {name}='{value}' of <{}> ({}) is not supported and was ignored: {instead}",
                node.tag_name().name(),
                path(node)
            ));
        }
    }

    /// An element ignored as a whole with a specific warning: its contents are not named again.
    fn ignored(&mut self, node: Node, warning: String) {
        self.warn(warning);
        for n in node.descendants().filter(|n| n.is_element()) {
            self.visited.insert(n.id());
            for a in n.attributes() {
                self.used.insert((n.id(), a.name().to_string()));
            }
        }
    }

    /// Name every element and attribute that was neither honored nor warned about; an element
    /// not read at all is named once, without its contents.
    fn sweep(&mut self, root: Node) {
        let mut skipped: HashSet<NodeId> = HashSet::new();
        for node in root.descendants().filter(|n| n.is_element()) {
            if node.parent().is_some_and(|p| skipped.contains(&p.id())) {
                skipped.insert(node.id());
                continue;
            }
            if node != root && !self.visited.contains(&node.id()) {
                self.warn(format!(
                    "element <{}> ({}) is not supported by ferrovirt and was ignored",
                    node.tag_name().name(),
                    path(node)
                ));
                skipped.insert(node.id());
                continue;
            }
            for a in node.attributes() {
                if !self.used.contains(&(node.id(), a.name().to_string())) {
                    self.warn(format!(
                        "attribute {}='{}' of <{}> ({}) is not supported by ferrovirt and was ignored",
                        a.name(),
                        a.value(),
                        node.tag_name().name(),
                        path(node)
                    ));
                }
            }
        }
    }

    fn domain(&mut self, root: Node) -> Result<DomainDef, ApiError> {
        let mut def = DomainDef::new("");
        def.on_reboot = Action::Restart;
        def.virt_type = match self.attr(root, "type") {
            None => None,
            Some(t) => Some(VirtType::parse(t).ok_or_else(|| {
                ApiError::invalid(format!(
                    "domain type '{t}' is not supported (use kvm, qemu or test)"
                ))
            })?),
        };
        let mut have_name = false;
        let mut current_memory = None;
        for child in self.children(root) {
            match child.tag_name().name() {
                "name" => {
                    def.name = text(child);
                    have_name = true;
                }
                "uuid" => def.uuid = Some(text(child).to_ascii_lowercase()),
                "memory" => def.memory_kib = self.memory_kib(child)?,
                "currentMemory" => current_memory = Some(self.memory_kib(child)?),
                "vcpu" => {
                    self.honor(
                        child,
                        "placement",
                        &["static"],
                        "vCPUs are placed statically",
                    );
                    def.vcpus = text(child).parse().map_err(|_| {
                        ApiError::invalid(format!("<vcpu> '{}' is not a number", text(child)))
                    })?
                }
                "os" => self.os(child, &mut def)?,
                "devices" => self.devices(child, &mut def)?,
                "on_poweroff" => def.on_poweroff = self.action(child)?,
                "on_reboot" => def.on_reboot = self.action(child)?,
                "on_crash" => def.on_crash = self.action(child)?,
                _ => {
                    self.visited.remove(&child.id());
                }
            }
        }
        if !have_name {
            return Err(ApiError::invalid("the domain XML has no <name>"));
        }
        if let Some(cur) = current_memory {
            if cur != def.memory_kib {
                self.warn(format!(
                    "<currentMemory> {cur} KiB differs from <memory> {} KiB; ballooning is not supported, using <memory>",
                    def.memory_kib
                ));
            }
        }
        Ok(def)
    }

    /// `<memory unit='...'>N</memory>` in KiB (libvirt's default unit); like libvirt, a size that is
    /// not a whole number of KiB is rounded up, with a warning.
    fn memory_kib(&mut self, node: Node) -> Result<u64, ApiError> {
        let tag = node.tag_name().name();
        let value: u64 = text(node).parse().map_err(|_| {
            ApiError::invalid(format!("<{tag}> '{}' is not a whole number", text(node)))
        })?;
        let unit = self.attr(node, "unit").unwrap_or("KiB");
        let sized =
            size::to_kib(value, unit).map_err(|e| ApiError::invalid(format!("<{tag}>: {e}")))?;
        if !sized.exact {
            self.warn(format!(
                "<{tag} unit='{unit}'>{value}</{tag}> is not a whole number of KiB; rounded up to {} KiB",
                sized.kib
            ));
        }
        Ok(sized.kib)
    }

    fn action(&mut self, node: Node) -> Result<Action, ApiError> {
        let tag = node.tag_name().name();
        match text(node).as_str() {
            "destroy" => Ok(Action::Destroy),
            "restart" => Ok(Action::Restart),
            "preserve" | "coredump-destroy" => {
                self.warn(format!(
                    "<{tag}> '{}' is not supported, using 'destroy'",
                    text(node)
                ));
                Ok(Action::Destroy)
            }
            "rename-restart" | "coredump-restart" => {
                self.warn(format!(
                    "<{tag}> '{}' is not supported, using 'restart'",
                    text(node)
                ));
                Ok(Action::Restart)
            }
            other => Err(ApiError::invalid(format!(
                "<{tag}> '{other}' is not one of destroy, restart"
            ))),
        }
    }

    fn os(&mut self, os: Node, def: &mut DomainDef) -> Result<(), ApiError> {
        for child in self.children(os) {
            match child.tag_name().name() {
                "type" => {
                    let t = text(child);
                    if t != "hvm" {
                        return Err(ApiError::invalid(format!(
                            "<os><type> '{t}' is not supported (only hvm)"
                        )));
                    }
                    if let Some(arch) = self.attr(child, "arch") {
                        if arch != "x86_64" {
                            return Err(ApiError::invalid(format!(
                                "arch '{arch}' is not supported (only x86_64)"
                            )));
                        }
                    }
                }
                "kernel" => def.os.kernel = Some(text(child).into()),
                "initrd" => def.os.initrd = Some(text(child).into()),
                "cmdline" => def.os.cmdline = Some(text(child)),
                "boot" => {
                    let dev = match self.attr(child, "dev") {
                        Some("hd") => BootDev::Hd,
                        Some("cdrom") => BootDev::Cdrom,
                        Some("network") => BootDev::Network,
                        other => {
                            return Err(ApiError::invalid(format!(
                                "<boot dev='{}'> is not one of hd, cdrom, network",
                                other.unwrap_or("")
                            )))
                        }
                    };
                    def.os.boot.push(dev);
                }
                _ => {
                    self.visited.remove(&child.id());
                }
            }
        }
        Ok(())
    }

    fn devices(&mut self, devices: Node, def: &mut DomainDef) -> Result<(), ApiError> {
        let mut serial_seen = false;
        let mut console_seen = false;
        for child in self.children(devices) {
            match child.tag_name().name() {
                "disk" => {
                    if let Some(disk) = self.disk(child)? {
                        def.disks.push(disk);
                    }
                }
                "interface" => def.interfaces.push(self.interface(child)?),
                // The engine, chosen explicitly (see crate::engine).
                "emulator" => def.emulator = Some(text(child)),
                // Every ferrovirt VM has one serial console (ttyS0), logged and attachable:
                // a first pty <serial> and <console> on port 0 describe exactly that.
                "serial" | "console" => {
                    let tag = child.tag_name().name();
                    let seen = if tag == "serial" {
                        &mut serial_seen
                    } else {
                        &mut console_seen
                    };
                    if *seen {
                        self.ignored(
                            child,
                            format!("a second <{tag}> is not supported (every VM has one serial console) and was ignored"),
                        );
                        continue;
                    }
                    *seen = true;
                    let one = "every VM has one serial console (ttyS0), logged and attachable with `ferrovirt console`";
                    self.honor(child, "type", &["pty"], one);
                    for target in self.children(child) {
                        if target.tag_name().name() != "target" {
                            self.visited.remove(&target.id());
                            continue;
                        }
                        self.honor(target, "port", &["0"], one);
                        self.honor(target, "type", &["serial", "isa-serial"], one);
                    }
                }
                "graphics" => self.graphics(child, def),
                _ => {
                    self.visited.remove(&child.id());
                }
            }
        }
        Ok(())
    }

    fn graphics(&mut self, node: Node, def: &mut DomainDef) {
        let kind = self.attr(node, "type").unwrap_or("");
        if kind != "vnc" {
            self.ignored(
                node,
                format!("<graphics type='{kind}'> is not supported (only vnc) and was ignored"),
            );
            return;
        }
        self.honor(
            node,
            "autoport",
            &["yes"],
            "the VNC port is picked automatically (see `ferrovirt domdisplay`)",
        );
        self.honor(
            node,
            "port",
            &["-1"],
            "the VNC port is picked automatically (see `ferrovirt domdisplay`)",
        );
        // The listen address is checked against the daemon's policy at define and start.
        let mut listen = self.attr(node, "listen").map(str::to_string);
        for child in self.children(node) {
            if child.tag_name().name() != "listen" {
                self.visited.remove(&child.id());
                continue;
            }
            match self.attr(child, "type") {
                Some("address") => {
                    if let Some(address) = self.attr(child, "address") {
                        listen.get_or_insert_with(|| address.to_string());
                    }
                }
                other => self.warn(format!(
                    "<listen type='{}'> of <graphics> is not supported (only type='address') and was ignored",
                    other.unwrap_or("")
                )),
            }
        }
        def.graphics = Some(GraphicsDef {
            kind: GraphicsKind::Vnc,
            listen: listen.unwrap_or_else(|| "127.0.0.1".into()),
            passwd: self.attr(node, "passwd").map(str::to_string),
        });
    }

    fn disk(&mut self, disk: Node) -> Result<Option<DiskDef>, ApiError> {
        let device = match disk.attribute("device").unwrap_or("disk") {
            "disk" => DiskDevice::Disk,
            "cdrom" => DiskDevice::Cdrom,
            other => {
                self.ignored(
                    disk,
                    format!("<disk device='{other}'> is not supported and was ignored"),
                );
                return Ok(None);
            }
        };
        self.attr(disk, "device");
        self.honor(
            disk,
            "type",
            &["file", "block"],
            "a disk is a host file or block device (<source file=...> or <source dev=...>)",
        );
        let mut path = None;
        let mut format = DiskFormat::Raw;
        let mut target = None;
        let mut readonly = false;
        for child in self.children(disk) {
            match child.tag_name().name() {
                "source" => {
                    path = self
                        .attr(child, "file")
                        .or_else(|| self.attr(child, "dev"))
                        .map(Into::into)
                }
                "driver" => {
                    self.honor(
                        child,
                        "name",
                        &["qemu"],
                        "the image is read by ferrovirt's driver",
                    );
                    format = match self.attr(child, "type").unwrap_or("raw") {
                        "raw" => DiskFormat::Raw,
                        "qcow2" => DiskFormat::Qcow2,
                        other => {
                            return Err(ApiError::invalid(format!(
                                "disk format '{other}' is not supported (raw or qcow2)"
                            )))
                        }
                    }
                }
                "target" => {
                    target = self.attr(child, "dev").map(str::to_string);
                    let (bus, instead) = match device {
                        DiskDevice::Disk => ("virtio", "disks are on virtio (bus='virtio')"),
                        DiskDevice::Cdrom => ("ide", "CD-ROMs are on IDE (bus='ide')"),
                    };
                    self.honor(child, "bus", &[bus], instead);
                }
                "readonly" => readonly = true,
                _ => {
                    self.visited.remove(&child.id());
                }
            }
        }
        let Some(path) = path else {
            if device == DiskDevice::Cdrom {
                self.warn("an empty <disk device='cdrom'> (no media) was ignored".into());
                return Ok(None);
            }
            return Err(ApiError::invalid("a <disk> has no <source file=...>"));
        };
        Ok(Some(DiskDef {
            path,
            format,
            device,
            target,
            readonly: readonly || device == DiskDevice::Cdrom,
        }))
    }

    fn interface(&mut self, nic: Node) -> Result<InterfaceDef, ApiError> {
        let (kind, source_attr) = match self.attr(nic, "type") {
            Some("network") => (InterfaceKind::Network, "network"),
            Some("bridge") => (InterfaceKind::Bridge, "bridge"),
            other => {
                return Err(ApiError::invalid(format!(
                    "<interface type='{}'> is not supported (network or bridge)",
                    other.unwrap_or("")
                )))
            }
        };
        let mut source = String::new();
        let mut mac = None;
        for child in self.children(nic) {
            match child.tag_name().name() {
                "source" => source = self.attr(child, source_attr).unwrap_or("").to_string(),
                "mac" => mac = self.attr(child, "address").map(str::to_ascii_lowercase),
                "model" => {
                    let model = self.attr(child, "type").unwrap_or("");
                    if model != "virtio" {
                        self.warn(format!("<model type='{model}'> replaced by virtio"));
                    }
                }
                _ => {
                    self.visited.remove(&child.id());
                }
            }
        }
        Ok(InterfaceDef { kind, source, mac })
    }
}

pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Attribute values normalize raw whitespace to spaces: keep it as references.
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    out
}

/// Emit libvirt domain XML; `default_type` fills a definition without a type.
pub fn emit(def: &DomainDef, default_type: VirtType) -> String {
    use std::fmt::Write;
    let mut x = String::new();
    let ty = def.virt_type.unwrap_or(default_type);
    let _ = writeln!(x, "<domain type='{}'>", ty.as_str());
    let _ = writeln!(x, "  <name>{}</name>", esc(&def.name));
    if let Some(uuid) = &def.uuid {
        let _ = writeln!(x, "  <uuid>{}</uuid>", esc(uuid));
    }
    let kib = def.memory_kib;
    let _ = writeln!(x, "  <memory unit='KiB'>{kib}</memory>");
    let _ = writeln!(x, "  <currentMemory unit='KiB'>{kib}</currentMemory>");
    let _ = writeln!(x, "  <vcpu placement='static'>{}</vcpu>", def.vcpus);
    x.push_str("  <os>\n    <type arch='x86_64'>hvm</type>\n");
    if let Some(k) = &def.os.kernel {
        let _ = writeln!(x, "    <kernel>{}</kernel>", esc(&k.to_string_lossy()));
    }
    if let Some(i) = &def.os.initrd {
        let _ = writeln!(x, "    <initrd>{}</initrd>", esc(&i.to_string_lossy()));
    }
    if let Some(c) = &def.os.cmdline {
        let _ = writeln!(x, "    <cmdline>{}</cmdline>", esc(c));
    }
    for b in &def.os.boot {
        let dev = match b {
            BootDev::Hd => "hd",
            BootDev::Cdrom => "cdrom",
            BootDev::Network => "network",
        };
        let _ = writeln!(x, "    <boot dev='{dev}'/>");
    }
    x.push_str("  </os>\n");
    let _ = writeln!(
        x,
        "  <on_poweroff>{}</on_poweroff>",
        def.on_poweroff.as_str()
    );
    let _ = writeln!(x, "  <on_reboot>{}</on_reboot>", def.on_reboot.as_str());
    let _ = writeln!(x, "  <on_crash>{}</on_crash>", def.on_crash.as_str());
    x.push_str("  <devices>\n");
    if let Some(e) = &def.emulator {
        let _ = writeln!(x, "    <emulator>{}</emulator>", esc(e));
    }
    for (i, d) in def.disks.iter().enumerate() {
        let device = if d.device == DiskDevice::Cdrom {
            "cdrom"
        } else {
            "disk"
        };
        let bus = if d.device == DiskDevice::Cdrom {
            "ide"
        } else {
            "virtio"
        };
        let _ = writeln!(x, "    <disk type='file' device='{device}'>");
        let _ = writeln!(
            x,
            "      <driver name='qemu' type='{}'/>",
            d.format.as_str()
        );
        let _ = writeln!(
            x,
            "      <source file='{}'/>",
            esc(&d.path.to_string_lossy())
        );
        let _ = writeln!(
            x,
            "      <target dev='{}' bus='{bus}'/>",
            esc(&def.disk_target(i))
        );
        if d.readonly {
            x.push_str("      <readonly/>\n");
        }
        x.push_str("    </disk>\n");
    }
    for nic in &def.interfaces {
        let (ty, attr) = match nic.kind {
            InterfaceKind::Network => ("network", "network"),
            InterfaceKind::Bridge => ("bridge", "bridge"),
        };
        let _ = writeln!(x, "    <interface type='{ty}'>");
        if let Some(mac) = &nic.mac {
            let _ = writeln!(x, "      <mac address='{}'/>", esc(mac));
        }
        let _ = writeln!(x, "      <source {attr}='{}'/>", esc(&nic.source));
        x.push_str("      <model type='virtio'/>\n    </interface>\n");
    }
    x.push_str("    <serial type='pty'>\n      <target port='0'/>\n    </serial>\n");
    x.push_str(
        "    <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>\n",
    );
    if let Some(g) = &def.graphics {
        // As libvirt writes it; the password is not shown (libvirt shows it only with
        // --security-info).
        let listen = esc(&g.listen);
        let _ = writeln!(
            x,
            "    <graphics type='vnc' autoport='yes' listen='{listen}'>\n      <listen type='address' address='{listen}'/>\n    </graphics>"
        );
    }
    x.push_str("  </devices>\n</domain>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIBVIRT_XML: &str = r#"<domain type='kvm'>
  <name>CentOSVM</name>
  <uuid>6B0B4A8A-9C3A-4F2E-8E55-0D5D7B1B2C3D</uuid>
  <metadata><x/></metadata>
  <memory unit='GiB'>4</memory>
  <currentMemory unit='KiB'>4194304</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <kernel>/boot/vmlinuz</kernel>
    <cmdline>console=ttyS0 root=/dev/vda</cmdline>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>coredump-destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/centos.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci'/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:AA:BB:CC'/>
      <source bridge='br0'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'/>
    <graphics type='vnc' port='-1' autoport='yes'/>
    <video><model type='vga'/></video>
  </devices>
</domain>"#;

    #[test]
    fn parses_libvirt_xml_and_warns_about_unsupported_elements() {
        let parsed = parse(LIBVIRT_XML).expect("parses");
        let d = &parsed.def;
        assert_eq!(d.name, "CentOSVM");
        assert_eq!(
            d.uuid.as_deref(),
            Some("6b0b4a8a-9c3a-4f2e-8e55-0d5d7b1b2c3d")
        );
        assert_eq!(d.memory_kib, 4 << 20);
        assert_eq!(d.vcpus, 2);
        assert_eq!(d.virt_type, Some(VirtType::Kvm));
        assert_eq!(d.os.cmdline.as_deref(), Some("console=ttyS0 root=/dev/vda"));
        assert_eq!(d.disks.len(), 1);
        assert_eq!(d.disks[0].format, DiskFormat::Qcow2);
        assert_eq!(d.interfaces[0].mac.as_deref(), Some("52:54:00:aa:bb:cc"));
        assert!(d.graphics.is_some());
        assert_eq!(d.emulator.as_deref(), Some("/usr/bin/qemu-system-x86_64"));
        let all = parsed.warnings.join("\n");
        for name in [
            "<metadata>",
            "<features>",
            "<video>",
            "<address>",
            "coredump-destroy",
        ] {
            assert!(all.contains(name), "no warning about {name}: {all}");
        }
        d.validate().expect("valid");
    }

    #[test]
    fn emit_then_parse_is_identity_without_warnings() {
        let parsed = parse(LIBVIRT_XML).expect("parses");
        let xml = emit(&parsed.def, VirtType::Qemu);
        let again = parse(&xml).expect("re-parses");
        assert!(again.warnings.is_empty(), "{:?}", again.warnings);
        let mut expected = parsed.def.clone();
        expected.disks[0].target = Some("vda".into());
        assert_eq!(again.def, expected);
    }

    fn with_memory(memory: &str) -> Parsed {
        parse(&format!(
            "<domain type='test'><name>m</name>{memory}<os><type>hvm</type><kernel>/k</kernel></os></domain>"
        ))
        .unwrap_or_else(|e| panic!("{memory}: {}", e.message))
    }

    #[test]
    fn memory_in_every_unit_round_trips_in_kib() {
        for (memory, kib) in [
            ("<memory unit='KiB'>219100</memory>", 219100),
            ("<memory>219100</memory>", 219100),
            ("<memory unit='k'>219100</memory>", 219100),
            ("<memory unit='K'>219100</memory>", 219100),
            ("<memory unit='b'>224358400</memory>", 219100),
            ("<memory unit='bytes'>224358400</memory>", 219100),
            ("<memory unit='M'>512</memory>", 512 * 1024),
            ("<memory unit='MiB'>512</memory>", 512 * 1024),
            ("<memory unit='G'>4</memory>", 4 << 20),
            ("<memory unit='GiB'>4</memory>", 4 << 20),
            ("<memory unit='T'>1</memory>", 1 << 30),
            ("<memory unit='KB'>1024000</memory>", 1_000_000),
            ("<memory unit='MB'>2048</memory>", 2_000_000),
            ("<memory unit='GB'>1</memory>", 976_563),
        ] {
            let parsed = with_memory(memory);
            assert_eq!(parsed.def.memory_kib, kib, "{memory}");
            let xml = emit(&parsed.def, VirtType::Test);
            assert!(
                xml.contains(&format!("<memory unit='KiB'>{kib}</memory>")),
                "{memory}: {xml}"
            );
            let again = parse(&xml).expect("re-parses");
            assert_eq!(again.def, parsed.def, "{memory}");
        }
    }

    #[test]
    fn memory_that_is_not_whole_kib_is_rounded_up_with_a_warning() {
        let parsed = with_memory("<memory unit='b'>1000000</memory>");
        assert_eq!(parsed.def.memory_kib, 977);
        let all = parsed.warnings.join("\n");
        assert!(all.contains("rounded up to 977 KiB"), "{all}");
    }

    #[test]
    fn bad_memory_units_and_values_are_refused() {
        for (memory, needle) in [
            ("<memory unit='parsecs'>1</memory>", "'parsecs'"),
            ("<memory>-5</memory>", "not a whole number"),
            ("<memory unit='EiB'>99999</memory>", "too large"),
        ] {
            let text = format!("<domain><name>m</name>{memory}</domain>");
            let err = parse(&text).expect_err(memory);
            assert!(err.message.contains(needle), "{memory}: {}", err.message);
        }
    }

    #[test]
    fn deep_or_attribute_heavy_domain_xml_is_refused_naming_the_limit() {
        for depth in [4000, 100_000] {
            let xml = format!(
                "<domain type='test'><name>d</name><metadata>{}{}</metadata></domain>",
                "<x>".repeat(depth),
                "</x>".repeat(depth)
            );
            let err = parse(&xml).unwrap_err();
            assert_eq!(err.code, crate::ErrorCode::MalformedBody);
            assert!(err.message.contains("deep (limit 64)"), "{}", err.message);
        }
        let mut xml = String::from("<domain type='test'><name>d</name><vcpu");
        for i in 0..200_000 {
            xml.push_str(&format!(" a{i}='1'"));
        }
        xml.push_str(">1</vcpu></domain>");
        let err = parse(&xml).unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::MalformedBody);
        assert!(
            err.message.contains("<vcpu> has more than 64 attributes"),
            "{}",
            err.message
        );
    }

    /// A domain as libvirt's dumpxml would show it, with attributes ferrovirt does not honor.
    const WITH_UNSUPPORTED_ATTRIBUTES: &str = r#"<domain type='kvm' id='3'>
  <name>web</name>
  <uuid>6b0b4a8a-9c3a-4f2e-8e55-0d5d7b1b2c3d</uuid>
  <memory unit='KiB'>219100</memory>
  <currentMemory unit='KiB'>219100</currentMemory>
  <vcpu placement='static' current='1'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <kernel>/boot/vmlinuz</kernel>
    <cmdline>console=ttyS0</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' io='native'/>
      <source file='/var/lib/libvirt/images/web.qcow2'/>
      <target dev='vda' bus='ide'/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source bridge='br0'/>
      <model type='virtio'/>
      <link state='up'/>
    </interface>
    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
  </devices>
</domain>"#;

    #[test]
    fn every_ignored_attribute_gets_one_warning_naming_it() {
        let parsed = parse(WITH_UNSUPPORTED_ATTRIBUTES).expect("parses");
        let expected = [
            "attribute id='3' of <domain> (domain)",
            "attribute current='1' of <vcpu> (domain/vcpu)",
            "attribute machine='pc-i440fx-7.2' of <type> (domain/os/type)",
            "attribute cache='none' of <driver> (domain/devices/disk/driver)",
            "attribute io='native' of <driver> (domain/devices/disk/driver)",
            "attribute bus='ide' of <target> (domain/devices/disk/target)",
            "element <link> (domain/devices/interface/link)",
        ];
        for item in expected {
            let hits = parsed.warnings.iter().filter(|w| w.contains(item)).count();
            assert_eq!(hits, 1, "{item}: {:#?}", parsed.warnings);
        }
        assert_eq!(
            parsed.warnings.len(),
            expected.len(),
            "{:#?}",
            parsed.warnings
        );
        // What is honored comes back from dumpxml unchanged.
        let dumped = emit(&parsed.def, VirtType::Qemu);
        for honored in [
            "<name>web</name>",
            "<uuid>6b0b4a8a-9c3a-4f2e-8e55-0d5d7b1b2c3d</uuid>",
            "<memory unit='KiB'>219100</memory>",
            "<currentMemory unit='KiB'>219100</currentMemory>",
            "<kernel>/boot/vmlinuz</kernel>",
            "<cmdline>console=ttyS0</cmdline>",
            "<on_poweroff>destroy</on_poweroff>",
            "<source file='/var/lib/libvirt/images/web.qcow2'/>",
            "<mac address='52:54:00:aa:bb:cc'/>",
            "<source bridge='br0'/>",
            "<model type='virtio'/>",
            "<target port='0'/>",
            "<target type='serial' port='0'/>",
        ] {
            assert!(dumped.contains(honored), "{honored} lost: {dumped}");
        }
        assert!(dumped.starts_with("<domain type='kvm'>"), "{dumped}");
        assert!(dumped.contains(">2</vcpu>"), "{dumped}");
        assert!(
            dumped.contains("<driver name='qemu' type='qcow2'/>"),
            "{dumped}"
        );
        assert!(
            dumped.contains("<target dev='vda' bus='virtio'/>"),
            "{dumped}"
        );
    }

    #[test]
    fn dumpxml_output_round_trips_unchanged_and_without_warnings() {
        let mut def = DomainDef::new("full");
        def.uuid = Some("6b0b4a8a-9c3a-4f2e-8e55-0d5d7b1b2c3d".into());
        def.virt_type = Some(VirtType::Qemu);
        def.memory_kib = 219100;
        def.vcpus = 3;
        def.os.kernel = Some("/boot/vmlinuz".into());
        def.os.initrd = Some("/boot/initrd".into());
        def.os.cmdline = Some("console=ttyS0".into());
        def.os.boot = vec![BootDev::Cdrom, BootDev::Hd];
        def.on_crash = Action::Restart;
        def.emulator = Some("/usr/bin/qemu-system-x86_64".into());
        def.disks.push(DiskDef {
            path: "/img/a.qcow2".into(),
            format: DiskFormat::Qcow2,
            device: DiskDevice::Disk,
            target: Some("vda".into()),
            readonly: false,
        });
        def.disks.push(DiskDef {
            path: "/img/b.iso".into(),
            format: DiskFormat::Raw,
            device: DiskDevice::Cdrom,
            target: Some("sdb".into()),
            readonly: true,
        });
        def.interfaces.push(InterfaceDef {
            kind: InterfaceKind::Network,
            source: "default".into(),
            mac: Some("52:54:00:01:02:03".into()),
        });
        def.graphics = Some(GraphicsDef::vnc_loopback());
        let xml = emit(&def, VirtType::Test);
        let again = parse(&xml).expect("parses");
        assert!(again.warnings.is_empty(), "{:#?}", again.warnings);
        assert_eq!(again.def, def);
        assert_eq!(emit(&again.def, VirtType::Test), xml);
    }

    #[test]
    fn thousands_of_ignored_items_are_named_up_to_a_bound_and_counted() {
        let xml = format!(
            "<domain type='test'><name>w</name><os><type>hvm</type><kernel>/k</kernel></os>{}</domain>",
            "<x a='1'/>".repeat(5000)
        );
        let parsed = parse(&xml).expect("parses");
        assert_eq!(parsed.warnings.len(), MAX_WARNINGS + 1);
        let last = parsed.warnings.last().unwrap();
        assert!(last.contains("4900 more items"), "{last}");
    }

    #[test]
    fn malformed_xml_is_a_malformed_body_error() {
        let err = parse("<domain><name>x</domain>").unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::MalformedBody);
        let err = parse("<network/>").unwrap_err();
        assert!(err.message.contains("<network>"));
    }

    #[test]
    fn escapes_special_characters() {
        let mut def = DomainDef::new("a");
        def.os.kernel = Some("/k".into());
        def.os.cmdline = Some("a<b & 'c'".into());
        let again = parse(&emit(&def, VirtType::Test)).expect("parses");
        assert_eq!(again.def.os.cmdline.as_deref(), Some("a<b & 'c'"));
    }

    /// Found by the domain_toml fuzz target: a tab in a disk path came back as a space.
    #[test]
    fn whitespace_in_attributes_survives_dumpxml() {
        let mut def = DomainDef::new("a");
        def.os.kernel = Some("/k".into());
        def.disks.push(DiskDef {
            path: "/b.q\tow2\nx\r".into(),
            format: DiskFormat::Qcow2,
            device: DiskDevice::Disk,
            target: None,
            readonly: false,
        });
        let again = parse(&emit(&def, VirtType::Test)).expect("parses");
        assert_eq!(again.def.disks[0].path, def.disks[0].path);
    }
}
