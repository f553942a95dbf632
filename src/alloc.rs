//! The process allocator: glibc's `malloc`, asked for a few sizes only.
//!
//! Each request from 1 KiB to 32 MiB is rounded up to one of four sizes per power of two (the
//! classes jemalloc uses). A freed block then fits the next request of its class whatever that
//! request's exact size, instead of being split for a smaller one and leaving a remnant that
//! fits nothing. Parquet encoding allocates and frees page, level and compression buffers of
//! ever-different sizes for every page, between small blocks the open file keeps (its row-group
//! metadata); exact sizes left the arena strewn with such remnants, so RSS crept up with the
//! records written though live memory did not (generator → Parquet, `plain`, release build,
//! 3 alternating runs each: 1M → 10M records 45.8–46.4 → 49.2–50.4 MiB with exact sizes,
//! 46.2–46.8 → 47.5–48.0 with classes, at the same CPU time). `SLUICE_MALLOC_CLASSES=0` turns
//! the rounding off (and the shrinking below with it).
//!
//! A block of a page or more shrunk to less than half its class is moved to a block of the new
//! class instead of being cut down where it is. Parquet reserves a compression buffer as large
//! as the uncompressed page, compresses into its head and shrinks it to what was written; cut
//! down in place, the compressed page (kept until its row group is written) sat at the head of
//! a region whose tail, never written, became free memory, so the next page's buffer could not
//! reuse the region and each new buffer touched fresh pages of the heap. Moved, the whole block
//! is free again at once and the next page's buffer takes it (peak anonymous memory of
//! generator → Parquet, release build, 3 alternating runs each: 20.1–20.4 → 21.9–22.2 MiB at
//! 1M → 10M records cut in place, 18.8–19.4 → 20.6–20.8 moved; the same CPU time).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

/// Requests below this size are passed through: glibc's bins already hold them by exact size.
const SMALL: usize = 1024;

/// Requests from this size up are mapped by glibc on their own (the fixed mmap threshold of
/// `main.rs`) and so rounded to pages by the kernel; passed through.
const LARGE: usize = 32 << 20;

/// Blocks of this size and up shrunk to less than half their class are moved (module docs).
const MOVE_ON_SHRINK: usize = 4096;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// [`System`] with request sizes from [`SMALL`] to [`LARGE`] rounded up to the next of four
/// size classes per power of two (at most 25% more, about 12% on average).
pub struct SizeClasses;

/// The size class `size` belongs to: `size` itself outside `SMALL..LARGE`, else the next
/// multiple of a quarter of the largest power of two not above `size - 1`.
#[inline]
pub fn class(size: usize) -> usize {
    if !(SMALL..LARGE).contains(&size) {
        return size;
    }
    let top = usize::BITS - 1 - (size - 1).leading_zeros();
    let step = 1usize << (top - 2);
    (size + step - 1) & !(step - 1)
}

static INIT: std::sync::Once = std::sync::Once::new();

/// Reads `SLUICE_MALLOC_CLASSES` once, at the first allocation (before `main`, so every block
/// is allocated one way). `getenv` does not allocate.
fn init() {
    INIT.call_once(|| {
        // SAFETY: the name is NUL-terminated; the value, if any, is a C string owned by the
        // environment, read before any other thread exists.
        let off = unsafe {
            let value = libc::getenv(c"SLUICE_MALLOC_CLASSES".as_ptr());
            !value.is_null() && std::ffi::CStr::from_ptr(value).to_bytes() == b"0"
        };
        if off {
            ENABLED.store(false, Ordering::Relaxed);
        }
    });
}

#[inline]
fn rounded(layout: Layout) -> Layout {
    init();
    if !ENABLED.load(Ordering::Relaxed) {
        return layout;
    }
    // SAFETY: the class is at least the size and at most LARGE, so it does not overflow isize
    // once aligned; the alignment is the original's.
    unsafe { Layout::from_size_align_unchecked(class(layout.size()), layout.align()) }
}

