//! The VMM: builds the VM from a [`VmConfig`], runs vCPU threads and the event loop.
//!
//! Threads: one per vCPU (port I/O and MMIO exits are handled on the vCPU thread), plus the
//! caller's thread, which runs an epoll loop for the stop latch, signals (SIGUSR1 dumps
//! metrics, SIGTERM/SIGINT stop the VM), serial input and the vsock device.
//!
//! Stop: whoever stops the VM (a device, a vCPU, a signal, the control socket) sets the
//! [`ExitHandle`] latch. The event loop then kicks every vCPU thread out of KVM_RUN
//! ([`signals::kick`]) and joins them, waiting at most [`VCPU_STOP_TIMEOUT`], before it
//! writes the metrics and returns; guest memory is only unmapped once no vCPU can run. The
//! VM fd itself is left to the process exit or the detached teardown helper
//! ([`detach_teardown`]), which is what keeps exiting fast under PVM.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::boot::{self, BootError, BootSpec, GuestMem};
use crate::config::{SerialInput, SerialOutput, VmConfig};
use crate::devices::boot_timer::{BootTimer, BOOT_TIMER_ADDR, BOOT_TIMER_SIZE};
use crate::devices::legacy::{ExitPort, EXIT_PORT, I8042, I8042_CMD, I8042_DATA};
use crate::devices::serial::{new_serial, SerialDevice, SerialOut, COM1_BASE, COM1_IRQ};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_SIZE};
use crate::devices::vsock::muxer::VsockMuxer;
use crate::devices::vsock::VsockDevice;
use crate::devices::{ExitHandle, IrqLine, StopReason};
use crate::host::{self, HostError, KvmKind};
use crate::metrics::Metrics;
use crate::signals;
use crate::vstate::{self, ExitHandler, VstateError};

/// First virtio-mmio device address.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_1000;
/// First virtio IRQ.
pub const VIRTIO_IRQ_BASE: u32 = 5;

/// Top-level errors; each names what failed.
#[derive(Debug, Error)]
pub enum VmmError {
    /// KVM unavailable.
    #[error(transparent)]
    Host(#[from] HostError),
    /// Kernel/initrd/memory problems.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// KVM VM/vCPU setup.
    #[error(transparent)]
    Vstate(#[from] VstateError),
    /// Standard Linux kernel under PVM.
    #[error("KVM on this host is PVM (kvm_pvm, no VT-x/AMD-V): standard guest kernels cannot boot under PVM; use a PVM guest kernel or another driver ({kernel} looks like a standard Linux kernel; pass --allow-pvm to try anyway)")]
    PvmRefused {
        /// The kernel path.
        kernel: String,
    },
    /// Host-side I/O setup.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let what = what.into();
    move |source| VmmError::Io { what, source }
}

type VsockTransport = MmioTransport<VsockDevice<VsockMuxer>>;

/// Routes vCPU exits to devices.
struct DeviceBus {
    serial: Mutex<SerialDevice>,
    i8042: I8042,
    exit_port: ExitPort,
    boot_timer: BootTimer,
    virtio: Vec<(u64, Arc<Mutex<VsockTransport>>)>,
    metrics: Arc<Metrics>,
}

impl DeviceBus {
    fn virtio_at(&self, addr: u64) -> Option<(u64, &Arc<Mutex<VsockTransport>>)> {
        self.virtio
            .iter()
            .find(|(base, _)| addr >= *base && addr < base + MMIO_SIZE)
            .map(|(base, d)| (addr - base, d))
    }
}

impl ExitHandler for DeviceBus {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) && data.len() == 1 => {
                let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                data[0] = s.read((p - COM1_BASE) as u8);
            }
            I8042_DATA | I8042_CMD => data.fill(self.i8042.read(port)),
            _ => {
                self.metrics.guest_errors.bad_io.inc();
                data.fill(0xff);
            }
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) && data.len() == 1 => {
                let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = s.write((p - COM1_BASE) as u8, data[0]) {
                    crate::guest_warn!("serial write failed: {e:?}");
                }
            }
            I8042_DATA | I8042_CMD if !data.is_empty() => {
                self.i8042.write(port, data[0]);
            }
            EXIT_PORT if !data.is_empty() => {
                self.metrics.guest_stop.mark(self.metrics.start);
                self.exit_port.write(data[0]);
            }
            _ => self.metrics.guest_errors.bad_io.inc(),
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if (BOOT_TIMER_ADDR..BOOT_TIMER_ADDR + BOOT_TIMER_SIZE).contains(&addr) {
            self.boot_timer.read(addr - BOOT_TIMER_ADDR, data);
        } else if let Some((off, dev)) = self.virtio_at(addr) {
            dev.lock()
                .unwrap_or_else(|e| e.into_inner())
                .mmio_read(off, data);
        } else {
            self.metrics.guest_errors.bad_io.inc();
            crate::guest_warn!("MMIO read of unmapped address {addr:#x}");
            data.fill(0xff);
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if (BOOT_TIMER_ADDR..BOOT_TIMER_ADDR + BOOT_TIMER_SIZE).contains(&addr) {
            self.boot_timer.write(addr - BOOT_TIMER_ADDR, data);
        } else if let Some((off, dev)) = self.virtio_at(addr) {
            dev.lock()
                .unwrap_or_else(|e| e.into_inner())
                .mmio_write(off, data);
        } else {
            self.metrics.guest_errors.bad_io.inc();
            crate::guest_warn!("MMIO write to unmapped address {addr:#x}");
        }
    }
}

