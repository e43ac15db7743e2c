//! Custody of the probe links in a second process, so that a SIGKILL of
//! cacheloop during a detach does not strand a breakpoint in a target.
//!
//! Why: the kernel takes a uprobe's breakpoints out in the task that drops
//! the link's last reference, as it returns from `close` (task work), and
//! writes the target's memory through get_user_pages, which gives up while
//! a fatal signal is pending. A SIGKILL landing during a detach (a probe
//! window closing, a process forgotten, the final detach) then leaves the
//! uprobe registered with nothing on it and its int3 in the target, which
//! traps on every call for the rest of its life. Seen on 6.1: 2 kills in 3
//! at 3.1 s into a 0.2% overhead budget.
//!
//! How: `cacheloop __custody` (internal, started here with one end of a
//! SOCK_SEQPACKET socket pair as its stdin) holds a duplicate of every
//! link's descriptor. cacheloop's own `close` is then never the last
//! reference; the helper drops it when told, outside the process a user
//! kills. If cacheloop dies, the helper reads end of file and exits, and
//! the kernel closes what it held as it exits, with no signal pending. The
//! helper ignores every signal that would end it but SIGKILL (a terminal's
//! Ctrl-C reaches the whole process group; cacheloop detaches and then
//! closes the socket).
//!
//! What it does not cover: a SIGKILL that reaches the helper too while it
//! closes (a cgroup-wide kill), and one landing while the kernel creates a
//! link (in `bpf_link_create` or `perf_event_open`, whose own rollback then
//! fails the same way): links are created here, in cacheloop. Creating
//! them in the helper would close that too.
//!
//! Messages (one per packet, little-endian):
//! - `K` with up to [`MAX_FDS`] descriptors attached: keep them; the reply
//!   is one u32 per descriptor, the helper's number for it;
//! - `R` then u32s: release (close) these; the reply is `D` once closed,
//!   breakpoints out. The helper answers in order, so a release need not
//!   be waited for at once (a probe window closing: the kernel's close
//!   waits for an RCU grace period, ~40 ms here, seconds on a loaded
//!   machine); its reply is read before the next message's.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, IntoRawFd as _, OwnedFd, RawFd},
    os::unix::process::CommandExt as _,
    process::{Child, Command, Stdio},
};

/// Descriptors per `K` message (the kernel's SCM_MAX_FD is 253).
const MAX_FDS: usize = 250;
/// Ids per `R` message: 16 KiB packets, well inside the helper's buffer
/// and a socket's default send size.
const MAX_IDS: usize = 4096;
/// How long a reply (or a send) may take before the helper is looked at:
/// stopped, it is given up on.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a helper still running may take to close what it was asked
/// to: each close of a perf-event link waits for an RCU grace period
/// (kernels without uprobe_multi), so thousands of them on a loaded
/// machine take minutes. Past this, it is given up on all the same.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);
/// The hidden subcommand that runs the helper.
pub const SUBCOMMAND: &str = "__custody";

/// The helper process and our end of its socket.
pub struct Custody {
    sock: Option<OwnedFd>,
    child: Option<Child>,
    /// Replies to releases sent and not yet read.
    owed: usize,
}

