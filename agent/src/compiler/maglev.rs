//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4).
//!
//! The table must come out the same on every node for the same backend set,
//! so it depends only on the backends' names: fixed-seed hashes (never std's
//! per-process `RandomState`), names sorted before filling.

/// Default table size: a prime, ~160 slots per backend at 100 backends,
/// which keeps the imbalance under 1% (see [`table`]).
pub const DEFAULT_TABLE_SIZE: u32 = 16381;

// Two seeds give the two independent hashes the paper asks for (offset, skip).
const OFFSET_SEED: u64 = 0x5465_726e_4f66_6673; // "TernOffs"
const SKIP_SEED: u64 = 0x5465_726e_536b_6970; // "TernSkip"

/// Fills a lookup table of `m` slots; each slot holds an index into
/// `backends` as given. The backend *named* in each slot does not depend on
/// the input order.
///
/// Every backend gets `m / N` or `m / N + 1` slots (the fill takes turns), so
/// the share of each differs from the ideal by less than one slot.
///
/// Returns an empty table for no backends.
///
/// # Panics
/// When `m` is not prime: the permutations would not cover the table.
/// Configuration checks the size with [`is_prime`] first.
pub fn table(backends: &[String], m: u32) -> Vec<u32> {
    assert!(is_prime(m), "Maglev table size {m} is not prime");
    if backends.is_empty() {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by(|&a, &b| backends[a].cmp(&backends[b]));

    let m64 = u64::from(m);
    // (offset, skip) per backend, in sorted order; the permutation is
    // offset + j * skip (mod m), full because m is prime and skip < m.
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let name = backends[i].as_bytes();
            (
                hash(OFFSET_SEED, name) % m64,
                hash(SKIP_SEED, name) % (m64 - 1) + 1,
            )
        })
        .collect();
    let mut next = vec![0u64; perms.len()];
    let mut slots = vec![u32::MAX; m as usize];
    let mut filled = 0;
    'fill: loop {
        for (turn, &(offset, skip)) in perms.iter().enumerate() {
            let mut slot = (offset + next[turn] * skip) % m64;
            while slots[slot as usize] != u32::MAX {
                next[turn] += 1;
                slot = (offset + next[turn] * skip) % m64;
            }
            slots[slot as usize] = order[turn] as u32;
            next[turn] += 1;
            filled += 1;
            if filled == m as usize {
                break 'fill;
            }
        }
    }
    slots
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

/// FNV-1a 64 from a seeded basis, then MurmurHash3's fmix64 so that the two
/// seeds give unrelated values (plain FNV with two bases would not).
fn hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = DEFAULT_TABLE_SIZE;
    const PINNED_SMALL_TABLE: [u32; 13] = [2, 0, 0, 0, 1, 2, 0, 0, 1, 2, 1, 1, 2];

    fn names(range: std::ops::Range<u32>) -> Vec<String> {
        names_in(1, range)
    }

    /// Backend names in one of several address plans, so the disruption
    /// tests measure more than one lucky (or unlucky) set.
    fn names_in(plan: u32, range: std::ops::Range<u32>) -> Vec<String> {
        range
            .map(|i| format!("10.{plan}.{}.{}:8080/TCP", i / 250, i % 250 + 1))
            .collect()
    }

    /// The table as backend names, comparable across input orders.
    fn named(backends: &[String], m: u32) -> Vec<String> {
        table(backends, m)
            .into_iter()
            .map(|i| backends[i as usize].clone())
            .collect()
    }

    /// Fraction of slots whose backend differs between two tables.
    fn moved(before: &[String], after: &[String]) -> f64 {
        let changed = before.iter().zip(after).filter(|(a, b)| a != b).count();
        changed as f64 / before.len() as f64
    }

    #[test]
    fn primes() {
        assert!(is_prime(M) && is_prime(2) && is_prime(65537));
        assert!(!is_prime(0) && !is_prime(1) && !is_prime(16383) && !is_prime(65535));
    }

    #[test]
    fn same_set_in_any_order_gives_the_same_table() {
        let sorted = names(0..7);
        let mut shuffled = sorted.clone();
        shuffled.reverse();
        shuffled.swap(1, 4);
        assert_eq!(named(&sorted, M), named(&shuffled, M));
        // Sorted input: the index tables themselves are equal too.
        assert_eq!(table(&sorted, M), table(&sorted.clone(), M));
        // Pinned values: a change here would break cross-version agreement
        // between agents during a rolling upgrade.
        assert_eq!(hash(OFFSET_SEED, b"10.0.0.1:80/TCP"), 0xe31b_bea0_13d4_f0fc);
        assert_eq!(table(&names(0..3), 13), PINNED_SMALL_TABLE);
    }

    #[test]
    fn each_backend_gets_m_over_n_slots_within_one() {
        for n in [1u32, 3, 10, 100, 1000] {
            let backends = names(0..n);
            let mut counts = vec![0u32; n as usize];
            for i in table(&backends, M) {
                counts[i as usize] += 1;
            }
            let (lo, hi) = (M / n, M.div_ceil(n));
            assert!(
                counts.iter().all(|c| (lo..=hi).contains(c)),
                "n={n}: {counts:?}"
            );
        }
        assert!(table(&[], M).is_empty());
        assert_eq!(table(&names(0..1), 7), vec![0; 7]);
    }

    const PLANS: std::ops::Range<u32> = 1..9;

    #[test]
    fn adding_a_backend_moves_about_one_in_n_plus_one() {
        for n in [10u32, 100] {
            let ideal = 1.0 / f64::from(n + 1);
            let fractions: Vec<f64> = PLANS
                .map(|plan| {
                    let before = named(&names_in(plan, 0..n), M);
                    let after = named(&names_in(plan, 0..n + 1), M);
                    moved(&before, &after)
                })
                .collect();
            let worst = fractions.iter().copied().fold(0.0, f64::max);
            let mean = fractions.iter().sum::<f64>() / fractions.len() as f64;
            println!(
                "maglev add N={n}: moved mean {mean:.4} worst {worst:.4}, 1/(N+1) = {ideal:.4}"
            );
            assert!(worst <= ideal + 0.02, "N={n}: moved {fractions:?}");
        }
    }

    #[test]
    fn removing_a_backend_moves_little_beyond_its_own_slots() {
        for n in [10u32, 100] {
            let collateral: Vec<f64> = PLANS
                .map(|plan| {
                    let all = names_in(plan, 0..n);
                    let victim = &all[(plan * 7 % n) as usize];
                    let rest: Vec<String> = all.iter().filter(|b| *b != victim).cloned().collect();
                    let before = named(&all, M);
                    let after = named(&rest, M);
                    let others_moved = before
                        .iter()
                        .zip(&after)
                        .filter(|(b, a)| *b != victim && b != a)
                        .count();
                    others_moved as f64 / f64::from(M)
                })
                .collect();
            let worst = collateral.iter().copied().fold(0.0, f64::max);
            let mean = collateral.iter().sum::<f64>() / collateral.len() as f64;
            println!(
                "maglev remove N={n}: other backends' slots moved mean {mean:.4} worst {worst:.4}"
            );
            assert!(worst <= 0.02, "N={n}: collateral {collateral:?}");
        }
    }
}
