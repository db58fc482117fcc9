//! Cases rebuilt from real-world failures of other gateways and credential injectors, through
//! the real binary: clean exits, framing, forwarding headers, early refusals, uploads and the
//! audit of delivered answers. Raw sockets where an HTTP library would hide the fault.

mod support;

use support::daemon::Daemon;

#[test]
fn a_clean_exit_removes_the_sockets_keyward_bound() {
    let mut d = Daemon::builder().start();
    let (data, admin) = (d.socket(), d.admin_socket());
    assert!(data.exists() && admin.exists());
    let home = d.home.clone();
    assert_eq!(d.terminate(), Some(0), "{}", d.stderr());
    assert!(!data.exists(), "data socket left behind after SIGTERM");
    assert!(!admin.exists(), "admin socket left behind after SIGTERM");
    // The next start over the same home binds afresh and serves.
    let d2 = Daemon::builder().home(&home).start();
    assert!(d2.socket().exists() && d2.admin_socket().exists());
}

#[test]
fn a_clean_exit_leaves_a_socket_file_another_process_put_there() {
    let mut d = Daemon::builder().start();
    let data = d.socket();
    // Someone replaced the file while keyward ran: it is not keyward's to remove.
    std::fs::remove_file(&data).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&data).unwrap();
    assert_eq!(d.terminate(), Some(0), "{}", d.stderr());
    assert!(data.exists(), "keyward removed a socket it did not bind");
    assert!(!d.admin_socket().exists());
    drop(other);
}
