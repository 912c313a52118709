//! Input damage for the parsers' fuzz targets (GGUF reader, artifact
//! loader, results-file reader): a valid input changed by byte writes,
//! 8-byte writes (where counts, lengths and offsets live) and a truncation.
//!
//! Why here: every crate's fuzz targets damage inputs the same way, and the
//! deterministic run in CI ([`seeded`]) and the long random runs (bolero,
//! `BOLERO_RANDOM_ITERATIONS=N cargo test --release -- --ignored fuzz_`)
//! share it. Not used outside tests.

/// `seed` with `bytes` and `words` written at positions taken modulo its
/// length, then cut to `cut` (modulo its length + 1).
pub fn mutate(seed: &[u8], bytes: &[(u16, u8)], words: &[(u16, u64)], cut: Option<u16>) -> Vec<u8> {
    let mut b = seed.to_vec();
    if b.is_empty() {
        return b;
    }
    for &(i, v) in bytes {
        let i = i as usize % b.len();
        b[i] = v;
    }
    for &(i, w) in words {
        let i = i as usize % b.len().saturating_sub(7).max(1);
        if i + 8 <= b.len() {
            b[i..i + 8].copy_from_slice(&w.to_le_bytes());
        }
    }
    if let Some(c) = cut {
        b.truncate(c as usize % (b.len() + 1));
    }
    b
}

/// `n` damaged copies of `seed`, the same for the same `rng_seed` (1 to 4
/// byte writes, up to 2 word writes of interesting values, a cut one time
/// in four).
pub fn seeded(seed: &[u8], n: usize, rng_seed: u64) -> impl Iterator<Item = Vec<u8>> + '_ {
    let mut s = rng_seed | 1;
    let mut next = move || {
        // xorshift64*
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    (0..n).map(move |_| {
        let bytes: Vec<(u16, u8)> = (0..1 + next() % 4)
            .map(|_| (next() as u16, next() as u8))
            .collect();
        const WORDS: [u64; 6] = [
            0,
            1,
            u32::MAX as u64,
            u64::MAX,
            1 << 40,
            0x7FF8_0000_0000_0000,
        ];
        let words: Vec<(u16, u64)> = (0..next() % 3)
            .map(|_| (next() as u16, WORDS[(next() % 6) as usize]))
            .collect();
        let cut = (next() % 4 == 0).then(|| next() as u16);
        mutate(seed, &bytes, &words, cut)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_inputs_and_they_differ_from_the_seed() {
        let seed: Vec<u8> = (0..64).collect();
        let a: Vec<_> = seeded(&seed, 50, 7).collect();
        let b: Vec<_> = seeded(&seed, 50, 7).collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|x| *x != seed));
        assert_eq!(mutate(&seed, &[(65, 9)], &[], Some(10)).len(), 10);
    }
}
