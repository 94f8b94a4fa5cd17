//! Emulated devices and the port I/O bus that routes vCPU exits to them.

pub mod acpi_pm;
pub mod bus;
pub mod cmos;
pub mod i8042;
pub mod serial;
