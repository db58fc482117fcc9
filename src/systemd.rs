//! systemd integration: socket activation (the `sd_listen_fds` protocol) and readiness
//! notification (the `sd_notify` protocol), implemented on std and `nix` without linking
//! libsystemd.
//!
//! This module only interprets what the service manager hands over: it must not bind sockets,
//! read secrets, or change the process environment (removing `LISTEN_*` would need `unsafe`, and
//! the daemon spawns no children that could inherit them). Deciding what to do with the
//! listeners, and logging notification failures, is the daemon's job.

use std::ffi::OsStr;
use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};

use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockType, SockaddrLike, SockaddrStorage, UnixAddr,
    getsockname, getsockopt, sendmsg, sockopt,
};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

/// First descriptor number the service manager passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// `LISTEN_FDNAMES` entry (`FileDescriptorName=`) that marks the data socket.
pub const DATA_NAME: &str = "data";

/// `LISTEN_FDNAMES` entry (`FileDescriptorName=`) that marks the admin socket.
pub const ADMIN_NAME: &str = "admin";

/// Errors from reading the activation environment or talking to the notify socket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SystemdError {
    /// `LISTEN_PID` is set but is not a process id.
    #[error(
        "LISTEN_PID={value:?} is not a process id; unset LISTEN_PID/LISTEN_FDS or start keyward \
         through systemd socket activation"
    )]
    BadListenPid {
        /// The offending value.
        value: String,
    },
    /// `LISTEN_FDS` is set for this process but is not a descriptor count.
    #[error(
        "LISTEN_FDS={value:?} is not a number of file descriptors; unset LISTEN_PID/LISTEN_FDS \
         or start keyward through systemd socket activation"
    )]
    BadListenFds {
        /// The offending value.
        value: String,
    },
    /// `LISTEN_FDNAMES` does not name exactly the passed descriptors.
    #[error(
        "LISTEN_FDNAMES has {names} name(s) but LISTEN_FDS passes {fds} descriptor(s); give every \
         socket unit a FileDescriptorName= (data or admin)"
    )]
    NameCountMismatch {
        /// Number of colon-separated names.
        names: usize,
        /// Value of `LISTEN_FDS`.
        fds: usize,
    },
    /// A passed socket carries a name keyward does not serve.
    #[error(
        "unknown socket name(s) {} in LISTEN_FDNAMES; keyward accepts only `data` and `admin`: set \
         FileDescriptorName=data on the data socket unit and FileDescriptorName=admin on the \
         admin socket unit",
        .names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
    )]
    UnknownNames {
        /// The names that were not `data` or `admin`.
        names: Vec<String>,
    },
    /// Two passed sockets claim the same role.
    #[error(
        "more than one passed socket is named {name:?}; give each socket unit its own \
         FileDescriptorName= (data or admin)"
    )]
    DuplicateName {
        /// The repeated name.
        name: &'static str,
    },
    /// More than two sockets were passed without names, so their roles are ambiguous.
    #[error(
        "{count} sockets were passed without LISTEN_FDNAMES; pass at most two (data first, then \
         admin) or name them with FileDescriptorName=data / FileDescriptorName=admin"
    )]
    TooManyUnnamed {
        /// Value of `LISTEN_FDS`.
        count: usize,
    },
    /// A passed descriptor could not be taken over (closed, or the kernel refused).
    #[error(
        "socket-activated {role} descriptor {fd} cannot be used: {source}; check that the \
         service is started by its socket unit and that LISTEN_FDS is accurate"
    )]
    Unusable {
        /// Role the descriptor was passed for.
        role: Role,
        /// Descriptor number.
        fd: RawFd,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// A passed descriptor is something other than a listening Unix stream socket.
    #[error(
        "socket-activated {role} descriptor {fd} is {found}, not a listening Unix stream socket; \
         use ListenStream=/path/to/socket (not ListenDatagram=, a TCP port or Accept=yes) in the \
         socket unit"
    )]
    NotUnixListener {
        /// Role the descriptor was passed for.
        role: Role,
        /// Descriptor number.
        fd: RawFd,
        /// What it turned out to be.
        found: String,
    },
    /// `NOTIFY_SOCKET` is neither an absolute path nor an `@abstract` name.
    #[error(
        "NOTIFY_SOCKET={value:?} is neither an absolute socket path nor an @abstract name; unset \
         it or let systemd set it (Type=notify)"
    )]
    BadNotifySocket {
        /// The offending value.
        value: String,
    },
    /// Sending the notification failed.
    #[error(
        "cannot send a readiness notification to {socket:?}: {source}; check that the service \
         manager is still listening there"
    )]
    Notify {
        /// The `NOTIFY_SOCKET` value used.
        socket: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

/// Which of keyward's two sockets a passed descriptor serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The data-plane socket (`keyward.sock`).
    Data,
    /// The admin socket (`admin.sock`).
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Data => DATA_NAME,
            Role::Admin => ADMIN_NAME,
        })
    }
}