fn open_serial_out(cfg: &SerialOutput) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match cfg {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Null => Box::new(std::io::sink()),
        SerialOutput::Path(p) => Box::new(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)
                .map_err(io_err(format!("cannot open serial output {}", p.display())))?,
        ),
    })
}

/// Writes the metrics document to `path` atomically (temp file + rename).
pub fn write_metrics(path: &Path, doc: &serde_json::Value) -> std::io::Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let mut f = File::create(&tmp)?;
    serde_json::to_writer_pretty(&mut f, doc)?;
    f.write_all(b"\n")?;
    drop(f);
    std::fs::rename(tmp, path)
}

const TOK_EXIT: u64 = 1;
const TOK_SIGNAL: u64 = 2;
const TOK_STDIN: u64 = 3;
const TOK_SERIAL_LISTENER: u64 = 4;
const TOK_SERIAL_CONN: u64 = 5;
const TOK_VSOCK_BACKEND: u64 = 6;
const TOK_CONTROL_LISTENER: u64 = 7;
const TOK_CONTROL_CONN: u64 = 8;
const TOK_VSOCK_QUEUE: u64 = 16;

fn epoll_add(ep: &Epoll, fd: RawFd, tok: u64) -> Result<(), VmmError> {
    ep.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, tok),
    )
    .map_err(io_err("epoll_ctl"))
}

