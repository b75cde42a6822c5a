//! The lookup tables of the IPVS schedulers that pick by table (the
//! datapath does the rest): wrr's interleaved sequence, sh's and dh's hash
//! buckets. Each table holds indexes into the frontend's backends, built
//! the way IPVS builds its own (net/netfilter/ipvs/ip_vs_{wrr,sh,dh}.c), so
//! a backend's share of the table is its share of new connections.

use tern_common::LB_TABLE_MAX;
use tern_common::lb_algorithm::HASH_BUCKETS;

/// wrr: IPVS's interleaved weighted round robin, one full cycle. The
/// current weight starts at the largest and drops by the weights' gcd each
/// pass; a pass takes, in order, every backend weighing at least it. Each
/// backend appears weight / gcd times. Weights must be > 0.
///
/// A cycle longer than the table scales all weights down (halving, never
/// below 1) until it fits: shares then stay within a few percent.
pub fn wrr_sequence(weights: &[u32]) -> Vec<u32> {
    let mut weights = weights.to_vec();
    while cycle_len(&weights) > LB_TABLE_MAX as u64 {
        for w in &mut weights {
            *w = (*w / 2).max(1);
        }
    }
    let Some(&max) = weights.iter().max() else {
        return Vec::new();
    };
    let step = weights.iter().copied().fold(0, gcd).max(1);
    let mut sequence = Vec::new();
    let mut current = max;
    while current > 0 {
        for (i, &w) in weights.iter().enumerate() {
            if w >= current {
                sequence.push(i as u32);
            }
        }
        current = current.saturating_sub(step);
    }
    sequence
}

fn cycle_len(weights: &[u32]) -> u64 {
    let step = u64::from(weights.iter().copied().fold(0, gcd).max(1));
    weights.iter().map(|&w| u64::from(w) / step).sum()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// sh: 256 buckets filled in turn, each backend taking as many
/// consecutive buckets as its weight, round and round (so a backend's
/// share of clients is its share of the weights, up to rounding).
/// Weights must be > 0.
pub fn sh_table(weights: &[u32]) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    let mut table = Vec::with_capacity(usize::from(HASH_BUCKETS));
    let (mut backend, mut taken) = (0, 0);
    while table.len() < usize::from(HASH_BUCKETS) {
        table.push(backend as u32);
        taken += 1;
        if taken >= weights[backend] {
            backend = (backend + 1) % weights.len();
            taken = 0;
        }
    }
    table
}

/// dh: 256 buckets dealt to the backends one each in turn (IPVS's dh
/// ignores weights beyond excluding weight 0).
pub fn dh_table(backends: usize) -> Vec<u32> {
    if backends == 0 {
        return Vec::new();
    }
    (0..HASH_BUCKETS)
        .map(|bucket| (usize::from(bucket) % backends) as u32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(table: &[u32], backends: usize) -> Vec<usize> {
        let mut counts = vec![0; backends];
        for &i in table {
            counts[i as usize] += 1;
        }
        counts
    }

    #[test]
    fn wrr_is_the_ipvs_interleaved_sequence() {
        // IPVS with weights 4, 3, 2 schedules A A B A B C A B C.
        assert_eq!(wrr_sequence(&[4, 3, 2]), [0, 0, 1, 0, 1, 2, 0, 1, 2]);
        // Equal weights: plain round robin.
        assert_eq!(wrr_sequence(&[5, 5, 5]), [0, 1, 2]);
        // The gcd shortens the cycle: 6:4 is 3:2.
        assert_eq!(wrr_sequence(&[6, 4]), [0, 0, 1, 0, 1]);
        assert_eq!(wrr_sequence(&[]), Vec::<u32>::new());
    }

    #[test]
    fn wrr_too_long_a_cycle_is_scaled_down_to_fit() {
        let weights = [65_535, 40_000, 1];
        let sequence = wrr_sequence(&weights);
        assert!(sequence.len() <= LB_TABLE_MAX, "{}", sequence.len());
        let counts = shares(&sequence, 3);
        let ratio = counts[0] as f64 / counts[1] as f64;
        assert!((ratio - 65_535.0 / 40_000.0).abs() < 0.02, "{counts:?}");
        assert!(counts[2] >= 1, "every backend keeps a turn: {counts:?}");
    }

    #[test]
    fn sh_buckets_follow_the_weights_in_runs() {
        let table = sh_table(&[3, 1]);
        assert_eq!(table.len(), 256);
        assert_eq!(&table[..8], [0, 0, 0, 1, 0, 0, 0, 1]);
        assert_eq!(shares(&table, 2), [192, 64]);
        assert_eq!(shares(&sh_table(&[1, 1, 1]), 3), [86, 85, 85]);
        assert!(sh_table(&[]).is_empty());
    }

    #[test]
    fn dh_buckets_are_dealt_in_turn() {
        let table = dh_table(3);
        assert_eq!(&table[..5], [0, 1, 2, 0, 1]);
        assert_eq!(shares(&table, 3), [86, 85, 85]);
        assert!(dh_table(0).is_empty());
    }
}