/// Descriptor numbers by role, as announced by the environment (nothing checked yet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActivationPlan {
    /// Descriptor announced for the data socket.
    pub data: Option<RawFd>,
    /// Descriptor announced for the admin socket.
    pub admin: Option<RawFd>,
}

/// Listening sockets handed over by the service manager, by role.
#[derive(Debug, Default)]
pub struct ListenFds {
    /// The data socket, if it was socket-activated (non-blocking, close-on-exec).
    pub data: Option<UnixListener>,
    /// The admin socket, if it was socket-activated (non-blocking, close-on-exec).
    pub admin: Option<UnixListener>,
}

impl ListenFds {
    /// True when no socket was passed, i.e. the daemon must bind its own.
    pub fn is_empty(&self) -> bool {
        self.data.is_none() && self.admin.is_none()
    }
}

// === socket activation ===

/// Takes over the listening sockets passed by systemd (or `systemd-socket-activate`).
///
/// Returns an empty [`ListenFds`] when the process was not socket-activated, including when the
/// `LISTEN_*` variables were meant for another process (`LISTEN_PID` differs).
pub fn listen_fds() -> Result<ListenFds, SystemdError> {
    let var = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    let plan = parse_listen_env(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    )?;
    Ok(ListenFds {
        data: plan
            .data
            .map(|fd| take_listener(fd, Role::Data))
            .transpose()?,
        admin: plan
            .admin
            .map(|fd| take_listener(fd, Role::Admin))
            .transpose()?,
    })
}

/// Interprets the `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` values for process `our_pid`.
pub fn parse_listen_env(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
    our_pid: u32,
) -> Result<ActivationPlan, SystemdError> {
    let Some(pid) = listen_pid else {
        return Ok(ActivationPlan::default());
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| SystemdError::BadListenPid { value: pid.into() })?;
    if pid != our_pid {
        // Inherited from a parent that was activated itself: not ours to take.
        return Ok(ActivationPlan::default());
    }
    let Some(count) = listen_fds else {
        return Ok(ActivationPlan::default());
    };
    let count: usize = count
        .trim()
        .parse()
        .ok()
        .filter(|n| *n <= (RawFd::MAX - LISTEN_FDS_START) as usize)
        .ok_or_else(|| SystemdError::BadListenFds {
            value: count.into(),
        })?;
    if count == 0 {
        return Ok(ActivationPlan::default());
    }
    let fd_at = |i: usize| LISTEN_FDS_START + i as RawFd;

    let Some(names) = listen_fdnames else {
        return match count {
            1 => Ok(ActivationPlan {
                data: Some(fd_at(0)),
                admin: None,
            }),
            2 => Ok(ActivationPlan {
                data: Some(fd_at(0)),
                admin: Some(fd_at(1)),
            }),
            _ => Err(SystemdError::TooManyUnnamed { count }),
        };
    };

    let names: Vec<&str> = names.split(':').collect();
    if names.len() != count {
        return Err(SystemdError::NameCountMismatch {
            names: names.len(),
            fds: count,
        });
    }
    let unknown: Vec<String> = names
        .iter()
        .filter(|n| **n != DATA_NAME && **n != ADMIN_NAME)
        .map(|n| n.to_string())
        .collect();
    if !unknown.is_empty() {
        return Err(SystemdError::UnknownNames { names: unknown });
    }
    let mut plan = ActivationPlan::default();
    for (i, name) in names.iter().enumerate() {
        let (slot, name) = if *name == DATA_NAME {
            (&mut plan.data, DATA_NAME)
        } else {
            (&mut plan.admin, ADMIN_NAME)
        };
        if slot.replace(fd_at(i)).is_some() {
            return Err(SystemdError::DuplicateName { name });
        }
    }
    Ok(plan)
}

