//! The device tiers in front of an [`ExpertProvider`](moeflux_core::ExpertProvider): a VRAM
//! cache of expert records (one allocation of fixed slots, frequency-aware LRU) and the
//! page-locking of the provider's host slab so copies from it are DMA.
//!
//! The slot policy ([`SlotTable`]) is plain host code, unit-tested without a device. Slots a
//! running op needs are *locked* for that op (its epoch): eviction never picks them, so a copy
//! into an evicted slot can never overwrite a record a queued kernel of the same op reads.
//! Kernels of earlier ops are finished by the time a slot is evicted: the streamed op
//! synchronises the compute stream on its routing read-back before it claims any slot.

use std::collections::{BTreeSet, HashMap};

use cudarc::driver::sys;

/// Whether missed experts may be computed on the CPU from the host record instead of being
/// copied to the device (`MOEFLUX_CPU_MISSES=0|1|auto`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuMisses {
    /// Every miss is copied to the device.
    Off,
    /// Testing: half of each op's misses (rounded up) are computed on the CPU, whatever the
    /// cost, at any batch size.
    On,
    /// At decode (at most 2 tokens), misses are split between copy and CPU so both finish at
    /// about the same time, from the measured host->device and CPU expert bandwidths.
    #[default]
    Auto,
}

impl std::str::FromStr for CpuMisses {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "0" | "off" => Ok(CpuMisses::Off),
            "1" | "on" => Ok(CpuMisses::On),
            "auto" | "" => Ok(CpuMisses::Auto),
            o => Err(format!("'{o}' is not a CPU-miss mode (0, 1 or auto)")),
        }
    }
}

/// (layer, expert)
pub(crate) type Key = (usize, usize);

#[derive(Clone, Debug, Default)]
struct Slot {
    key: Option<Key>,
    last_use: u64,
    uses: u32,
    /// Epoch of the op that needs this slot; never evicted while it equals the current one.
    lock: u64,
    /// Copied ahead of need and not used yet.
    prefetched: bool,
}

/// Which record sits in which slot, and which slot to evict next. Score of an occupied slot:
/// last use + a bonus per past use (capped), like the host cache: experts the router keeps
/// coming back to outlive one-off visitors.
#[derive(Debug)]
pub(crate) struct SlotTable {
    slots: Vec<Slot>,
    map: HashMap<Key, usize>,
    free: Vec<usize>,
    /// (score, slot) of every occupied slot.
    order: BTreeSet<(u64, usize)>,
    clock: u64,
    epoch: u64,
}