/// Builds and runs a VM until it stops. Returns the stop reason (exit code inside).
///
/// Meant to be called once per process, from `main`: it blocks SIGUSR1/SIGTERM/SIGINT in the
/// calling thread (they are read from a signalfd; `main` should already have blocked them,
/// see [`signals::block_control_signals`]), installs the vCPU kick handler, and unless
/// `sync_teardown` is set forks the teardown helper ([`detach_teardown`]). When it returns,
/// every vCPU thread has been joined (or, if one did not leave KVM_RUN within
/// [`VCPU_STOP_TIMEOUT`], guest memory is left mapped); the caller should exit the process
/// with the returned code.
pub fn run(cfg: &VmConfig, metrics: Arc<Metrics>) -> Result<StopReason, VmmError> {
    let sigfd = signals::control_signal_fd().map_err(io_err("cannot create signalfd"))?;
    signals::install_kick_handler().map_err(io_err("cannot install the vCPU kick handler"))?;
    let kind = host::kvm_kind();
    let kvm = host::open_kvm()?;
    let info = boot::inspect_kernel(&cfg.kernel)?;
    if kind == KvmKind::Pvm && info.is_linux && !cfg.allow_pvm {
        return Err(VmmError::PvmRefused {
            kernel: cfg.kernel.display().to_string(),
        });
    }
    // Stale vsock sockets block the listener: remove them before anything slow happens.
    if let Some(v) = &cfg.vsock {
        let _ = std::fs::remove_file(&v.uds);
    }

    let mem: GuestMem = boot::create_memory(cfg.mem_mib)?;
    let vm = vstate::create_vm(&kvm, &mem)?;
    metrics.memory_ready.mark(metrics.start);

    let exit = ExitHandle::new().map_err(io_err("eventfd"))?;
    let mut virtio_cmdline = Vec::new();
    let mut vsock_transport: Option<Arc<Mutex<VsockTransport>>> = None;
    if let Some(v) = &cfg.vsock {
        let base = VIRTIO_MMIO_BASE;
        let irq_num = VIRTIO_IRQ_BASE;
        let irq = IrqLine::new().map_err(io_err("eventfd"))?;
        vm.register_irqfd(irq.eventfd(), irq_num)
            .map_err(|e| VstateError::RegisterEventFd("irqfd", e))?;
        let backend = VsockMuxer::new(v.cid, &v.uds, metrics.clone()).map_err(io_err(format!(
            "cannot listen on vsock socket {}",
            v.uds.display()
        )))?;
        let dev = VsockDevice::new(v.cid, mem.clone(), backend, metrics.clone())
            .map_err(io_err("vsock device"))?;
        let t = MmioTransport::new(dev, irq, metrics.clone()).map_err(io_err("eventfd"))?;
        // With ioeventfd, KVM signals the queue eventfd itself and the vCPU never exits for
        // a notify; without it the transport signals the same eventfd on the MMIO exit.
        if kvm.check_extension(kvm_ioctls::Cap::Ioeventfd) {
            for (i, evt) in t.queue_evts().iter().enumerate() {
                let addr = kvm_ioctls::IoEventAddress::Mmio(
                    base + crate::devices::virtio::mmio::REG_QUEUE_NOTIFY,
                );
                vm.register_ioevent(evt, &addr, i as u32)
                    .map_err(|e| VstateError::RegisterEventFd("ioeventfd", e))?;
            }
        }
        virtio_cmdline.push((base, MMIO_SIZE, irq_num));
        vsock_transport = Some(Arc::new(Mutex::new(t)));
    }

    let cmdline = boot::compose_cmdline(cfg.cmdline.as_deref(), &virtio_cmdline)?;
    let entry = boot::load(
        &mem,
        &BootSpec {
            kernel: &cfg.kernel,
            info: &info,
            initrd: cfg.initrd.as_deref(),
            cmdline: &cmdline,
            mem_mib: cfg.mem_mib,
            vcpus: cfg.vcpus,
        },
    )?;
    metrics.kernel_loaded.mark(metrics.start);

    let serial_irq = IrqLine::new().map_err(io_err("eventfd"))?;
    vm.register_irqfd(serial_irq.eventfd(), COM1_IRQ)
        .map_err(|e| VstateError::RegisterEventFd("irqfd", e))?;
    let out = SerialOut::new(open_serial_out(&cfg.serial_out)?, metrics.clone());
    let bus = Arc::new(DeviceBus {
        serial: Mutex::new(new_serial(serial_irq, out)),
        i8042: I8042::new(exit.clone(), metrics.clone()),
        exit_port: ExitPort::new(exit.clone()),
        boot_timer: BootTimer::new(metrics.clone(), cfg.quiet),
        virtio: vsock_transport
            .iter()
            .map(|t| (VIRTIO_MMIO_BASE, t.clone()))
            .collect(),
        metrics: metrics.clone(),
    });

    let cpuid = vstate::supported_cpuid(&kvm)?;
    let features = vstate::KvmCpuFeatures::query(&kvm);
    let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
    for id in 0..cfg.vcpus {
        vcpus.push(vstate::create_vcpu(
            &vm, &cpuid, features, id, cfg.vcpus, &entry,
        )?);
    }

    // Event loop registrations, before the guest runs.
    let ep = Epoll::new().map_err(io_err("epoll_create"))?;
    epoll_add(&ep, exit.eventfd().as_raw_fd(), TOK_EXIT)?;
    epoll_add(&ep, sigfd.as_raw_fd(), TOK_SIGNAL)?;
    let mut serial_listener: Option<(UnixListener, PathBuf)> = None;
    let mut serial_conn: Option<UnixStream> = None;
    match &cfg.serial_in {
        SerialInput::None => {}
        SerialInput::Stdin => epoll_add(&ep, libc::STDIN_FILENO, TOK_STDIN)?,
        SerialInput::Unix(p) => {
            let _ = std::fs::remove_file(p);
            let l = UnixListener::bind(p).map_err(io_err(format!(
                "cannot listen on serial socket {}",
                p.display()
            )))?;
            l.set_nonblocking(true).map_err(io_err("set_nonblocking"))?;
            epoll_add(&ep, l.as_raw_fd(), TOK_SERIAL_LISTENER)?;
            serial_listener = Some((l, p.clone()));
        }
    }
    let mut control_listener: Option<(UnixListener, PathBuf)> = None;
    let mut control_conn: Option<(UnixStream, Vec<u8>)> = None;
    if let Some(p) = &cfg.control {
        let _ = std::fs::remove_file(p);
        let l = UnixListener::bind(p).map_err(io_err(format!(
            "cannot listen on control socket {}",
            p.display()
        )))?;
        l.set_nonblocking(true).map_err(io_err("set_nonblocking"))?;
        epoll_add(&ep, l.as_raw_fd(), TOK_CONTROL_LISTENER)?;
        control_listener = Some((l, p.clone()));
    }
    if let Some(t) = &vsock_transport {
        let g = t.lock().unwrap_or_else(|e| e.into_inner());
        for (i, evt) in g.queue_evts().iter().enumerate() {
            epoll_add(&ep, evt.as_raw_fd(), TOK_VSOCK_QUEUE + i as u64)?;
        }
        epoll_add(&ep, g.device().backend_fd(), TOK_VSOCK_BACKEND)?;
    }

    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut threads = Vec::new();
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let (bus, m, e) = (bus.clone(), metrics.clone(), exit.clone());
        let done = DoneOnDrop(done_tx.clone(), id);
        let spawned = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let _done = done;
                vstate::run_vcpu(vcpu, id as u8, bus, m, e)
            });
        match spawned {
            Ok(h) => threads.push(h),
            Err(err) => {
                exit.request("vmm-error", 1);
                stop_vcpus_or_keep_memory(threads, &done_rx, &mem);
                return Err(io_err("cannot spawn vCPU thread")(err));
            }
        }
    }
    drop(done_tx);

    let mut events = vec![EpollEvent::default(); 32];
    let reason = loop {
        let n = match ep.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                exit.request("vmm-error", 1);
                stop_vcpus_or_keep_memory(threads, &done_rx, &mem);
                return Err(io_err("epoll_wait")(e));
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOK_EXIT => {
                    let _ = exit.eventfd().read();
                }
                TOK_SIGNAL => handle_signals(&sigfd, cfg, &metrics, &exit),
                TOK_STDIN if !feed_serial(&bus, libc::STDIN_FILENO, &metrics) => {
                    let _ = ep.ctl(
                        ControlOperation::Delete,
                        libc::STDIN_FILENO,
                        EpollEvent::default(),
                    );
                }
                TOK_SERIAL_LISTENER => {
                    if let Some((l, _)) = &serial_listener {
                        if let Ok((s, _)) = l.accept() {
                            if let Some(old) = serial_conn.take() {
                                let _ = ep.ctl(
                                    ControlOperation::Delete,
                                    old.as_raw_fd(),
                                    EpollEvent::default(),
                                );
                            }
                            if epoll_add(&ep, s.as_raw_fd(), TOK_SERIAL_CONN).is_ok() {
                                serial_conn = Some(s);
                            }
                        }
                    }
                }
                TOK_SERIAL_CONN => {
                    if let Some(s) = &serial_conn {
                        if !feed_serial(&bus, s.as_raw_fd(), &metrics) {
                            let _ = ep.ctl(
                                ControlOperation::Delete,
                                s.as_raw_fd(),
                                EpollEvent::default(),
                            );
                            serial_conn = None;
                        }
                    }
                }
                TOK_CONTROL_LISTENER => {
                    if let Some((l, _)) = &control_listener {
                        if let Ok((c, _)) = l.accept() {
                            // One client at a time: a new one replaces the old.
                            if let Some((old, _)) = control_conn.take() {
                                let _ = ep.ctl(
                                    ControlOperation::Delete,
                                    old.as_raw_fd(),
                                    EpollEvent::default(),
                                );
                            }
                            if c.set_nonblocking(true).is_ok()
                                && epoll_add(&ep, c.as_raw_fd(), TOK_CONTROL_CONN).is_ok()
                            {
                                control_conn = Some((c, Vec::new()));
                            }
                        }
                    }
                }
                TOK_CONTROL_CONN => {
                    let done = match control_conn.as_mut() {
                        Some((c, buf)) => control_request(c, buf, &metrics, &exit),
                        None => false,
                    };
                    if done {
                        if let Some((c, _)) = control_conn.take() {
                            let _ = ep.ctl(
                                ControlOperation::Delete,
                                c.as_raw_fd(),
                                EpollEvent::default(),
                            );
                        }
                    }
                }
                TOK_VSOCK_BACKEND => {
                    if let Some(t) = &vsock_transport {
                        let mut g = t.lock().unwrap_or_else(|e| e.into_inner());
                        g.device_mut().process_backend_event();
                        g.signal_used_if_needed();
                    }
                }
                tok if tok >= TOK_VSOCK_QUEUE => {
                    if let Some(t) = &vsock_transport {
                        let mut g = t.lock().unwrap_or_else(|e| e.into_inner());
                        let q = (tok - TOK_VSOCK_QUEUE) as usize;
                        if let Some(evt) = g.queue_evts().get(q) {
                            let _ = evt.read();
                        }
                        g.device_mut().process_queue_event(q);
                        g.signal_used_if_needed();
                    }
                }
                _ => {}
            }
        }
        if let Some(r) = exit.reason() {
            break r;
        }
    };

    // Teardown: stop the vCPUs, flush output, remove our sockets, write metrics.
    stop_vcpus_or_keep_memory(threads, &done_rx, &mem);
    {
        let mut s = bus.serial.lock().unwrap_or_else(|e| e.into_inner());
        let _ = s.writer_mut().flush();
    }
    if let Some((_, p)) = &serial_listener {
        let _ = std::fs::remove_file(p);
    }
    if let Some((_, p)) = &control_listener {
        let _ = std::fs::remove_file(p);
    }
    if let Some(v) = &cfg.vsock {
        let _ = std::fs::remove_file(&v.uds);
    }
    if let Some(p) = &cfg.metrics {
        let mut doc = metrics.to_json(Some((&reason.reason, reason.code)));
        doc["memory"] = memory_report(&mem);
        if let Err(e) = write_metrics(p, &doc) {
            eprintln!("vmm-lite: cannot write metrics to {}: {e}", p.display());
        }
    }
    if !cfg.sync_teardown {
        detach_teardown(vm.as_raw_fd());
    }
    // The VM fd is closed by the process exit (or last by the helper): closing it here
    // would put the slow KVM teardown on the exit path.
    std::mem::forget(vm);
    Ok(reason)
}

