//! The paged KV pool's bookkeeping: a fixed number of pages, each with a reference count.
//!
//! A page is an id (`PageId`); its bytes live in the executor's KV pool at that index. Holders
//! outside the radix tree (running sequences, pages being loaded from disk) hold a
//! [`PageLease`], which releases its reference when dropped, so no code path releases those by
//! hand. What it guarantees:
//! - A page is either free (reference count 0, on the free list exactly once) or used (count ≥ 1,
//!   not on the free list). `free_count() + used_count() == capacity()` always.
//! - Retaining or releasing a free page, or naming a page outside the pool, is a typed
//!   [`PoolError`], never a panic and never a silent change of state.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

/// The id of one page in a [`PagePool`]: an index in `0..capacity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageId(pub u32);

impl fmt::Display for PageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "page {}", self.0)
    }
}

/// What went wrong in a [`PagePool`] operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The page id is not in `0..capacity`.
    #[error("{page} is outside the pool (capacity {capacity} pages)")]
    OutOfRange {
        /// The page named.
        page: PageId,
        /// The pool's number of pages.
        capacity: usize,
    },
    /// The page is free, so it cannot be retained or released (a double free or a use after free).
    #[error(
        "{page} is free: retain or release of a page nobody holds (double free or use after free)"
    )]
    NotAllocated {
        /// The page named.
        page: PageId,
    },
    /// The page's reference count would overflow `u32`.
    #[error("{page} has too many references (u32 overflow)")]
    RefcountOverflow {
        /// The page named.
        page: PageId,
    },
    /// A page size of zero, or a pool of more pages than `u32` can number.
    #[error("invalid pool shape: {0}")]
    InvalidShape(String),
    /// The pool's internal accounting is inconsistent (found by [`PagePool::check_invariants`]).
    #[error("pool invariant violated: {0}")]
    Invariant(String),
}

/// The reference counts and the free list, shared by the pool and its leases.
#[derive(Debug)]
struct Counts {
    refcounts: Vec<u32>,
    free: Vec<u32>,
}

impl Counts {
    fn slot(&self, page: PageId) -> Result<usize, PoolError> {
        let i = page.0 as usize;
        if i >= self.refcounts.len() {
            return Err(PoolError::OutOfRange {
                page,
                capacity: self.refcounts.len(),
            });
        }
        if self.refcounts[i] == 0 {
            return Err(PoolError::NotAllocated { page });
        }
        Ok(i)
    }

    fn alloc(&mut self) -> Option<PageId> {
        let id = self.free.pop()?;
        self.refcounts[id as usize] = 1;
        Some(PageId(id))
    }

    fn retain(&mut self, page: PageId) -> Result<(), PoolError> {
        let i = self.slot(page)?;
        self.refcounts[i] = self.refcounts[i]
            .checked_add(1)
            .ok_or(PoolError::RefcountOverflow { page })?;
        Ok(())
    }

    fn release(&mut self, page: PageId) -> Result<bool, PoolError> {
        let i = self.slot(page)?;
        self.refcounts[i] -= 1;
        if self.refcounts[i] == 0 {
            self.free.push(page.0);
            Ok(true)
        } else {
            Ok(false)
        }
    }
}

/// A fixed set of reference-counted pages, each holding `page_size` tokens of KV.
#[derive(Debug)]
pub struct PagePool {
    page_size: usize,
    capacity: usize,
    counts: Arc<Mutex<Counts>>,
}

/// One reference on a page, released when the lease is dropped (RAII). Taken with
/// [`PagePool::lease_new`] (a fresh page) or [`PagePool::lease`] (one more reference on a used
/// page).
#[derive(Debug)]
pub struct PageLease {
    page: PageId,
    counts: Arc<Mutex<Counts>>,
}

impl PageLease {
    /// The page.
    pub fn id(&self) -> PageId {
        self.page
    }
}

impl Drop for PageLease {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = counts.release(self.page) {
            // Only a bug elsewhere (a release by id of a leased reference) can get here.
            tracing::error!(error = %e, "releasing a page lease failed");
        }
    }
}

impl PagePool {
    /// A pool of `num_pages` pages of `page_size` tokens each, all free.
    ///
    /// Errors if `page_size` is 0 or `num_pages` does not fit a `u32` page id.
    pub fn new(num_pages: usize, page_size: usize) -> Result<Self, PoolError> {
        if page_size == 0 {
            return Err(PoolError::InvalidShape(
                "page_size must be at least 1".into(),
            ));
        }
        if num_pages > u32::MAX as usize {
            return Err(PoolError::InvalidShape(format!(
                "{num_pages} pages do not fit u32 page ids"
            )));
        }
        // Reverse so that `alloc` hands out page 0 first.
        let free = (0..num_pages as u32).rev().collect();
        Ok(Self {
            page_size,
            capacity: num_pages,
            counts: Arc::new(Mutex::new(Counts {
                refcounts: vec![0; num_pages],
                free,
            })),
        })
    }