impl SlotTable {
    pub fn new(n: usize) -> Self {
        SlotTable {
            slots: vec![Slot::default(); n],
            map: HashMap::new(),
            free: (0..n).rev().collect(),
            order: BTreeSet::new(),
            clock: 0,
            epoch: 1,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    fn score(&self, s: usize) -> u64 {
        let sl = &self.slots[s];
        sl.last_use + self.slots.len() as u64 * sl.uses.min(8) as u64
    }

    /// Starts a new op: slots locked by the previous one become evictable.
    pub fn begin_op(&mut self) {
        self.epoch += 1;
    }

    /// The slot holding `key`, touched and locked for this op, and whether it had been
    /// prefetched and not used yet.
    pub fn lookup(&mut self, key: Key) -> Option<(usize, bool)> {
        let s = *self.map.get(&key)?;
        self.clock += 1;
        self.order.remove(&(self.score(s), s));
        let sl = &mut self.slots[s];
        sl.last_use = self.clock;
        sl.uses = sl.uses.saturating_add(1);
        sl.lock = self.epoch;
        let pre = std::mem::take(&mut sl.prefetched);
        self.order.insert((self.score(s), s));
        Some((s, pre))
    }

    pub fn contains(&self, key: Key) -> bool {
        self.map.contains_key(&key)
    }

    /// Locks the slot of `key` for this op without counting a use (a predicted record that is
    /// already resident must survive this op's prefetches).
    pub fn lock(&mut self, key: Key) {
        if let Some(&s) = self.map.get(&key) {
            self.slots[s].lock = self.epoch;
        }
    }

    /// A slot for `key` (not present): a free one, else the lowest-scoring unlocked one,
    /// evicted. The slot is locked for this op. `None` when every slot is locked.
    pub fn claim(&mut self, key: Key, prefetched: bool) -> Option<usize> {
        debug_assert!(!self.map.contains_key(&key));
        let s = match self.free.pop() {
            Some(s) => s,
            None => {
                let epoch = self.epoch;
                let &(sc, s) = self
                    .order
                    .iter()
                    .find(|(_, s)| self.slots[*s].lock != epoch)?;
                self.order.remove(&(sc, s));
                if let Some(old) = self.slots[s].key.take() {
                    self.map.remove(&old);
                }
                s
            }
        };
        self.clock += 1;
        self.slots[s] = Slot {
            key: Some(key),
            last_use: self.clock,
            uses: 0,
            lock: self.epoch,
            prefetched,
        };
        self.map.insert(key, s);
        self.order.insert((self.score(s), s));
        Some(s)
    }

    /// Forgets the record in slot `s` (its copy was never issued).
    pub fn invalidate(&mut self, s: usize) {
        if let Some(k) = self.slots[s].key.take() {
            self.order.remove(&(self.score(s), s));
            self.map.remove(&k);
            self.slots[s] = Slot::default();
            self.free.push(s);
        }
    }

    /// Whether slot `s` is locked by the current op.
    #[cfg(test)]
    fn locked(&self, s: usize) -> bool {
        self.slots[s].lock == self.epoch
    }
}

/// Page-locks `len` bytes at `addr` with `cuMemHostRegister` (portable); `Err` carries why
/// not. The caller must bind the context and unregister before the memory is unmapped.
pub(crate) fn register_host(addr: usize, len: usize) -> Result<(), String> {
    if addr == 0 || len == 0 {
        return Err("empty range".into());
    }
    if let Some(avail) = mem_available() {
        // Page-locking commits every page: refuse rather than push the machine into OOM.
        if len as u64 > avail / 10 * 9 {
            return Err(format!(
                "the slab ({len} bytes) exceeds 90% of available memory ({avail} bytes)"
            ));
        }
    }
    // SAFETY: addr..addr+len is a live mapping owned by the provider, which the caller keeps
    // alive (it holds the provider) until `unregister_host`.
    unsafe {
        sys::cuMemHostRegister_v2(
            addr as *mut std::ffi::c_void,
            len,
            sys::CU_MEMHOSTREGISTER_PORTABLE,
        )
    }
    .result()
    .map_err(|e| format!("cuMemHostRegister failed: {e}"))
}

/// Undoes [`register_host`].
pub(crate) fn unregister_host(addr: usize) -> Result<(), String> {
    // SAFETY: addr was registered by register_host and its mapping is still alive.
    unsafe { sys::cuMemHostUnregister(addr as *mut std::ffi::c_void) }
        .result()
        .map_err(|e| format!("cuMemHostUnregister failed: {e}"))
}

/// Page-locked host memory for small device -> host reads (the routing of a streamed op):
/// into pageable memory the driver stages the copy and blocks; into this it is one DMA.
/// Grows on demand; freed on drop (the owner keeps the context alive and idle by then).
pub(crate) struct HostBuf {
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: the buffer is plain host memory owned by this value; no aliasing pointer escapes
// beyond the borrows `slice_mut` hands out.
unsafe impl Send for HostBuf {}

impl HostBuf {
    pub(crate) const fn empty() -> Self {
        HostBuf {
            ptr: std::ptr::null_mut(),
            bytes: 0,
        }
    }

    /// At least `bytes` of page-locked memory, as `T`s (the contents are unspecified).
    pub(crate) fn slice_mut<T: Copy>(
        &mut self,
        len: usize,
    ) -> Result<&mut [T], cudarc::driver::DriverError> {
        let bytes = len * std::mem::size_of::<T>();
        if bytes > self.bytes {
            self.free();
            let want = bytes.next_power_of_two().max(4096);
            // SAFETY: cuMemHostAlloc with no flags; the context is bound (the caller encodes).
            let p = unsafe { cudarc::driver::result::malloc_host(want, 0) }?;
            self.ptr = p as *mut u8;
            self.bytes = want;
        }
        debug_assert!((self.ptr as usize).is_multiple_of(std::mem::align_of::<T>()));
        // SAFETY: ptr holds >= bytes bytes, page-aligned; T is plain data (Copy) and any bit
        // pattern is read only after a device copy wrote it.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut T, len) })
    }

    fn free(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: allocated by malloc_host above and not freed since.
            let _ = unsafe { cudarc::driver::result::free_host(self.ptr as *mut std::ffi::c_void) };
            self.ptr = std::ptr::null_mut();
            self.bytes = 0;
        }
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        self.free();
    }
}

/// `MemAvailable` of /proc/meminfo in bytes (Linux).
fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What the CPU expert path costs, as measured in this run: a lone record takes `t1` seconds
/// (its rows spread over the pool, so it pays the pool's wake-up and split), each further
/// record of the same op `per` more. Fed by every op that computes misses on the CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct CpuCost {
    pub(crate) t1: Option<f64>,
    pub(crate) per: Option<f64>,
}

impl CpuCost {
    /// A fixed rate (bytes/s) for records of `record` bytes, without a fixed cost.
    pub(crate) fn fixed(record: usize, bw: f64) -> Self {
        let per = record as f64 / bw.max(1.0);
        CpuCost {
            t1: Some(per),
            per: Some(per),
        }
    }

