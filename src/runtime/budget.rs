//! One memory budget for the record batches in flight between components of a pipeline.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::observe::names;

/// Granularity of reservations: 64 KiB.
const UNIT: u64 = 64 << 10;

/// Caps the bytes of batches that have been read and not yet consumed by every sink.
///
/// Sources reserve a batch's size before sending it and wait while the budget is spent, so a slow
/// sink slows the sources down instead of memory growing with the backlog.
#[derive(Clone)]
pub struct MemoryBudget {
    sem: Arc<Semaphore>,
    units: u32,
}

/// A share of the budget, given back when dropped.
pub struct MemoryReservation {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
}

impl Drop for MemoryReservation {
    fn drop(&mut self) {
        metrics::gauge!(names::MEMORY_USED_BYTES).decrement(self.bytes as f64);
    }
}

impl MemoryBudget {
    /// A budget of `bytes` (at least one 64 KiB unit).
    pub fn new(bytes: u64) -> Self {
        let units = (bytes / UNIT).clamp(1, u64::from(u32::MAX >> 4)) as u32;
        metrics::gauge!(names::MEMORY_BUDGET_BYTES).set((u64::from(units) * UNIT) as f64);
        MemoryBudget { sem: Arc::new(Semaphore::new(units as usize)), units }
    }

    /// Waits until `bytes` fit in the budget and reserves them. A request larger than the whole
    /// budget waits for the whole budget, so one huge batch still makes progress alone.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is reserved until the future completes.
    pub async fn reserve(&self, bytes: u64) -> MemoryReservation {
        let units = bytes.div_ceil(UNIT).clamp(1, u64::from(self.units)) as u32;
        let permit = self.sem.clone().acquire_many_owned(units).await.expect("the budget semaphore is never closed");
        let bytes = u64::from(units) * UNIT;
        metrics::gauge!(names::MEMORY_USED_BYTES).increment(bytes as f64);
        MemoryReservation { _permit: permit, bytes }
    }

    /// Bytes currently reserved.
    pub fn used(&self) -> u64 {
        u64::from(self.units - self.sem.available_permits() as u32) * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn reservations_wait_for_room_and_release_on_drop() {
        let budget = MemoryBudget::new(4 * UNIT);
        let a = budget.reserve(3 * UNIT).await;
        assert_eq!(budget.used(), 3 * UNIT);
        let blocked = tokio::time::timeout(Duration::from_millis(50), budget.reserve(2 * UNIT)).await;
        assert!(blocked.is_err(), "a reservation beyond the budget must wait");
        drop(a);
        let b = tokio::time::timeout(Duration::from_secs(1), budget.reserve(2 * UNIT)).await.unwrap();
        assert_eq!(budget.used(), 2 * UNIT);
        drop(b);
        let huge = budget.reserve(1 << 40).await;
        assert_eq!(budget.used(), 4 * UNIT, "oversized requests take the whole budget, not more");
        drop(huge);
    }
}