/// How long [`run`] waits for the vCPU threads to leave KVM_RUN once the VM stopped.
///
/// Normally they are out in well under a millisecond. Waiting longer costs nothing at
/// exit: the process cannot end before its vCPU threads have left KVM_RUN anyway (the
/// kernel kills and waits for every thread), so the bound only decides how late the metrics
/// are written when the host stalls a vCPU thread (seen here under heavy load: 0.5-1.2 s).
pub const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a vCPU that has not returned yet is kicked again while [`run`] waits.
const KICK_INTERVAL: Duration = Duration::from_millis(10);

/// Reports a vCPU thread's id when the thread ends (normally or by a panic).
struct DoneOnDrop(Sender<usize>, usize);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(self.1);
    }
}

/// Kicks every vCPU thread out of KVM_RUN and joins them; `done` receives a thread's index
/// when it ends. The stop latch must already be set, so a kicked vCPU does not re-enter.
/// Waits at most `timeout` and returns the indexes of the threads still running.
pub fn stop_vcpus(
    threads: Vec<JoinHandle<()>>,
    done: &Receiver<usize>,
    timeout: Duration,
) -> Vec<usize> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut running: Vec<Option<JoinHandle<()>>> = threads.into_iter().map(Some).collect();
    let mut left = running.len();
    let mut next_kick = start;
    while left > 0 {
        let now = Instant::now();
        if now >= next_kick {
            running.iter().flatten().for_each(signals::kick);
            next_kick = now + KICK_INTERVAL;
        }
        if now >= deadline {
            break;
        }
        match done.recv_timeout(next_kick.min(deadline) - now) {
            Ok(i) => {
                if let Some(h) = running.get_mut(i).and_then(Option::take) {
                    let _ = h.join();
                    left -= 1;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            // Every thread has dropped its sender: all have ended.
            Err(RecvTimeoutError::Disconnected) => {
                for h in running.iter_mut().filter_map(Option::take) {
                    let _ = h.join();
                }
                left = 0;
            }
        }
    }
    running
        .iter()
        .enumerate()
        .filter_map(|(i, h)| h.as_ref().map(|_| i))
        .collect()
}

/// [`stop_vcpus`] with [`VCPU_STOP_TIMEOUT`]; if a vCPU is still running, guest memory is
/// leaked (stays mapped until the process exits) rather than unmapped under it.
fn stop_vcpus_or_keep_memory(threads: Vec<JoinHandle<()>>, done: &Receiver<usize>, mem: &GuestMem) {
    let stuck = stop_vcpus(threads, done, VCPU_STOP_TIMEOUT);
    if !stuck.is_empty() {
        eprintln!(
            "vmm-lite: vCPU {stuck:?} did not leave KVM_RUN within {} ms; guest memory stays mapped until exit",
            VCPU_STOP_TIMEOUT.as_millis()
        );
        std::mem::forget(mem.clone());
    }
}

/// Hands the VM's destruction to a detached helper so this process can exit at once.
///
/// Under PVM, destroying a VM (the last close of its fd) takes 15-25 ms, mostly waiting in
/// the kernel. We fork a helper that keeps a reference to the VM fd and waits for this
/// process to exit (its end of a pipe closes), then exits itself, so the kernel's teardown
/// happens off the caller's critical path. The helper closes every other descriptor, so
/// host sockets and pipes see EOF when this process exits. Errors are ignored: without the
/// helper the teardown simply happens synchronously at exit.
pub fn detach_teardown(vm_fd: RawFd) {
    let mut p = [0 as libc::c_int; 2];
    // SAFETY: `p` is a valid two-element array for pipe2 to fill.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    // SAFETY: after fork the child only calls async-signal-safe functions (dup2, close_range,
    // read, _exit) on descriptors it owns, and never returns into Rust code.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: see above; fds 0 and 1 are reused for the VM fd and the pipe's read end.
        unsafe {
            libc::close(p[1]);
            libc::dup2(vm_fd, 0);
            libc::dup2(p[0], 1);
            if libc::syscall(libc::SYS_close_range, 2u32, u32::MAX, 0u32) != 0 {
                // Kernels before 5.9: close what a VMM plausibly has open.
                for fd in 2..4096 {
                    libc::close(fd);
                }
            }
            let mut b = 0u8;
            while libc::read(1, (&mut b as *mut u8).cast(), 1) != 0 {}
            libc::_exit(0);
        }
    }
    // Parent: keep the write end open until exit; close the read end.
    // SAFETY: p[0] is our descriptor and is not used again.
    unsafe { libc::close(p[0]) };
}