    /// One op computed `m` records in `secs` (moving averages, half-life of one op).
    pub(crate) fn observe(&mut self, m: usize, secs: f64) {
        let ema = |old: Option<f64>, v: f64| Some(old.map_or(v, |o| 0.5 * o + 0.5 * v));
        match (m, self.t1) {
            (0, _) => {}
            (1, _) => self.t1 = ema(self.t1, secs),
            (_, None) => {
                let per = secs / m as f64;
                self.t1 = Some(per);
                self.per = ema(self.per, per);
            }
            (_, Some(t1)) => {
                // the marginal cost of a record, not below a quarter of the average (noise)
                let per = ((secs - t1) / (m - 1) as f64).max(0.25 * secs / m as f64);
                self.per = ema(self.per, per);
            }
        }
    }

    /// Seconds for `m` records in one op (a record's marginal cost is taken as `t1` until
    /// one op of two or more has been seen).
    pub(crate) fn secs(&self, m: usize) -> Option<f64> {
        let t1 = self.t1?;
        Some(match m {
            0 => 0.0,
            _ => t1 + (m - 1) as f64 * self.per.unwrap_or(t1),
        })
    }
}

/// How many of `misses` records to compute on the CPU while the rest are copied (`copy`
/// seconds each, serial on the copy engine): the count that makes the later of the two
/// finish first. `explore` (every few ops) tries one more than that, so the costs of larger
/// shares keep being measured (a model that only ever saw one record per op would never
/// learn what a second costs).
pub(crate) fn cpu_share(
    mode: CpuMisses,
    misses: usize,
    n: usize,
    copy: f64,
    cost: &CpuCost,
    explore: bool,
) -> usize {
    match mode {
        CpuMisses::Off => 0,
        CpuMisses::On => misses.div_ceil(2),
        CpuMisses::Auto => {
            if n > 2 || misses == 0 || copy <= 0.0 || cost.t1.is_none() {
                return 0;
            }
            let time = |m: usize| {
                let cpu = cost.secs(m).unwrap_or(f64::INFINITY);
                ((misses - m) as f64 * copy).max(cpu)
            };
            let best = (0..=misses)
                .min_by(|&a, &b| time(a).total_cmp(&time(b)))
                .unwrap_or(0);
            if explore {
                (best + 1).min(misses)
            } else {
                best
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locked_slots_are_never_evicted() {
        let mut t = SlotTable::new(3);
        t.begin_op();
        let a = t.claim((0, 1), false).unwrap();
        let b = t.claim((0, 2), false).unwrap();
        let c = t.claim((0, 3), false).unwrap();
        assert!(t.locked(a) && t.locked(b) && t.locked(c));
        // all three are needed by this op: nothing may be evicted
        assert_eq!(t.claim((0, 4), false), None);
        t.begin_op();
        // hits lock their slot; only the unlocked one is evicted
        assert_eq!(t.lookup((0, 1)).unwrap().0, a);
        assert_eq!(t.lookup((0, 3)).unwrap().0, c);
        assert_eq!(t.claim((0, 4), false), Some(b));
        assert!(!t.contains((0, 2)));
        assert_eq!(t.claim((0, 5), false), None);
    }

    #[test]
    fn frequent_experts_outlive_one_off_visitors() {
        let mut t = SlotTable::new(4);
        for _ in 0..5 {
            t.begin_op();
            if t.lookup((1, 0)).is_none() {
                t.claim((1, 0), false).unwrap();
            }
        }
        // a stream of one-off experts never pushes out the hot one
        for e in 1..11 {
            t.begin_op();
            t.claim((1, e), false).unwrap();
        }
        assert!(t.contains((1, 0)));
    }

    #[test]
    fn prefetched_flag_reported_once_and_invalidate_frees() {
        let mut t = SlotTable::new(2);
        let s = t.claim((2, 7), true).unwrap();
        assert_eq!(t.lookup((2, 7)), Some((s, true)));
        assert_eq!(t.lookup((2, 7)), Some((s, false)));
        t.invalidate(s);
        assert!(!t.contains((2, 7)));
        t.begin_op();
        assert!(t.claim((2, 8), false).is_some());
        assert!(t.claim((2, 9), false).is_some());
    }

    #[test]
    fn cpu_share_balances_copy_and_cpu_time() {
        let flat = |per: f64| CpuCost {
            t1: Some(per),
            per: Some(per),
        };
        // equal speeds: half the misses each
        assert_eq!(cpu_share(CpuMisses::Auto, 10, 1, 1.0, &flat(1.0), false), 5);
        // copies 3x faster than the CPU: a quarter on the CPU
        assert_eq!(cpu_share(CpuMisses::Auto, 8, 1, 1.0, &flat(3.0), false), 2);
        assert_eq!(cpu_share(CpuMisses::Auto, 8, 64, 1.0, &flat(3.0), false), 0);
        assert_eq!(
            cpu_share(CpuMisses::Auto, 8, 1, 1.0, &CpuCost::default(), false),
            0
        );
        assert_eq!(cpu_share(CpuMisses::Off, 8, 1, 1.0, &flat(1e-9), false), 0);
        assert_eq!(
            cpu_share(CpuMisses::On, 3, 100, 1.0, &CpuCost::default(), false),
            2
        );
        // a large fixed cost but cheap further records: worth it only for several at once
        let wake = CpuCost {
            t1: Some(4.0),
            per: Some(0.25),
        };
        assert_eq!(cpu_share(CpuMisses::Auto, 2, 1, 1.0, &wake, false), 0);
        assert_eq!(cpu_share(CpuMisses::Auto, 10, 1, 1.0, &wake, false), 5);
        // exploring asks for one more, never more than the misses
        assert_eq!(cpu_share(CpuMisses::Auto, 2, 1, 1.0, &wake, true), 1);
        assert_eq!(cpu_share(CpuMisses::Auto, 1, 1, 1.0, &flat(0.1), true), 1);
        assert_eq!("auto".parse::<CpuMisses>(), Ok(CpuMisses::Auto));
        assert!("maybe".parse::<CpuMisses>().is_err());
    }

    #[test]
    fn cpu_cost_learns_the_fixed_and_the_marginal_cost() {
        let mut c = CpuCost::default();
        assert_eq!(c.secs(3), None);
        c.observe(1, 5.0);
        // until a larger op is seen, a record costs what a lone one did
        assert_eq!(c.secs(3), Some(15.0));
        c.observe(3, 7.0);
        assert_eq!(c.secs(1), Some(5.0));
        assert_eq!(c.secs(3), Some(7.0));
        assert_eq!(c.secs(0), Some(0.0));
        assert_eq!(CpuCost::fixed(100, 50.0).secs(2), Some(4.0));
    }
}
