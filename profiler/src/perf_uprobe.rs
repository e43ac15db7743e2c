//! A uprobe with a reference counter (a USDT probe's semaphore), attached
//! through the kernel's perf uprobe PMU, and a BPF link to it with a
//! cookie. Kernel-facing, two system calls; used by [`crate::probes`].
//!
//! Why by hand: aya 0.16 passes no `ref_ctr_offset`. The PMU takes it in
//! `config` bits 32-63 (`/sys/bus/event_source/devices/uprobe/format/
//! ref_ctr_offset`, Linux 4.20+): while the uprobe is registered, the
//! kernel itself raises the 16-bit semaphore at that file offset in every
//! process of the event's scope that maps the file, and lowers it when the
//! uprobe goes, so the runtime fires the probe only while we listen. Nothing
//! writes the target's memory from here (`/proc/PID/mem` is never opened).
//! `uprobe_multi` takes reference counters too, but only from 6.6; this
//! works from 6.1 on, with a link per probe site (one or two per runtime).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    os::unix::ffi::OsStrExt as _,
    path::Path,
};

/// `struct perf_event_attr` up to `config2` and the fields after it that
/// `PERF_ATTR_SIZE_VER7` (128 bytes) covers; all zero but what is set.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved_2: u16,
    aux_sample_size: u32,
    reserved_3: u32,
    sig_data: u64,
}

const PERF_SAMPLE_RAW: u64 = 1 << 10;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PERF_EVENT: u32 = 41;

/// The perf uprobe PMU's type number.
fn uprobe_pmu() -> io::Result<u32> {
    let text = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")?;
    text.trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "uprobe PMU type"))
}

/// Attaches program `program` (a uprobe program) at file offset `offset`
/// of `file`, in process `pid` only, with the reference counter at
/// `ref_ctr_offset` (0: none), the attach cookie `cookie`. Returns the
/// link: closing it detaches (and lowers the semaphore).
pub fn attach(
    program: BorrowedFd<'_>,
    file: &Path,
    offset: u64,
    ref_ctr_offset: u64,
    pid: u32,
    cookie: u64,
) -> io::Result<OwnedFd> {
    let path = CString::new(file.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL"))?;
    let attr = PerfEventAttr {
        kind: uprobe_pmu()?,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        config: ref_ctr_offset << 32,
        sample_period: 1,
        sample_type: PERF_SAMPLE_RAW,
        wakeup_events: 1,
        config1: path.as_ptr() as u64,
        config2: offset,
        ..PerfEventAttr::default()
    };
    // SAFETY: `attr` is a valid perf_event_attr of the size it declares and
    // `path` outlives the call; the kernel copies both.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            pid as libc::pid_t,
            -1 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just gave us, owned by no one else.
    let event = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // `union bpf_attr` for BPF_LINK_CREATE: prog_fd, target_fd,
    // attach_type, flags, then perf_event.bpf_cookie at byte 16; the rest
    // zero.
    let mut bpf_attr = [0u8; 64];
    bpf_attr[0..4].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
    bpf_attr[4..8].copy_from_slice(&(event.as_raw_fd() as u32).to_ne_bytes());
    bpf_attr[8..12].copy_from_slice(&BPF_PERF_EVENT.to_ne_bytes());
    bpf_attr[16..24].copy_from_slice(&cookie.to_ne_bytes());
    // SAFETY: a zeroed bpf_attr of the size passed, with the fields above.
    let link = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            bpf_attr.as_ptr(),
            bpf_attr.len() as u32,
        )
    };
    if link < 0 {
        return Err(io::Error::last_os_error());
    }
    // The link holds the event; our descriptor of it can go.
    drop(event);
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(link as i32) })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_attr_is_the_size_the_kernel_knows_as_version_7() {
        assert_eq!(std::mem::size_of::<super::PerfEventAttr>(), 128);
    }
}
