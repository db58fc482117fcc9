//! `Secret`: bytes that live only in locked, guard-paged memory and are wiped on drop.
//!
//! This is the one place in keyward that allocates memory by hand. Every secret (master key,
//! tenant keys, data keys, provider keys) is held in a `Secret` while it is in plaintext.

#![allow(unsafe_code)]

use std::fmt;
use std::ptr::NonNull;

/// Plaintext secret bytes in a memsec allocation: mlock'd, excluded from core dumps
/// (`MADV_DONTDUMP`), with guard pages on both sides, zeroed before it is freed.
///
/// No `Clone`, `Debug` (prints `[REDACTED]`), `Display` or `Serialize`: the bytes are reachable
/// only through [`Secret::expose_secret`], so every use of them can be found with grep.
pub struct Secret {
    /// Start of the user area of the memsec allocation (`cap` bytes allocated).
    ptr: NonNull<u8>,
    /// Number of secret bytes.
    len: usize,
    /// Bytes the allocation holds: `len` rounded up to its pool class.
    cap: usize,
}

// === the pool of locked allocations ===

/// A wiped memsec allocation waiting for reuse: still mlock'd, guard-paged and excluded from
/// core dumps.
struct Slot(NonNull<u8>);

// SAFETY: a pooled slot is reachable only through the pool until it is popped.
unsafe impl Send for Slot {}

/// Smallest pooled allocation.
const MIN_CLASS: usize = 32;
/// Largest secret whose allocation is recycled; bigger ones are freed.
const POOLED_MAX: usize = 4096;
/// Allocations kept per size class: enough for the secrets of many concurrent requests.
const POOL_DEPTH: usize = 512;

/// Free allocations per power-of-two class (32 … 4096 bytes). Each memsec allocation costs
/// eight mapping-changing syscalls (mprotect, mlock, madvise, and their reversal on free) and
/// TLB shootdowns; recycling them takes those off the per-request path and bounds the number of
/// mappings to the peak number of live secrets.
static POOL: std::sync::Mutex<[Vec<Slot>; 8]> = std::sync::Mutex::new([const { Vec::new() }; 8]);

/// The pool class and allocation size for `len` bytes, if pooled.
fn class(len: usize) -> Option<(usize, usize)> {
    let cap = len.max(MIN_CLASS).next_power_of_two();
    (cap <= POOLED_MAX).then(|| ((cap / MIN_CLASS).trailing_zeros() as usize, cap))
}

fn pool() -> std::sync::MutexGuard<'static, [Vec<Slot>; 8]> {
    crate::lock(&POOL)
}

// SAFETY: `Secret` owns its allocation exclusively (no aliasing pointers escape except through
// borrows tied to `&self`/`&mut self`), so moving it or sharing `&Secret` across threads is as
// safe as for a `Box<[u8]>`.
unsafe impl Send for Secret {}
// SAFETY: see `Send`; `&Secret` only allows reading the bytes.
unsafe impl Sync for Secret {}

impl Secret {
    /// Allocates `len` zeroed bytes of locked memory (recycled from the pool when possible).
    pub fn zeroed(len: usize) -> Secret {
        let (cap, recycled) = match class(len) {
            Some((i, cap)) => (cap, pool()[i].pop()),
            None => (len.max(1), None),
        };
        let ptr = match recycled {
            Some(Slot(ptr)) => ptr,
            // SAFETY: memsec::malloc_sized returns a fresh allocation of at least `cap` writable
            // bytes or None; we never read past `cap` and release it once, in Drop.
            None => unsafe { memsec::malloc_sized(cap) }
                .expect("locked allocation failed (out of memory)")
                .cast::<u8>(),
        };
        // SAFETY: `ptr` points to at least `cap` writable bytes we own.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, cap) };
        Secret { ptr, len, cap }
    }

    /// Copies `bytes` into a new locked allocation. The caller remains responsible for wiping
    /// its own copy.
    pub fn from_slice(bytes: &[u8]) -> Secret {
        let mut secret = Secret::zeroed(bytes.len());
        secret.expose_secret_mut().copy_from_slice(bytes);
        secret
    }