    /// A pool sized from a memory budget: as many pages as fit `budget_bytes` when one token of
    /// KV (all layers, K and V) takes `bytes_per_token` bytes.
    pub fn from_budget(
        budget_bytes: usize,
        bytes_per_token: usize,
        page_size: usize,
    ) -> Result<Self, PoolError> {
        let page_bytes = bytes_per_token
            .checked_mul(page_size)
            .filter(|&b| b > 0)
            .ok_or_else(|| {
                PoolError::InvalidShape(format!(
                    "page of {page_size} tokens × {bytes_per_token} bytes is empty or overflows"
                ))
            })?;
        Self::new(budget_bytes / page_bytes, page_size)
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The total number of pages.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Pages currently free.
    pub fn free_count(&self) -> usize {
        self.counts().free.len()
    }

    /// Pages currently held by at least one reference.
    pub fn used_count(&self) -> usize {
        self.capacity - self.free_count()
    }

    /// Takes a free page with a reference count of 1, or `None` when the pool is exhausted.
    /// The caller releases it with [`PagePool::release`] (the radix tree's own references).
    pub fn alloc(&mut self) -> Option<PageId> {
        self.counts().alloc()
    }

    /// Takes a free page as a lease, or `None` when the pool is exhausted.
    pub fn lease_new(&self) -> Option<PageLease> {
        let page = self.counts().alloc()?;
        Some(PageLease {
            page,
            counts: self.counts.clone(),
        })
    }

    /// One more reference on a used page, as a lease.
    pub fn lease(&self, page: PageId) -> Result<PageLease, PoolError> {
        self.counts().retain(page)?;
        Ok(PageLease {
            page,
            counts: self.counts.clone(),
        })
    }

    /// Adds a reference to a used page.
    pub fn retain(&mut self, page: PageId) -> Result<(), PoolError> {
        self.counts().retain(page)
    }

    /// Drops a reference; returns `true` when that was the last one and the page is now free.
    pub fn release(&mut self, page: PageId) -> Result<bool, PoolError> {
        self.counts().release(page)
    }

    /// The page's reference count (0 when free), or an error when out of range.
    pub fn refcount(&self, page: PageId) -> Result<u32, PoolError> {
        self.counts()
            .refcounts
            .get(page.0 as usize)
            .copied()
            .ok_or(PoolError::OutOfRange {
                page,
                capacity: self.capacity,
            })
    }

    /// Checks the accounting: every free-list id is in range, listed once and has count 0; every
    /// count-0 page is on the free list; free plus used equals capacity.
    pub fn check_invariants(&self) -> Result<(), PoolError> {
        let counts = self.counts();
        let (refcounts, free) = (&counts.refcounts, &counts.free);
        let mut on_free = vec![false; self.capacity];
        for &id in free {
            let i = id as usize;
            if i >= self.capacity {
                return Err(PoolError::Invariant(format!(
                    "free list holds out-of-range page {id}"
                )));
            }
            if on_free[i] {
                return Err(PoolError::Invariant(format!(
                    "page {id} is on the free list twice"
                )));
            }
            if refcounts[i] != 0 {
                return Err(PoolError::Invariant(format!(
                    "page {id} is free and referenced ({} refs)",
                    refcounts[i]
                )));
            }
            on_free[i] = true;
        }
        for (i, &rc) in refcounts.iter().enumerate() {
            if rc == 0 && !on_free[i] {
                return Err(PoolError::Invariant(format!(
                    "page {i} has no references but is not free (leaked)"
                )));
            }
        }
        let used = refcounts.iter().filter(|&&rc| rc > 0).count();
        if used + free.len() != self.capacity {
            return Err(PoolError::Invariant(format!(
                "used {used} + free {} != capacity {}",
                free.len(),
                self.capacity
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_retain_release_and_double_free() {
        let mut p = PagePool::new(2, 4).unwrap();
        let a = p.alloc().unwrap();
        let b = p.alloc().unwrap();
        assert_eq!(p.alloc(), None);
        assert_eq!((p.free_count(), p.used_count()), (0, 2));
        p.retain(a).unwrap();
        assert!(!p.release(a).unwrap());
        assert!(p.release(a).unwrap());
        assert_eq!(p.release(a), Err(PoolError::NotAllocated { page: a }));
        assert_eq!(p.retain(a), Err(PoolError::NotAllocated { page: a }));
        assert!(matches!(
            p.release(PageId(9)),
            Err(PoolError::OutOfRange { .. })
        ));
        p.check_invariants().unwrap();
        assert!(p.release(b).unwrap());
        assert_eq!(p.free_count(), 2);
        p.check_invariants().unwrap();
    }

    #[test]
    fn leases_release_when_dropped() {
        let p = PagePool::new(2, 4).unwrap();
        let a = p.lease_new().unwrap();
        let again = p.lease(a.id()).unwrap();
        assert_eq!(p.refcount(a.id()).unwrap(), 2);
        let id = a.id();
        drop(a);
        assert_eq!(p.refcount(id).unwrap(), 1);
        drop(again);
        assert_eq!((p.free_count(), p.refcount(id).unwrap()), (2, 0));
        assert!(p.lease(id).is_err(), "a free page cannot be leased");
        p.check_invariants().unwrap();
    }

    #[test]
    fn budget_sizing() {
        let p = PagePool::from_budget(23_040 * 16 * 10 + 5, 23_040, 16).unwrap();
        assert_eq!(p.capacity(), 10);
        assert!(PagePool::new(1, 0).is_err());
    }
}