/// Process RSS, peak RSS, guest pages resident, and the difference (the VMM's overhead).
pub fn memory_report(mem: &GuestMem) -> serde_json::Value {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let page = 4096usize;
    let mut guest_resident = 0u64;
    for r in mem.iter() {
        let Ok(host) = mem.get_host_address(r.start_addr()) else {
            continue;
        };
        let len = r.len() as usize;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: `host` is the page-aligned start of a live mapping of `len` bytes owned by
        // `mem`; mincore only writes one byte per page into `vec`, which has that many.
        let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
        if rc == 0 {
            guest_resident += vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * page as u64;
        }
    }
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|p| p * page as u64)
        .unwrap_or(0);
    let anon = std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Anonymous:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                })
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    // SAFETY: rusage is plain data, getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    serde_json::json!({
        "rss_bytes": rss,
        "peak_rss_bytes": ru.ru_maxrss as u64 * 1024,
        "guest_resident_bytes": guest_resident,
        "overhead_bytes": rss.saturating_sub(guest_resident),
        "anon_bytes": anon,
        "anon_overhead_bytes": anon.saturating_sub(guest_resident),
    })
}

/// Longest control request line.
const MAX_CONTROL_LINE: usize = 64;

/// Serves one control request on a non-blocking stream: `metrics` answers the live metrics
/// JSON on one line, `stop` stops the VM (exit code 0, reason `control-stop`). Returns true
/// when the connection is finished.
fn control_request(
    c: &mut UnixStream,
    buf: &mut Vec<u8>,
    metrics: &Metrics,
    exit: &ExitHandle,
) -> bool {
    use std::io::Read;
    let mut chunk = [0u8; MAX_CONTROL_LINE];
    match c.read(&mut chunk) {
        Ok(0) => return true,
        Ok(n) => buf.extend_from_slice(&chunk[..n]),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
        Err(_) => return true,
    }
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return buf.len() > MAX_CONTROL_LINE;
    };
    let reply = match String::from_utf8_lossy(&buf[..nl]).trim() {
        "metrics" => format!("{}\n", metrics.to_json(None)),
        "stop" => {
            exit.request("control-stop", 0);
            "ok\n".to_string()
        }
        other => format!("error: unknown command {other:?} (metrics, stop)\n"),
    };
    // The reply is small; give a slow reader 100 ms, never block the loop longer.
    let _ = c.set_nonblocking(false);
    let _ = c.set_write_timeout(Some(std::time::Duration::from_millis(100)));
    let _ = c.write_all(reply.as_bytes());
    true
}