// SAFETY: every call is forwarded to `System` with a layout at least as large as asked for and
// the same alignment, and a block is handed back to `System` (dealloc, realloc) with the layout
// `System` allocated it with: rounding is decided once, before the first block is handed out,
// and never changes, so `rounded` gives the same layout again. The realloc shortcut keeps a
// block whose class (its real size) already holds `new_size`; the move on shrinking returns
// null, leaving the old block as it was, when the new block cannot be had.
unsafe impl GlobalAlloc for SizeClasses {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc(rounded(layout)) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc_zeroed(rounded(layout)) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, rounded(layout)) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = rounded(layout);
        let new = rounded(unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) });
        if ENABLED.load(Ordering::Relaxed) {
            if new.size() == old.size() {
                // Still within the block's class: it already has the room.
                return ptr;
            }
            if old.size() >= MOVE_ON_SHRINK && new.size() < old.size() / 2 {
                // Moved rather than cut down in place (see the module docs).
                let moved = unsafe { System.alloc(new) };
                if !moved.is_null() {
                    // SAFETY: both blocks are live and distinct; the new one holds `new_size`
                    // bytes, fewer than the old one's.
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr, moved, new_size);
                        System.dealloc(ptr, old);
                    }
                }
                return moved;
            }
        }
        unsafe { System.realloc(ptr, old, new.size()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_four_classes_per_power_of_two() {
        assert_eq!(class(0), 0);
        assert_eq!(class(1023), 1023);
        assert_eq!(class(1024), 1024);
        assert_eq!(class(1025), 1280);
        assert_eq!(class(1280), 1280);
        assert_eq!(class(1281), 1536);
        assert_eq!(class(2000), 2048);
        assert_eq!(class(2049), 2560);
        assert_eq!(class(1 << 20), 1 << 20);
        assert_eq!(class((1 << 20) + 1), (1 << 20) + (1 << 18));
        assert_eq!(class(LARGE - 1), LARGE);
        assert_eq!(class(LARGE), LARGE);
        for size in (SMALL..200_000).step_by(7) {
            let c = class(size);
            assert!(c >= size && c * 4 <= size * 5 + 4, "{size} -> {c}");
            assert_eq!(class(c), c, "a class is its own class ({size} -> {c})");
        }
    }

    #[test]
    fn a_block_grows_in_place_within_its_class_and_keeps_its_bytes_across_classes() {
        let a = SizeClasses;
        if std::env::var_os("SLUICE_MALLOC_CLASSES").is_some_and(|v| v == "0") {
            return; // rounding is off in this process: nothing grows in place
        }
        unsafe {
            let layout = Layout::from_size_align(1100, 8).unwrap();
            let p = a.alloc(layout);
            assert!(!p.is_null());
            for i in 0..1100 {
                *p.add(i) = (i % 251) as u8;
            }
            // 1100 and 1280 share the class 1280: the block already has the room.
            let q = a.realloc(p, layout, 1280);
            assert_eq!(q, p);
            *q.add(1279) = 7;
            // 1281 is in the next class: moved (or grown) with every byte kept.
            let r = a.realloc(q, Layout::from_size_align(1280, 8).unwrap(), 5000);
            assert!(!r.is_null());
            assert!((0..1100).all(|i| *r.add(i) == (i % 251) as u8));
            assert_eq!(*r.add(1279), 7);
            *r.add(4999) = 9;
            // Shrinking within the class keeps the block, across classes keeps the prefix.
            let s = a.realloc(r, Layout::from_size_align(5000, 8).unwrap(), 4200);
            assert_eq!(s, r);
            let t = a.realloc(s, Layout::from_size_align(4200, 8).unwrap(), 100);
            assert!((0..100).all(|i| *t.add(i) == (i % 251) as u8));
            a.dealloc(t, Layout::from_size_align(100, 8).unwrap());
            // Shrunk by less than half its class, a block is shrunk by `System` (prefix kept);
            // shrunk to under half, it moves to a new block (the old one is still held when the
            // new one is taken, so they differ) with the prefix kept.
            let l = Layout::from_size_align(300_000, 8).unwrap();
            let p = a.alloc(l);
            for i in 0..300_000 {
                *p.add(i) = (i % 241) as u8;
            }
            let q = a.realloc(p, l, 200_000);
            assert!((0..200_000).all(|i| *q.add(i) == (i % 241) as u8));
            let r = a.realloc(q, Layout::from_size_align(200_000, 8).unwrap(), 30_000);
            assert_ne!(r, q, "shrunk to under half its class: moved");
            assert!((0..30_000).all(|i| *r.add(i) == (i % 241) as u8));
            a.dealloc(r, Layout::from_size_align(30_000, 8).unwrap());
            // Over-aligned blocks are rounded and aligned.
            let big = Layout::from_size_align(3000, 4096).unwrap();
            let z = a.alloc_zeroed(big);
            assert_eq!(z as usize % 4096, 0);
            assert!((0..3000).all(|i| *z.add(i) == 0));
            a.dealloc(z, big);
            // Over-aligned blocks grow through a copy of every byte the caller owns.
            let l = Layout::from_size_align(1023, 64).unwrap();
            let p = a.alloc(l);
            assert_eq!(p as usize % 64, 0);
            for i in 0..1023 {
                *p.add(i) = (i % 13) as u8;
            }
            let q = a.realloc(p, l, 1024); // 1023 is below the classes, 1024 their first
            assert_eq!(q as usize % 64, 0);
            assert!((0..1023).all(|i| *q.add(i) == (i % 13) as u8));
            let r = a.realloc(q, Layout::from_size_align(1024, 64).unwrap(), LARGE - 1);
            assert!((0..1023).all(|i| *r.add(i) == (i % 13) as u8));
            *r.add(LARGE - 2) = 5;
            // LARGE - 1 is rounded to LARGE: growing to LARGE keeps the block.
            let s = a.realloc(r, Layout::from_size_align(LARGE - 1, 64).unwrap(), LARGE);
            assert_eq!(s, r);
            assert_eq!(*s.add(LARGE - 2), 5);
            a.dealloc(s, Layout::from_size_align(LARGE, 64).unwrap());
        }
    }
}