/// Turns passed descriptor `fd` into a validated, non-blocking, close-on-exec listener.
fn take_listener(fd: RawFd, role: Role) -> Result<UnixListener, SystemdError> {
    let unusable = |source: io::Error| SystemdError::Unusable { role, fd, source };
    let owned = duplicate_passed_fd(fd).map_err(unusable)?;
    check_unix_listener(&owned, fd, role)?;
    let listener = UnixListener::from(owned);
    listener.set_nonblocking(true).map_err(unusable)?;
    Ok(listener)
}

/// Returns an owned close-on-exec duplicate of `fd`, without claiming ownership of `fd` itself.
///
/// `OwnedFd::from_raw_fd` would need `unsafe` and would be unsound if `listen_fds` were called
/// twice (two owners, double close). Instead the descriptor goes through the kernel: `sendmsg`
/// with `SCM_RIGHTS` takes a plain number (the kernel rejects a closed one with `EBADF`), and
/// `recvmsg` installs a fresh descriptor that this process really owns. The original stays
/// open, which is harmless: systemd keeps its own copy of the listening socket anyway.
fn duplicate_passed_fd(fd: RawFd) -> io::Result<OwnedFd> {
    let (tx, rx) = UnixDatagram::pair()?;
    let marker = [0u8; 1];
    sendmsg::<UnixAddr>(
        tx.as_raw_fd(),
        &[IoSlice::new(&marker)],
        &[ControlMessage::ScmRights(&[fd])],
        MsgFlags::MSG_DONTWAIT,
        None,
    )
    .map_err(io::Error::from)?;

    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    rustix::net::recvmsg(
        &rx,
        &mut [IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
    )?;
    // Draining closes anything unexpected; only the one descriptor we sent is kept.
    control
        .drain()
        .find_map(|message| match message {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        })
        .ok_or_else(|| io::Error::other("the kernel passed no descriptor back"))
}

/// Checks that `owned` (a duplicate of passed descriptor `fd`) is a listening AF_UNIX stream.
fn check_unix_listener(owned: &OwnedFd, fd: RawFd, role: Role) -> Result<(), SystemdError> {
    let not_listener = |found: String| SystemdError::NotUnixListener { role, fd, found };
    let addr: SockaddrStorage = getsockname(owned.as_raw_fd())
        .map_err(|errno| not_listener(format!("not a socket ({errno})")))?;
    match addr.family() {
        Some(AddressFamily::Unix) => {}
        Some(other) => return Err(not_listener(format!("a {other:?} socket"))),
        None => return Err(not_listener("a socket of unknown family".into())),
    }
    let ty = getsockopt(&owned.as_fd(), sockopt::SockType)
        .map_err(|errno| not_listener(format!("a socket whose type cannot be read ({errno})")))?;
    if ty != SockType::Stream {
        return Err(not_listener(format!("a {ty:?} Unix socket")));
    }
    let listening = getsockopt(&owned.as_fd(), sockopt::AcceptConn)
        .map_err(|errno| not_listener(format!("a socket whose state cannot be read ({errno})")))?;
    if !listening {
        return Err(not_listener(
            "a Unix stream socket that is not listening".into(),
        ));
    }
    Ok(())
}

// === readiness notification ===

/// Sends `state` (e.g. `READY=1`, `STOPPING=1`, `STATUS=...`) to `$NOTIFY_SOCKET`.
///
/// A no-op returning `Ok` when `NOTIFY_SOCKET` is unset; callers log errors and carry on.
pub fn notify(state: &str) -> Result<(), SystemdError> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) if !socket.is_empty() => notify_to(&socket, state),
        _ => Ok(()),
    }
}

