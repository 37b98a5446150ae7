//! vmm-lite: a small KVM virtual machine monitor for sandscope.
//!
//! The crate owns everything that touches `/dev/kvm` in the project: guest memory, vCPUs,
//! kernel loading (Linux 64-bit boot protocol and PVH), a handful of devices (8250 serial,
//! i8042 reset, a boot-timer marker and virtio-vsock over virtio-mmio) and the metrics the
//! host agent uses to build its cold-start waterfall.
//!
//! Shape:
//! - [`host`] probes the host (KVM present, accessible, PVM or hardware).
//! - [`config`] turns raw CLI input into a validated [`config::VmConfig`].
//! - [`boot`] places the kernel, initrd, command line and boot structures in guest memory;
//!   [`mptable`] describes the vCPUs and interrupt routing for guests without ACPI.
//! - [`vstate`] creates the VM and its vCPUs and runs them; [`cpuid`] builds each vCPU's
//!   CPUID from what KVM supports (a pure function, unit-tested with Intel and AMD lists).
//! - [`devices`] holds the device models. The virtio-vsock device is generic over its
//!   backend ([`devices::vsock::VsockBackend`]) so it is tested without KVM.
//! - [`signals`] blocks the control signals before `main` runs and kicks vCPU threads out
//!   of KVM_RUN on stop.
//! - [`metrics`] holds atomic counters and phase timestamps, serialised to JSON.
//! - [`vmm`] wires it all together and runs the event loop.
#![warn(missing_docs)]

pub mod boot;
pub mod config;
pub mod cpuid;
pub mod devices;
pub mod host;
pub mod metrics;
pub mod mptable;
pub mod ratelimit;
pub mod signals;
pub mod vmm;
pub mod vstate;