    /// Moves the contents of `bytes` into locked memory and wipes the original buffer.
    pub fn from_vec(mut bytes: Vec<u8>) -> Secret {
        let secret = Secret::from_slice(&bytes);
        zeroize::Zeroize::zeroize(&mut bytes);
        secret
    }

    /// A fresh random secret of `len` bytes from the system CSPRNG.
    pub fn random(len: usize) -> Secret {
        let mut secret = Secret::zeroed(len);
        super::fill_random(secret.expose_secret_mut());
        secret
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the secret holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The plaintext. Each caller must need the raw bytes (to encrypt, inject or compare) and
    /// must not copy them anywhere that outlives the call.
    pub fn expose_secret(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Mutable plaintext, for filling a fresh secret in place (decryption, random generation).
    pub fn expose_secret_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `expose_secret`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Constant-time equality, for comparing secrets without a timing side channel.
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        if self.len != other.len() {
            return false;
        }
        let diff = self
            .expose_secret()
            .iter()
            .zip(other)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // SAFETY: `ptr` holds `cap` bytes we own; wiping them is always allowed.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr(), 0, self.cap) };
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        if let Some((i, cap)) = class(self.cap)
            && cap == self.cap
        {
            let mut pool = pool();
            if pool[i].len() < POOL_DEPTH {
                pool[i].push(Slot(self.ptr));
                return;
            }
        }
        // SAFETY: `ptr` came from memsec::malloc_sized and is released once; memsec::free also
        // zeroes the pages (munlock path) before returning them.
        unsafe { memsec::free(self.ptr) };
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_print_redacted() {
        let secret = Secret::from_slice(b"sk-live-very-secret");
        assert_eq!(format!("{secret:?}"), "[REDACTED]");
        assert_eq!(format!("{secret}"), "[REDACTED]");
        assert_eq!(format!("{:#?}", Some(&secret)), "Some(\n    [REDACTED],\n)");
    }

    #[test]
    fn holds_and_compares_bytes() {
        let secret = Secret::from_vec(b"abc".to_vec());
        assert_eq!(secret.expose_secret(), b"abc");
        assert!(secret.ct_eq(b"abc"));
        assert!(!secret.ct_eq(b"abd"));
        assert!(!secret.ct_eq(b"ab"));
        assert!(Secret::zeroed(0).is_empty());
        assert!(!secret.is_empty());
        // Two differences that cancel out when combined with XOR instead of OR.
        let two = Secret::from_slice(&[1, 2]);
        assert!(!two.ct_eq(&[0, 3]));
        assert!(two.ct_eq(&[1, 2]));
    }

    #[test]
    fn recycled_allocations_come_back_wiped() {
        let first = Secret::from_slice(b"sk-a-secret-that-will-be-recycled");
        let addr = first.ptr.as_ptr() as usize;
        drop(first);
        // Tests run in parallel threads sharing the pool, so look for our block among a few.
        let again: Vec<Secret> = (0..64).map(|_| Secret::zeroed(33)).collect();
        for s in &again {
            assert!(s.expose_secret().iter().all(|&b| b == 0));
        }
        let reused = again.iter().any(|s| s.ptr.as_ptr() as usize == addr);
        assert!(
            reused,
            "a freed allocation of the same class was not reused"
        );
        assert_eq!(class(33), Some((1, 64)));
        assert_eq!(class(1), Some((0, 32)));
        assert_eq!(class(4097), None);
    }

    #[test]
    fn the_pool_keeps_at_most_its_depth_per_class() {
        // 1000 bytes is the 1024-byte class, which no other test uses; one more than the pool
        // holds plus a few must leave it exactly full (the rest are freed).
        let (class_index, cap) = class(1000).unwrap();
        assert_eq!(cap, 1024);
        let many: Vec<Secret> = (0..POOL_DEPTH + 8).map(|_| Secret::zeroed(1000)).collect();
        drop(many);
        assert_eq!(pool()[class_index].len(), POOL_DEPTH);
    }

    #[test]
    fn random_secrets_differ() {
        let a = Secret::random(32);
        let b = Secret::random(32);
        assert_eq!(a.len(), 32);
        assert_ne!(a.expose_secret(), b.expose_secret());
    }
}
