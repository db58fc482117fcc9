//! A global allocator that wipes every heap block before it is freed.
//!
//! The provider key has to leave locked memory to be sent: it becomes header bytes, then hyper
//! and rustls plaintext buffers. Those copies live on the ordinary heap; zeroing every block at
//! free time guarantees that once a request's buffers are gone, freed memory holds no trace of
//! the key (README, "The key model"), without having to find every copy.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};

/// jemalloc's built-in options, read before `main` (the binary refers to this static so that it
/// is linked in). A background thread purges freed pages once they have been unused for the
/// usual decay time (about 10 s), without waiting for the next allocation, and `retain:false`
/// unmaps them rather than `madvise` them, which locked pages refuse: with `lock_memory =
/// "all"` too, memory used at a peak is given back within about 20 s instead of staying
/// resident and locked until restart (README, "Deployment checklist"). `_RJEM_MALLOC_CONF` in
/// the environment is read after it and can change any of it.
// SAFETY: jemalloc reads this symbol as a `const char *` to a NUL-terminated string; `Option<&u8>`
// has the layout of a pointer, and it points at the first byte of a static, NUL-terminated,
// never-mutated byte string.
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static JEMALLOC_CONF: Option<&'static u8> = Some(&b"background_thread:true,retain:false\0"[0]);

/// Wraps an allocator (the system one by default) and zeroes each block before releasing it.
pub struct ZeroOnFree<A = System>(pub A);

// SAFETY: every method forwards to the inner allocator with the caller's own arguments; the only
// addition is writing zeros over a block the caller owns and is about to give up (`dealloc`), or
// over the old block's bytes that `realloc` would otherwise abandon.
unsafe impl<A: GlobalAlloc> GlobalAlloc for ZeroOnFree<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` is a live block of `layout.size()` bytes owned by the caller until this
        // call returns; volatile writes keep the compiler from eliding the wipe.
        unsafe {
            wipe(ptr, layout.size());
            self.0.dealloc(ptr, layout);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Allocate-copy-wipe-free instead of the inner realloc, which may move the block and
        // leave the old bytes behind unwiped.
        // SAFETY: `new_layout` has the old alignment and a size the caller vouches for; we copy
        // at most the smaller size between two live, non-overlapping blocks, then release the
        // old block through `dealloc` (which wipes it).
        unsafe {
            let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
            let new_ptr = self.0.alloc(new_layout);
            if !new_ptr.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new_ptr, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new_ptr
        }
    }
}

/// Overwrites `len` bytes at `ptr` with zeros in a way the optimizer keeps.
unsafe fn wipe(ptr: *mut u8, len: usize) {
    // SAFETY: the caller guarantees `ptr..ptr+len` is writable memory it owns.
    unsafe {
        std::ptr::write_bytes(ptr, 0, len);
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An inner allocator that checks, at the moment a block is released, that it is all zeros.
    struct CheckingAlloc {
        nonzero_frees: AtomicUsize,
        frees: AtomicUsize,
    }

    // SAFETY: forwards to System; only reads the block before handing it back.
    unsafe impl GlobalAlloc for CheckingAlloc {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            let bytes = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            self.frees.fetch_add(1, Ordering::SeqCst);
            if bytes.iter().any(|&b| b != 0) {
                self.nonzero_frees.fetch_add(1, Ordering::SeqCst);
            }
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[test]
    fn blocks_are_wiped_before_release_including_on_realloc() {
        let a = ZeroOnFree(CheckingAlloc {
            nonzero_frees: AtomicUsize::new(0),
            frees: AtomicUsize::new(0),
        });
        unsafe {
            let layout = Layout::from_size_align(64, 8).unwrap();
            let p = a.alloc(layout);
            std::ptr::copy_nonoverlapping(
                b"Authorization: Bearer sk-live-0123456789".as_ptr(),
                p,
                40,
            );
            let q = a.realloc(p, layout, 4096);
            assert_eq!(
                std::slice::from_raw_parts(q, 40),
                b"Authorization: Bearer sk-live-0123456789"
            );
            a.dealloc(q, Layout::from_size_align(4096, 8).unwrap());
        }
        assert_eq!(a.0.frees.load(Ordering::SeqCst), 2);
        assert_eq!(
            a.0.nonzero_frees.load(Ordering::SeqCst),
            0,
            "a block was released holding data"
        );
    }

    #[test]
    fn the_check_itself_can_fail() {
        // Without the wrapper, the same sequence releases a block that still holds the bytes.
        let inner = CheckingAlloc {
            nonzero_frees: AtomicUsize::new(0),
            frees: AtomicUsize::new(0),
        };
        unsafe {
            let layout = Layout::from_size_align(64, 8).unwrap();
            let p = inner.alloc(layout);
            std::ptr::write_bytes(p, 0xAB, 64);
            inner.dealloc(p, layout);
        }
        assert_eq!(inner.nonzero_frees.load(Ordering::SeqCst), 1);
    }
}