/// Reads available input from `fd` into the UART FIFO. Returns false on EOF/error.
fn feed_serial(bus: &DeviceBus, fd: RawFd, metrics: &Metrics) -> bool {
    let mut s = bus.serial.lock().unwrap_or_else(|e| e.into_inner());
    let room = s.fifo_capacity();
    if room == 0 {
        // Guest is not draining; drop this chunk rather than block the loop.
        let mut sink = [0u8; 64];
        // SAFETY: `sink` is a valid writable buffer of the given length.
        let n = unsafe { libc::read(fd, sink.as_mut_ptr().cast(), sink.len()) };
        return n > 0;
    }
    let mut buf = vec![0u8; room.min(64)];
    // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return false;
    }
    metrics.serial_rx_bytes.add(n as u64);
    let _ = s.enqueue_raw_bytes(&buf[..n as usize]);
    true
}

fn handle_signals(sigfd: &File, cfg: &VmConfig, metrics: &Metrics, exit: &ExitHandle) {
    let mut info = [0u8; 128];
    loop {
        // SAFETY: reading a signalfd_siginfo (128 bytes) into a buffer of that size.
        let n = unsafe { libc::read(sigfd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
        if n != info.len() as isize {
            return;
        }
        let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as i32;
        if signo == libc::SIGUSR1 {
            let doc = metrics.to_json(None);
            match &cfg.metrics {
                Some(p) => {
                    if let Err(e) = write_metrics(p, &doc) {
                        eprintln!("vmm-lite: cannot write metrics to {}: {e}", p.display());
                    }
                }
                None => eprintln!("{doc}"),
            }
        } else {
            exit.request("signal", 128 + signo);
        }
    }
}