impl Custody {
    /// Starts the helper: this very binary, through /proc/self/exe (still
    /// the running build if the file was replaced since).
    pub fn start() -> io::Result<Self> {
        let (ours, theirs) = seqpacket_pair()?;
        // A helper stopped (SIGSTOP, a debugger) must not hang the control
        // thread: past this, custody is given up (see `Probes`). Closing
        // thousands of links takes seconds under emulation, not minutes.
        let timeout = libc::timeval {
            tv_sec: REPLY_TIMEOUT.as_secs() as _,
            tv_usec: 0,
        };
        // Sends too: releases not waited for fill the socket's buffer
        // when the helper reads none.
        for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            // SAFETY: setsockopt reads a timeval of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    ours.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&raw const timeout).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // No stdout or stderr of ours: a pipe reading cacheloop's output
        // must see its end when cacheloop ends, not when the helper does.
        let child = Command::new("/proc/self/exe")
            .arg0("cacheloop")
            .arg(SUBCOMMAND)
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Self {
            sock: Some(ours),
            child: Some(child),
            owed: 0,
        })
    }

    fn sock(&self) -> io::Result<RawFd> {
        self.sock
            .as_ref()
            .map(|s| s.as_raw_fd())
            .ok_or_else(|| io::Error::other("the custody helper is gone"))
    }

    /// Hands the helper a duplicate of each descriptor; returns its numbers
    /// for them, in order.
    pub fn keep(&mut self, fds: &[BorrowedFd<'_>]) -> io::Result<Vec<u32>> {
        self.settle()?;
        let mut ids = Vec::with_capacity(fds.len());
        for chunk in fds.chunks(MAX_FDS) {
            let raw: Vec<RawFd> = chunk.iter().map(|fd| fd.as_raw_fd()).collect();
            send(self.sock()?, b"K", &raw)?;
            let mut reply = vec![0u8; 4 * chunk.len()];
            let (n, _) = self.reply(&mut reply)?;
            if n != reply.len() {
                return Err(io::Error::other("the custody helper answered short"));
            }
            ids.extend(
                reply
                    .as_chunks::<4>()
                    .0
                    .iter()
                    .map(|b| u32::from_le_bytes(*b)),
            );
        }
        Ok(ids)
    }

    /// Has the helper close what it keeps under `ids`, and waits until it
    /// has: then, if those were a link's last references, its breakpoints
    /// are out.
    pub fn release(&mut self, ids: &[u32]) -> io::Result<()> {
        self.release_later(ids)?;
        self.settle()
    }

    /// Has the helper close what it keeps under `ids`, without waiting:
    /// the breakpoints come out in the helper's time, and the next
    /// [`Custody::keep`] or [`Custody::release`] reads its confirmation
    /// first.
    pub fn release_later(&mut self, ids: &[u32]) -> io::Result<()> {
        for chunk in ids.chunks(MAX_IDS) {
            let mut msg = Vec::with_capacity(1 + 4 * chunk.len());
            msg.push(b'R');
            for id in chunk {
                msg.extend_from_slice(&id.to_le_bytes());
            }
            send(self.sock()?, &msg, &[])?;
            self.owed += 1;
        }
        Ok(())
    }

    /// Reads the confirmations of every release sent so far.
    pub fn settle(&mut self) -> io::Result<()> {
        while self.owed > 0 {
            let mut reply = [0u8; 1];
            match self.reply(&mut reply)? {
                (1, _) if reply == *b"D" => self.owed -= 1,
                _ => return Err(io::Error::other("the custody helper did not confirm")),
            }
        }
        Ok(())
    }

    /// Reads the helper's next reply. A helper that has not answered
    /// within [`REPLY_TIMEOUT`] but is running (closing links one grace
    /// period at a time) is waited for, up to [`CLOSE_TIMEOUT`]: given up
    /// on, it would still hold the old links as the next window's go in,
    /// and both would count.
    fn reply(&mut self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        let started = std::time::Instant::now();
        loop {
            match recv(self.sock()?, buf, &mut Vec::new()) {
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        && started.elapsed() < CLOSE_TIMEOUT
                        && self.helper_busy() =>
                {
                    log::warn!(
                        "the custody helper has been closing probe links for {:.0?}; waiting",
                        started.elapsed()
                    );
                }
                other => return other,
            }
        }
    }

    /// The helper runs (or waits in the kernel), neither stopped nor gone.
    fn helper_busy(&self) -> bool {
        self.child
            .as_ref()
            .and_then(|c| process_state(c.id()))
            .is_some_and(|s| matches!(s, 'R' | 'S' | 'D'))
    }

    /// Gives the helper up after it failed to answer. A stopped helper
    /// (SIGSTOP) is in no close: killing it now makes its exit close what
    /// it holds, breakpoints out. A running one is left to finish and exit
    /// at end of file; so is one stopped by a tracer ('t': it may be
    /// stopped inside a close, which a kill would cut short, leaving a
    /// breakpoint in).
    pub fn abandon(mut self) {
        if let Some(child) = &mut self.child
            && process_state(child.id()) == Some('T')
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The state letter of /proc/PID/stat (R, S, D, T, t, Z...).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

impl Drop for Custody {
    fn drop(&mut self) {
        // End of file: the helper closes whatever it still holds as it
        // exits. Wait for it, so that it is gone when we are.
        drop(self.sock.take());
        let Some(child) = &mut self.child else {
            return;
        };
        let deadline = std::time::Instant::now() + CLOSE_TIMEOUT;
        while std::time::Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            // Stopped (SIGSTOP): it closes nothing until it runs again;
            // killed, its exit closes what it holds (see `abandon`).
            if process_state(child.id()) == Some('T') {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // It exits once it runs again, on end of file.
        log::warn!("the custody helper (pid {}) has not exited", child.id());
    }
}

/// `cacheloop __custody`: the helper, on the socket at its stdin. Returns
/// (to exit) at end of file or on any error; exiting closes what it holds.
pub fn serve() {
    // Every signal that would end the helper by default is ignored: the
    // kernel turns a fatal signal into a pending SIGKILL for the whole
    // process, which is what makes a close give up on its breakpoints.
    // Faults (SEGV, BUS, ILL, FPE, ABRT, TRAP, SYS) keep their action.
    for signal in [
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGPIPE,
        libc::SIGALRM,
        libc::SIGTERM,
        libc::SIGSTKFLT,
        libc::SIGXCPU,
        libc::SIGXFSZ,
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGIO,
        libc::SIGPWR,
    ] {
        // SAFETY: ignoring a signal has no preconditions.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
    // `ps`, `top` and `pgrep` show the command name, which an exec of
    // /proc/self/exe makes "exe".
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of up to 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"cacheloop-links".as_ptr()) };
    serve_on(libc::STDIN_FILENO);
}

fn serve_on(sock: RawFd) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut fds = Vec::new();
    // What this helper holds: only these are ever closed on request.
    let mut kept = std::collections::HashSet::new();
    loop {
        fds.clear();
        let Ok((n, truncated)) = recv(sock, &mut buf, &mut fds) else {
            return;
        };
        if n == 0 || truncated {
            return;
        }
        let ok = match buf[0] {
            b'K' => {
                let mut reply = Vec::with_capacity(4 * fds.len());
                for fd in fds.drain(..) {
                    // Kept: ours until released, or until we exit.
                    let fd = fd.into_raw_fd();
                    kept.insert(fd);
                    reply.extend_from_slice(&(fd as u32).to_le_bytes());
                }
                send(sock, &reply, &[]).is_ok()
            }
            b'R' => {
                for id in buf[1..n].as_chunks::<4>().0 {
                    let fd = u32::from_le_bytes(*id) as RawFd;
                    // Only what it was given, whatever the message says.
                    if kept.remove(&fd) {
                        // SAFETY: a descriptor this loop kept and still
                        // owns (just taken out of `kept`), closed once.
                        drop(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
                send(sock, b"D", &[]).is_ok()
            }
            _ => false,
        };
        if !ok {
            return;
        }
    }
}

fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two descriptors into the array on success.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A zeroed control-message buffer of at least `bytes`, aligned for
/// `cmsghdr` (whose length field is a size_t): u64 words, not bytes.
fn control_buffer(bytes: usize) -> Vec<u64> {
    vec![0u64; bytes.div_ceil(8)]
}

/// Sends one packet with `fds` attached.
fn send(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = if fds.is_empty() {
        0
    } else {
        unsafe { libc::CMSG_SPACE(fd_bytes) as usize }
    };
    let mut control = control_buffer(space);
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives
    // the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds one header with room for the
        // descriptors (CMSG_SPACE above).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes as usize,
            );
        }
    }
    loop {
        // SAFETY: msg points at live buffers (above).
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Receives one packet into `buf` and the descriptors attached to it into
/// `fds`; returns its length and whether it (or its descriptors) was cut.
fn recv(sock: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<(usize, bool)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) };
    let mut control = control_buffer(space as usize);
    // SAFETY: as in `send`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: msg points at live buffers; received descriptors get
        // close-on-exec.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    // SAFETY: walking the control messages the kernel wrote, within
    // msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let cut = msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0;
    Ok((n, cut))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut p = [0; 2];
        // SAFETY: pipe2 writes two descriptors on success.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors we own.
        unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
    }

    /// Whether the pipe's reader would see end of file (no writer left).
    fn writers_gone(reader: &OwnedFd) -> bool {
        let mut poll = libc::pollfd {
            fd: reader.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, no wait.
        unsafe { libc::poll(&mut poll, 1, 0) };
        poll.revents & libc::POLLHUP != 0
    }

    /// A client, and the helper's loop on a thread of this process.
    fn in_thread() -> (Custody, std::thread::JoinHandle<()>) {
        let (ours, theirs) = seqpacket_pair().unwrap();
        let helper = std::thread::spawn(move || serve_on(theirs.as_raw_fd()));
        let custody = Custody {
            sock: Some(ours),
            child: None,
            owed: 0,
        };
        (custody, helper)
    }

    #[test]
    fn a_kept_descriptor_outlives_ours_until_released() {
        let (mut custody, helper) = in_thread();
        let (reader, writer) = pipe();
        let ids = custody.keep(&[writer.as_fd()]).unwrap();
        assert_eq!(ids.len(), 1);
        drop(writer);
        assert!(!writers_gone(&reader), "the helper holds the write end");
        custody.release(&ids).unwrap();
        assert!(writers_gone(&reader), "released: closed before the reply");
        drop(custody);
        helper.join().unwrap();
    }

    #[test]
    fn a_release_not_waited_for_is_confirmed_before_the_next_keep() {
        let (mut custody, helper) = in_thread();
        let (reader, writer) = pipe();
        let (other_reader, other_writer) = pipe();
        let ids = custody.keep(&[writer.as_fd()]).unwrap();
        drop(writer);
        // Two packets' worth: two confirmations owed.
        let mut many: Vec<u32> = (10_000..10_000 + MAX_IDS as u32)
            .filter(|n| *n != ids[0])
            .collect();
        many.push(ids[0]);
        custody.release_later(&many).unwrap();
        assert_eq!(custody.owed, 2);
        // The next keep reads them first, then its own reply.
        let other = custody.keep(&[other_writer.as_fd()]).unwrap();
        assert_eq!(custody.owed, 0);
        assert!(writers_gone(&reader), "released before the keep's reply");
        drop(other_writer);
        assert!(!writers_gone(&other_reader));
        custody.release(&other).unwrap();
        assert!(writers_gone(&other_reader));
        drop(custody);
        helper.join().unwrap();
    }

    #[test]
    fn a_release_of_more_ids_than_a_packet_holds_goes_in_chunks() {
        let (mut custody, helper) = in_thread();
        let (reader, writer) = pipe();
        let mut ids = custody.keep(&[writer.as_fd()]).unwrap();
        drop(writer);
        // 20,000 numbers it never gave (left alone: they are not its to
        // close, and here they are this test process's), then the real one.
        let real = ids[0];
        ids.splice(0..0, (10_000..30_000).filter(|&n| n != real));
        custody.release(&ids).unwrap();
        assert!(writers_gone(&reader), "the kept one was closed");
        drop(custody);
        helper.join().unwrap();
    }

    #[test]
    fn many_descriptors_go_in_chunks_and_come_back_numbered() {
        let (mut custody, helper) = in_thread();
        let pipes: Vec<(OwnedFd, OwnedFd)> = (0..MAX_FDS + 10).map(|_| pipe()).collect();
        let fds: Vec<BorrowedFd<'_>> = pipes.iter().map(|(_, w)| w.as_fd()).collect();
        let ids = custody.keep(&fds).unwrap();
        assert_eq!(ids.len(), fds.len());
        custody.release(&ids).unwrap();
        drop(custody);
        helper.join().unwrap();
    }
}
