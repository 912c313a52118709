//! Owned copies of weights on transparent huge pages, packed one after
//! another in load order.
//!
//! Why: a decode step streams every weight once, about 100 MB on SmolLM2,
//! spread over 211 matrices of 70 to 550 KB. With the weights on 2 MiB
//! pages, SmolLM2's q8 decode from an empty context ran 1.14x and 1.17x as
//! fast (two runs of 8 and 10 back-to-back pairs, every pair faster;
//! docs/results.md, "Weights on huge pages"); fewer TLB misses and fewer
//! hardware-prefetch restarts at 4 KiB boundaries are the likely reasons
//! (a criterion loop over the projections alone does not show the gain).
//! Linux backs anonymous memory with huge pages on this kind of machine only
//! where asked (THP "madvise"), and only for 2 MiB-aligned 2 MiB ranges of
//! one mapping; small matrices therefore share large mappings (an arena)
//! that are advised `MADV_HUGEPAGE`. Elsewhere, or with
//! `DYNAKV_HUGE_PAGES=0`, the advice is skipped and the arena is plain
//! memory.

use std::ops::Deref;
use std::sync::{Arc, Mutex, Weak};

use memmap2::MmapMut;

/// A huge page's size (x86-64 and most aarch64 kernels).
const HUGE_PAGE: usize = 2 << 20;

/// Size of a shared region; larger requests get a region of their own.
const REGION: usize = 32 << 20;

/// Alignment of each allocation (a cache line, and every SIMD load width).
const ALIGN: usize = 64;

/// Bytes written once at allocation ([`HugeBytes::filled`]) and read-only
/// afterwards, inside a huge-page-advised region shared with other
/// allocations.
pub(crate) struct HugeBytes {
    region: Option<Arc<Region>>,
    start: usize,
    len: usize,
}

impl std::fmt::Debug for HugeBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HugeBytes({} bytes)", self.len)
    }
}

/// One anonymous mapping, its usable part starting on a huge-page boundary.
struct Region {
    /// Keeps the mapping alive; all access goes through `base`.
    _map: MmapMut,
    /// The first huge-page boundary inside the mapping.
    base: *mut u8,
    cap: usize,
}

// SAFETY: the mapping lives as long as the Region; `base` points into it.
// Writes happen only through `HugeBytes::filled`, each to a range handed out
// once under the arena's lock, before any reference to that range exists;
// everything else only reads.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    fn new(cap: usize) -> std::io::Result<Self> {
        let mut map = MmapMut::map_anon(cap + HUGE_PAGE)?;
        let addr = map.as_mut_ptr() as usize;
        let offset = addr.next_multiple_of(HUGE_PAGE) - addr;
        #[cfg(target_os = "linux")]
        if advise_huge_pages() {
            // only advice: without it the region is ordinary memory
            let _ = map.advise_range(memmap2::Advice::HugePage, offset, cap);
        }
        // SAFETY: offset < HUGE_PAGE, so offset + cap lies inside the map
        let base = unsafe { map.as_mut_ptr().add(offset) };
        Ok(Self {
            _map: map,
            base,
            cap,
        })
    }
}

/// Whether regions ask for huge pages: yes unless `DYNAKV_HUGE_PAGES=0`
/// (for comparison, or where the kernel's huge-page work is unwelcome).
#[cfg(target_os = "linux")]
fn advise_huge_pages() -> bool {
    std::env::var("DYNAKV_HUGE_PAGES").map_or(true, |v| v.trim() != "0")
}

/// The region small allocations are carved from, and how much of it is
/// used. Held weakly: a region is unmapped once its last allocation is
/// dropped (a process that drops a model gets its memory back), and the
/// next allocation opens a new one.
struct Arena {
    region: Weak<Region>,
    used: usize,
}

static ARENA: Mutex<Arena> = Mutex::new(Arena {
    region: Weak::new(),
    used: 0,
});