/// Sends `state` to the notify socket `socket` (an absolute path or an `@abstract` name).
pub fn notify_to(socket: &OsStr, state: &str) -> Result<(), SystemdError> {
    let shown = || socket.to_string_lossy().into_owned();
    let bytes = socket.as_bytes();
    let fail = |source: io::Error| SystemdError::Notify {
        socket: shown(),
        source,
    };
    let addr = match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(socket).map_err(fail)?,
        Some(b'@') if bytes.len() > 1 => {
            SocketAddr::from_abstract_name(&bytes[1..]).map_err(fail)?
        }
        _ => return Err(SystemdError::BadNotifySocket { value: shown() }),
    };
    let sender = UnixDatagram::unbound().map_err(fail)?;
    let sent = sender.send_to_addr(state.as_bytes(), &addr).map_err(fail)?;
    if sent != state.len() {
        return Err(fail(io::Error::new(
            io::ErrorKind::WriteZero,
            "the notification was truncated",
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    const PID: u32 = 4242;

    fn plan(
        pid: Option<&str>,
        fds: Option<&str>,
        names: Option<&str>,
    ) -> Result<ActivationPlan, SystemdError> {
        parse_listen_env(pid, fds, names, PID)
    }

    #[test]
    fn not_activated_without_listen_pid() {
        assert_eq!(
            plan(None, Some("2"), Some("data:admin")).unwrap(),
            ActivationPlan::default()
        );
    }

    #[test]
    fn variables_for_another_process_are_ignored() {
        assert_eq!(
            plan(Some("4243"), Some("2"), Some("data:admin")).unwrap(),
            ActivationPlan::default()
        );
    }

    #[test]
    fn named_sockets_map_to_roles_in_any_order() {
        assert_eq!(
            plan(Some("4242"), Some("2"), Some("data:admin")).unwrap(),
            ActivationPlan {
                data: Some(3),
                admin: Some(4)
            }
        );
        assert_eq!(
            plan(Some("4242"), Some("2"), Some("admin:data")).unwrap(),
            ActivationPlan {
                data: Some(4),
                admin: Some(3)
            }
        );
        assert_eq!(
            plan(Some("4242"), Some("1"), Some("admin")).unwrap(),
            ActivationPlan {
                data: None,
                admin: Some(3)
            }
        );
    }

    #[test]
    fn unnamed_sockets_are_data_then_admin() {
        assert_eq!(
            plan(Some("4242"), Some("1"), None).unwrap(),
            ActivationPlan {
                data: Some(3),
                admin: None
            }
        );
        assert_eq!(
            plan(Some("4242"), Some("2"), None).unwrap(),
            ActivationPlan {
                data: Some(3),
                admin: Some(4)
            }
        );
        assert!(matches!(
            plan(Some("4242"), Some("3"), None),
            Err(SystemdError::TooManyUnnamed { count: 3 })
        ));
    }

    #[test]
    fn zero_or_missing_count_means_nothing_passed() {
        assert_eq!(
            plan(Some("4242"), Some("0"), Some("")).unwrap(),
            ActivationPlan::default()
        );
        assert_eq!(
            plan(Some("4242"), None, None).unwrap(),
            ActivationPlan::default()
        );
    }

    #[test]
    fn unknown_names_are_refused_by_name() {
        let err = plan(Some("4242"), Some("3"), Some("data:keyward.socket:metrics")).unwrap_err();
        match &err {
            SystemdError::UnknownNames { names } => {
                assert_eq!(
                    names,
                    &["keyward.socket".to_string(), "metrics".to_string()]
                )
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("\"keyward.socket\"") && msg.contains("\"metrics\""),
            "{msg}"
        );
        assert!(msg.contains("FileDescriptorName=data"), "{msg}");
    }

    #[test]
    fn malformed_values_are_refused() {
        assert!(matches!(
            plan(Some("abc"), Some("1"), None),
            Err(SystemdError::BadListenPid { .. })
        ));
        assert!(matches!(
            plan(Some("4242"), Some("-1"), None),
            Err(SystemdError::BadListenFds { .. })
        ));
        assert!(matches!(
            plan(Some("4242"), Some("99999999999"), None),
            Err(SystemdError::BadListenFds { .. })
        ));
        assert!(matches!(
            plan(Some("4242"), Some("2"), Some("data")),
            Err(SystemdError::NameCountMismatch { names: 1, fds: 2 })
        ));
        assert!(matches!(
            plan(Some("4242"), Some("2"), Some("data:data")),
            Err(SystemdError::DuplicateName { name: "data" })
        ));
    }

    #[test]
    fn passed_listener_is_taken_over_and_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.sock");
        let original = UnixListener::bind(&path).unwrap();
        let taken = take_listener(original.as_raw_fd(), Role::Data).unwrap();
        assert_ne!(taken.as_raw_fd(), original.as_raw_fd());
        // Non-blocking: nothing queued yet, so accept must not hang.
        assert_eq!(
            taken.accept().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let flags = nix::fcntl::fcntl(&taken, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(
            flags & nix::libc::FD_CLOEXEC,
            0,
            "listener must be close-on-exec"
        );

        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"ping").unwrap();
        let (mut server, _) = taken.accept().unwrap();
        server.set_nonblocking(false).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[test]
    fn descriptors_that_are_not_unix_listeners_are_refused() {
        let dir = tempfile::tempdir().unwrap();

        let datagram = UnixDatagram::bind(dir.path().join("dgram.sock")).unwrap();
        let err = take_listener(datagram.as_raw_fd(), Role::Admin).unwrap_err();
        assert!(
            matches!(
                err,
                SystemdError::NotUnixListener {
                    role: Role::Admin,
                    ..
                }
            ),
            "{err}"
        );

        let (stream, _peer) = UnixStream::pair().unwrap();
        let err = take_listener(stream.as_raw_fd(), Role::Data).unwrap_err();
        assert!(err.to_string().contains("not listening"), "{err}");

        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = take_listener(tcp.as_raw_fd(), Role::Data).unwrap_err();
        assert!(err.to_string().contains("Inet"), "{err}");

        let file = std::fs::File::create(dir.path().join("plain")).unwrap();
        let err = take_listener(file.as_raw_fd(), Role::Data).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
    }

    #[test]
    fn descriptor_that_is_not_open_is_refused() {
        // Far above any RLIMIT_NOFILE, so it cannot be open in this process.
        let fd = RawFd::MAX - 1;
        let err = take_listener(fd, Role::Data).unwrap_err();
        match &err {
            SystemdError::Unusable { role, fd: f, .. } => {
                assert_eq!((*role, *f), (Role::Data, fd));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("data descriptor"), "{err}");
    }

    #[test]
    fn notify_reaches_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let receiver = UnixDatagram::bind(&path).unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        notify_to(path.as_os_str(), "READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
    }

    #[test]
    fn notify_reaches_an_abstract_socket() {
        let name = format!("keyward-test-notify-{}-{}", std::process::id(), line!());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        notify_to(OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn notify_errors_are_reported_not_swallowed() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nobody-listens.sock");
        let err = notify_to(missing.as_os_str(), "READY=1").unwrap_err();
        assert!(matches!(err, SystemdError::Notify { .. }), "{err}");
        assert!(err.to_string().contains("nobody-listens.sock"), "{err}");

        for bad in ["relative/notify.sock", "@", ""] {
            assert!(
                matches!(
                    notify_to(OsStr::new(bad), "READY=1"),
                    Err(SystemdError::BadNotifySocket { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
