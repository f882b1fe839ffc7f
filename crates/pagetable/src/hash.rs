//! Hash functions from a virtual page number to a 64-bit hash.
//!
//! The table takes its bucket index from the hash's low bits and an 16-bit tag from its top bits,
//! so a hasher must spread both. The design note lists "change hash function" as an open question:
//! the hasher is a type parameter so the benchmarks can compare them.

/// Maps a virtual page number to a well-mixed 64-bit hash.
pub trait VpnHasher: Default + Send + Sync + 'static {
    /// The hash of `vpn`: low bits choose the bucket, the top 16 bits are the slot tag.
    fn hash(&self, vpn: u64) -> u64;
}

/// The hash a [`crate::PageTable`] uses unless told otherwise: [`FoldMul`]. Its one widening
/// multiply is 7 instructions fewer than [`Fmix64`] on every lookup (issue 18), and it mixes every
/// input bit into both the bucket bits and the tag.
pub type DefaultHash = FoldMul;

/// MurmurHash3's 64-bit finaliser: full avalanche in two multiplies (the default before issue 18).
#[derive(Clone, Copy, Debug, Default)]
pub struct Fmix64;

impl VpnHasher for Fmix64 {
    #[inline]
    fn hash(&self, vpn: u64) -> u64 {
        let mut h = vpn;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 33;
        h
    }
}

/// Fibonacci (multiplicative) hashing: one multiply by 2^64/phi. The product's well-mixed high
/// half is rotated into the low bits that choose the bucket. Cheaper than [`Fmix64`], weaker on
/// adversarial strides.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fibonacci;

impl VpnHasher for Fibonacci {
    #[inline]
    fn hash(&self, vpn: u64) -> u64 {
        vpn.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(32)
    }
}

/// A folded multiply: the 128-bit product of the page number and an odd constant, its halves
/// xored together (foldhash's and wyhash's mixing step). One widening multiply: the high half
/// carries every input bit into the top bits (the tag), the low half into the bottom (the bucket).
#[derive(Clone, Copy, Debug, Default)]
pub struct FoldMul;

impl VpnHasher for FoldMul {
    #[inline]
    fn hash(&self, vpn: u64) -> u64 {
        let m = u128::from(vpn ^ 0x243f_6a88_85a3_08d3) * 0x9e37_79b9_7f4a_7c15;
        #[allow(clippy::cast_possible_truncation)] // the two halves of the product
        let h = (m as u64) ^ ((m >> 64) as u64);
        h
    }
}

/// The 2022 prototype's hash, `vaddr % 2^20` on page-aligned 4 KiB addresses: only 256 distinct
/// values. Kept to prove that even the worst hash loses no mapping (everything lands in overflow
/// chains), and to show in the benchmarks what it costs. Never use it for real work.
#[derive(Clone, Copy, Debug, Default)]
pub struct PrototypeModulo;

impl VpnHasher for PrototypeModulo {
    #[inline]
    fn hash(&self, vpn: u64) -> u64 {
        (vpn << 12) % (1 << 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn distinct_buckets<H: VpnHasher>(h: &H, vpns: impl Iterator<Item = u64>, bits: u32) -> usize {
        let mut seen = alloc::vec![false; 1 << bits];
        for v in vpns {
            seen[(h.hash(v) & ((1 << bits) - 1)) as usize] = true;
        }
        seen.iter().filter(|s| **s).count()
    }

    extern crate alloc;

    #[test]
    fn good_hashers_spread_strided_addresses_over_most_buckets() {
        // 4096 pages at strides of 1 page, 16 pages (64 KiB) and 512 pages (2 MiB) into 4096 buckets:
        // a uniform hash fills about 63% of them; the prototype fills at most 256.
        for stride in [1u64, 16, 512] {
            let vpns = || (0..4096u64).map(move |i| 0x0007_fff0_0000 + i * stride);
            let fm = distinct_buckets(&Fmix64, vpns(), 12);
            let fib = distinct_buckets(&Fibonacci, vpns(), 12);
            let fold = distinct_buckets(&FoldMul, vpns(), 12);
            let proto = distinct_buckets(&PrototypeModulo, vpns(), 12);
            assert!(fm > 2400, "fmix64 stride {stride}: {fm}");
            assert!(fib > 2400, "fibonacci stride {stride}: {fib}");
            assert!(fold > 2400, "foldmul stride {stride}: {fold}");
            assert!(proto <= 256, "prototype stride {stride}: {proto}");
        }
    }

    #[test]
    fn tags_differ_for_neighbouring_pages() {
        fn tags<H: VpnHasher>(h: &H, stride: u64) -> usize {
            let t: alloc::collections::BTreeSet<u64> =
                (0..1000u64).map(|v| h.hash(v * stride) >> 49).collect();
            t.len()
        }
        // 1000 uniform 15-bit tags (the table keeps 15) collide about 15 times (birthday bound).
        for stride in [1, 16, 512, 1 << 20] {
            assert!(tags(&Fmix64, stride) > 960, "fmix64 stride {stride}");
            assert!(tags(&FoldMul, stride) > 960, "foldmul stride {stride}");
        }
    }
}