impl HugeBytes {
    /// `len` bytes, zeroed, then written by `fill`; an error only when the
    /// system refuses the memory.
    pub(crate) fn filled(len: usize, fill: impl FnOnce(&mut [u8])) -> std::io::Result<Self> {
        Self::filled_in(&ARENA, len, fill)
    }

    /// [`HugeBytes::filled`] from a given arena (tests use their own).
    fn filled_in(
        arena: &Mutex<Arena>,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> std::io::Result<Self> {
        if len == 0 {
            fill(&mut []);
            return Ok(Self {
                region: None,
                start: 0,
                len: 0,
            });
        }
        let (region, start) = if len > REGION / 4 {
            (Arc::new(Region::new(len)?), 0)
        } else {
            let mut a = arena.lock().unwrap_or_else(|e| e.into_inner());
            let region = match a.region.upgrade() {
                Some(r) if a.used + len <= r.cap => r,
                // none alive, or too full: the old region's tail is left
                // unused (never touched, so never resident)
                _ => {
                    let r = Arc::new(Region::new(REGION)?);
                    a.region = Arc::downgrade(&r);
                    a.used = 0;
                    r
                }
            };
            let start = a.used;
            a.used = (start + len).next_multiple_of(ALIGN);
            (region, start)
        };
        // SAFETY: [start, start + len) lies inside the region (checked above
        // or the region was made for it) and was handed out only now, so
        // nothing else refers to it; the region's pages are zeroed by mmap.
        let bytes = unsafe { std::slice::from_raw_parts_mut(region.base.add(start), len) };
        fill(bytes);
        Ok(Self {
            region: Some(region),
            start,
            len,
        })
    }
}

impl Deref for HugeBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.region {
            // SAFETY: the range was checked at allocation, is kept alive by
            // the Arc, and is no longer written
            Some(r) => unsafe { std::slice::from_raw_parts(r.base.add(self.start), self.len) },
            None => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(seed: usize, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| ((i * 31 + seed * 7) % 251) as u8)
            .collect()
    }

    #[test]
    fn allocations_keep_their_bytes_and_alignment() {
        // small ones share regions, and enough of them to open a second one;
        // a large one takes its own
        let sizes = [1usize, 63, 64, 4097, 300_000, REGION / 4 + 1, 5_000_000, 7];
        let sizes: Vec<usize> = sizes.iter().cycle().take(40).copied().collect();
        let made: Vec<(Vec<u8>, HugeBytes)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let want = pattern(i, n);
                let h = HugeBytes::filled(n, |b| b.copy_from_slice(&want)).unwrap();
                (want, h)
            })
            .collect();
        for (want, h) in &made {
            assert_eq!(&h[..], &want[..]);
            assert_eq!(h.as_ptr() as usize % ALIGN, 0);
        }
        let empty = HugeBytes::filled(0, |b| assert!(b.is_empty())).unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn a_region_is_unmapped_with_its_last_allocation() {
        let arena = Mutex::new(Arena {
            region: Weak::new(),
            used: 0,
        });
        let a = HugeBytes::filled_in(&arena, 1000, |b| b.fill(7)).unwrap();
        let b = HugeBytes::filled_in(&arena, 1000, |b| b.fill(9)).unwrap();
        let region = Arc::downgrade(a.region.as_ref().unwrap());
        assert!(Arc::ptr_eq(
            a.region.as_ref().unwrap(),
            b.region.as_ref().unwrap()
        ));
        drop(a);
        assert!(region.upgrade().is_some());
        assert!(b.iter().all(|&x| x == 9));
        drop(b);
        assert!(region.upgrade().is_none());
        // the next allocation opens a new region
        let c = HugeBytes::filled_in(&arena, 10, |b| b.fill(1)).unwrap();
        assert_eq!(&c[..], &[1u8; 10][..]);
    }

    #[test]
    fn fresh_bytes_are_zero() {
        let h = HugeBytes::filled(10_000, |b| assert!(b.iter().all(|&x| x == 0))).unwrap();
        assert_eq!(h.len(), 10_000);
    }
}
