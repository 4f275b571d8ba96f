//! Lifetime planner: lets transient buffers whose lifetimes do not overlap share storage.
//!
//! Pure and deterministic: the same graph and sizes always give the same plan. Only
//! buffers the caller declares aliasable (transient ones) are considered, and of those
//! only the ones whose first access in the graph is a write: a buffer read before it is
//! written carries data from outside the graph (an upload) and must keep its own storage.
//! Lifetimes are closed intervals of op indices; two buffers may share a slot only when
//! one's last use comes strictly before the other's first, so an op never reads and
//! writes the same storage through two different ids.

use std::collections::BTreeMap;

use crate::buf::RawBufId;
use crate::op::Graph;

/// How an op touches a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

/// Result of planning: which slot each aliased buffer lives in and each slot's size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub slot_of: BTreeMap<RawBufId, usize>,
    pub slot_bytes: Vec<usize>,
    /// `(first, last)` op index of every planned buffer, kept for checks and debugging.
    pub lifetimes: BTreeMap<RawBufId, (usize, usize)>,
}

impl Plan {
    /// Plans `graph`. `aliasable(id)` returns the buffer's size when the buffer may share
    /// storage (a transient), `None` otherwise.
    pub fn build(graph: &Graph, aliasable: &dyn Fn(RawBufId) -> Option<usize>) -> Plan {
        let mut first: BTreeMap<RawBufId, (usize, Access)> = BTreeMap::new();
        let mut last: BTreeMap<RawBufId, usize> = BTreeMap::new();
        for (t, op) in graph.ops().enumerate() {
            op.for_each_access(&mut |id, acc, _| {
                if aliasable(id).is_none() {
                    return;
                }
                first.entry(id).or_insert((t, acc));
                last.insert(id, t);
            });
        }
        let mut order: Vec<(usize, RawBufId)> = first
            .iter()
            .filter(|(_, (_, acc))| *acc == Access::Write)
            .map(|(id, (t, _))| (*t, *id))
            .collect();
        order.sort();

        let mut plan = Plan::default();
        // busy_until[slot] = last op index of the slot's current occupant.
        let mut busy_until: Vec<usize> = Vec::new();
        for (start, id) in order {
            let need = aliasable(id).unwrap_or(0);
            let end = last[&id];
            let free = |s: usize| busy_until[s] < start;
            let best_fit = (0..plan.slot_bytes.len())
                .filter(|&s| free(s) && plan.slot_bytes[s] >= need)
                .min_by_key(|&s| (plan.slot_bytes[s], s));
            let slot = match best_fit {
                Some(s) => s,
                None => match (0..plan.slot_bytes.len())
                    .filter(|&s| free(s))
                    .max_by_key(|&s| (plan.slot_bytes[s], usize::MAX - s))
                {
                    Some(s) => {
                        plan.slot_bytes[s] = need;
                        s
                    }
                    None => {
                        plan.slot_bytes.push(need);
                        busy_until.push(0);
                        plan.slot_bytes.len() - 1
                    }
                },
            };
            busy_until[slot] = end;
            plan.slot_of.insert(id, slot);
            plan.lifetimes.insert(id, (start, end));
        }
        plan
    }

    /// Total bytes of all slots.
    pub fn total_bytes(&self) -> usize {
        self.slot_bytes.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::{Act, BufId};
    use crate::op::Op;
    use proptest::prelude::*;

    fn act(i: u32) -> BufId<Act> {
        BufId::from_raw(RawBufId(i))
    }

    fn chain(n: u32) -> Graph {
        // a0 -> a1 -> a2 ... each op reads i, writes i+1
        let mut g = Graph::new("chain");
        for i in 0..n {
            g.push(
                None,
                "add",
                Op::Add {
                    a: act(i),
                    b: act(i),
                    out: act(i + 1),
                    len: 4,
                },
            );
        }
        g
    }

    #[test]
    fn chain_reuses_two_slots() {
        let g = chain(6);
        // buffer 0 is read first: external, never planned.
        let plan = Plan::build(&g, &|_| Some(16));
        assert!(!plan.slot_of.contains_key(&RawBufId(0)));
        assert_eq!(plan.slot_bytes.len(), 2, "{plan:?}");
        assert_ne!(plan.slot_of[&RawBufId(1)], plan.slot_of[&RawBufId(2)]);
        assert_eq!(plan.slot_of[&RawBufId(1)], plan.slot_of[&RawBufId(3)]);
    }

    #[test]
    fn persistent_never_planned_and_deterministic() {
        let g = chain(5);
        let aliasable = |id: RawBufId| {
            if id.0 == 3 {
                None
            } else {
                Some(8 * (id.0 as usize + 1))
            }
        };
        let p1 = Plan::build(&g, &aliasable);
        let p2 = Plan::build(&g, &aliasable);
        assert_eq!(p1, p2);
        assert!(!p1.slot_of.contains_key(&RawBufId(3)));
        // Planning is pure: running it again on the same inputs is safe.
        for (id, s) in &p1.slot_of {
            assert!(p1.slot_bytes[*s] >= aliasable(*id).unwrap());
        }
    }

    proptest! {
        #[test]
        fn no_two_live_buffers_share_a_slot(
            ops in prop::collection::vec((0u32..12, 0u32..12, 0u32..12), 1..40),
            sizes in prop::collection::vec(1usize..64, 12),
            pinned in prop::collection::vec(any::<bool>(), 12),
        ) {
            let mut g = Graph::new("random");
            for (a, b, o) in &ops {
                g.push(None, "add", Op::Add { a: act(*a), b: act(*b), out: act(*o), len: 1 });
            }
            let aliasable = |id: RawBufId| if pinned[id.0 as usize] { None } else { Some(sizes[id.0 as usize]) };
            let plan = Plan::build(&g, &aliasable);
            // recompute true lifetimes from the graph
            let mut life: BTreeMap<RawBufId, (usize, usize)> = BTreeMap::new();
            for (t, op) in g.ops().enumerate() {
                op.for_each_access(&mut |id, _, _| {
                    let e = life.entry(id).or_insert((t, t));
                    e.1 = t;
                });
            }
            for (id, slot) in &plan.slot_of {
                prop_assert!(!pinned[id.0 as usize], "pinned buffer planned");
                prop_assert!(plan.slot_bytes[*slot] >= sizes[id.0 as usize]);
                prop_assert_eq!(plan.lifetimes[id], life[id]);
            }
            let ids: Vec<_> = plan.slot_of.keys().copied().collect();
            for (i, x) in ids.iter().enumerate() {
                for y in &ids[i + 1..] {
                    if plan.slot_of[x] == plan.slot_of[y] {
                        let (a0, a1) = life[x];
                        let (b0, b1) = life[y];
                        prop_assert!(a1 < b0 || b1 < a0, "{:?} {:?} overlap in one slot", x, y);
                    }
                }
            }
            prop_assert_eq!(Plan::build(&g, &aliasable), plan);
        }
    }
}
