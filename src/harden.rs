//! Process hardening applied at start, before any secret is read: no core dumps, not
//! ptrace-readable by other processes of the same user, memory locked per `lock_memory`.

use nix::sys::mman::{MlockAllFlags, mlockall};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::config::LockMemory;

/// What hardening achieved; printed at start so operators can see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardening {
    /// `PR_SET_DUMPABLE` is 0.
    pub not_dumpable: bool,
    /// `RLIMIT_CORE` is 0.
    pub no_core: bool,
    /// Memory locking in force.
    pub memory: MemoryLock,
}

/// The memory-locking outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryLock {
    /// `mlockall` succeeded: no page of the process can be swapped.
    All,
    /// Only secret allocations are locked, as configured.
    SecretsOnly,
    /// `all` was asked for but could not be had; only secret pages are locked. The string
    /// says why and how to fix it.
    FellBackToSecrets(String),
}

/// Applies hardening. Never fails: every step that cannot be applied is reported instead.
pub fn harden(lock: LockMemory) -> Hardening {
    let not_dumpable = nix::sys::prctl::set_dumpable(false).is_ok();
    let no_core = setrlimit(Resource::RLIMIT_CORE, 0, 0).is_ok();
    let memory = match lock {
        LockMemory::Secrets => MemoryLock::SecretsOnly,
        LockMemory::All => lock_all(),
    };
    Hardening {
        not_dumpable,
        no_core,
        memory,
    }
}

fn lock_all() -> MemoryLock {
    // With a finite RLIMIT_MEMLOCK, MCL_FUTURE would make later allocations fail once the
    // limit is reached (and crash the daemon mid-request). Only lock everything when the
    // limit cannot bite: unlimited, or running with CAP_IPC_LOCK (root).
    let (soft, _) = getrlimit(Resource::RLIMIT_MEMLOCK).unwrap_or((0, 0));
    let privileged = nix::unistd::geteuid().is_root();
    if soft != nix::sys::resource::RLIM_INFINITY && !privileged {
        return MemoryLock::FellBackToSecrets(format!(
            "RLIMIT_MEMLOCK is {soft} bytes; lock_memory = \"all\" needs it unlimited \
             (systemd LimitMEMLOCK=infinity, ulimit -l unlimited) or CAP_IPC_LOCK"
        ));
    }
    // MCL_ONFAULT locks pages as they are touched instead of populating every reservation, so
    // thread stacks and allocator arenas do not inflate the resident set.
    // nix does not name MCL_ONFAULT; its value is 4 on every Linux architecture (since 4.4).
    const MCL_ONFAULT: MlockAllFlags = MlockAllFlags::from_bits_retain(4);
    let flags = MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE | MCL_ONFAULT;
    match mlockall(flags) {
        Ok(()) => MemoryLock::All,
        Err(e) => MemoryLock::FellBackToSecrets(format!("mlockall failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_mode_disables_dumps_and_core_files() {
        let h = harden(LockMemory::Secrets);
        assert!(h.not_dumpable);
        assert!(h.no_core);
        assert_eq!(h.memory, MemoryLock::SecretsOnly);
        assert!(!nix::sys::prctl::get_dumpable().unwrap());
        assert_eq!(getrlimit(Resource::RLIMIT_CORE).unwrap(), (0, 0));
    }
}
