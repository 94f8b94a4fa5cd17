//! A libFuzzer-style mutator: bit flips, interesting integers (both byte orders), range
//! deletion, insertion, duplication and repetition, dictionary tokens and splicing with another
//! corpus entry. Deterministic for a given generator state, so an input is a function of
//! (seed, iteration) alone.

/// SplitMix64: small, fast, and good enough to drive mutations; the state is the whole seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    /// Small numbers much more often than large ones (lengths, counts, repeats).
    pub fn skewed(&mut self, max: usize) -> usize {
        let bits = self.below(usize::BITS as usize - max.leading_zeros() as usize + 1);
        let v = if bits == 0 {
            0
        } else {
            self.next_u64() as usize & ((1usize << bits) - 1)
        };
        v.min(max)
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The input of iteration `iteration` of a run with `seed`: independent of every other
/// iteration, which is what makes `FERROVIRT_FUZZ_ITER` replay one input exactly.
pub fn iteration_rng(seed: u64, iteration: u64) -> Rng {
    let mut r = Rng::new(seed ^ iteration.wrapping_mul(0xd6e8_feb8_6659_fd93));
    r.next_u64();
    r
}

const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    0x10,
    0x1f,
    0x20,
    0x3f,
    0x40,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x1ff,
    0x200,
    0x3ff,
    0xfff,
    0x1000,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    0xffff_ffff_ffff_fffe,
    0xffff_ffff_ffff_ffff,
];

/// What a mutator may draw from besides random bytes.
pub struct Material<'a> {
    /// Tokens of the input language (tags, keys, magic numbers).
    pub dict: &'a [&'a [u8]],
    /// Other corpus entries, for splicing.
    pub corpus: &'a [Vec<u8>],
    /// Inputs never grow past this.
    pub max_len: usize,
}

/// Applies one random mutation to `data`.
pub fn mutate_once(data: &mut Vec<u8>, r: &mut Rng, m: &Material<'_>) {
    let len = data.len();
    match r.below(16) {
        0 if len > 0 => {
            let i = r.below(len);
            data[i] ^= 1 << r.below(8);
        }
        1 if len > 0 => {
            let i = r.below(len);
            data[i] = r.next_u64() as u8;
        }
        2 | 3 if len > 0 => {
            // An interesting integer of 1, 2, 4 or 8 bytes, either byte order, often aligned.
            let width = 1usize << r.below(4);
            let v = if r.chance(4) {
                // Near a boundary: interesting +- a little.
                r.pick(INTERESTING)
                    .wrapping_add(r.below(9) as u64)
                    .wrapping_sub(4)
            } else {
                *r.pick(INTERESTING)
            };
            let bytes = if r.chance(2) {
                v.to_be_bytes()[8 - width..].to_vec()
            } else {
                v.to_le_bytes()[..width].to_vec()
            };
            let mut at = r.below(len);
            if r.chance(2) {
                at &= !(width - 1);
            }
            overwrite(data, at, &bytes);
        }
        4 if len > 0 => {
            // Add or subtract a little to a byte.
            let i = r.below(len);
            let delta = (r.below(35) as u8).wrapping_sub(17);
            data[i] = data[i].wrapping_add(delta);
        }
        5 if len > 1 => {
            let at = r.below(len);
            let n = 1 + r.skewed(len - at - 1);
            data.drain(at..(at + n).min(len));
        }
        6 => {
            let at = r.below(len + 1);
            let n = 1 + r.skewed(64);
            let bytes: Vec<u8> = (0..n).map(|_| r.next_u64() as u8).collect();
            insert(data, at, &bytes, m.max_len);
        }
        7 if len > 0 => {
            // Copy a chunk of the input elsewhere in it.
            let from = r.below(len);
            let n = 1 + r.skewed(len - from - 1);
            let chunk = data[from..from + n].to_vec();
            let at = r.below(len + 1);
            if r.chance(2) {
                insert(data, at, &chunk, m.max_len);
            } else {
                overwrite(data, at.min(len - 1), &chunk);
            }
        }
        8 | 9 if !m.dict.is_empty() => {
            let tok = *r.pick(m.dict);
            let at = r.below(len + 1);
            if r.chance(2) || len == 0 {
                insert(data, at, tok, m.max_len);
            } else {
                overwrite(data, at.min(len - 1), tok);
            }
        }
        10 if !m.corpus.is_empty() => {
            // Crossover: our head with another entry's tail.
            let other = r.pick(m.corpus);
            let cut = r.below(len + 1);
            let from = r.below(other.len() + 1);
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
            data.truncate(m.max_len);
        }
        11 if len > 0 => {
            // Repeat a chunk many times: nesting depth, counts and lengths past their limits.
            let from = r.below(len);
            let n = 1 + r.skewed((len - from - 1).min(64));
            let chunk = data[from..from + n].to_vec();
            let times = 1 + r.skewed(4096);
            let mut rep = Vec::with_capacity(chunk.len() * times);
            for _ in 0..times {
                if rep.len() + chunk.len() > m.max_len {
                    break;
                }
                rep.extend_from_slice(&chunk);
            }
            let at = r.below(len + 1);
            insert(data, at, &rep, m.max_len);
        }
        12 => {
            // A decimal number, for text formats (sizes, counts, indexes).
            let v = match r.below(3) {
                0 => *r.pick(INTERESTING),
                1 => r.below(1000) as u64,
                _ => r.next_u64(),
            };
            let s = if r.chance(4) {
                format!("-{v}")
            } else {
                v.to_string()
            };
            let at = r.below(len + 1);
            insert(data, at, s.as_bytes(), m.max_len);
        }
        13 if len > 0 => data.truncate(r.below(len)),
        14 if len > 1 => {
            // Swap two bytes.
            let (a, b) = (r.below(len), r.below(len));
            data.swap(a, b);
        }
        _ if len > 0 => {
            let i = r.below(len);
            data[i] = *r.pick(b"\0\x01\x7f\x80\xff<>/='\"&;[]{}:,.-_ \n\t\\#");
        }
        _ => data.push(r.next_u64() as u8),
    }
}

fn overwrite(data: &mut [u8], at: usize, bytes: &[u8]) {
    let end = (at + bytes.len()).min(data.len());
    data[at..end].copy_from_slice(&bytes[..end - at]);
}

fn insert(data: &mut Vec<u8>, at: usize, bytes: &[u8], max_len: usize) {
    let room = max_len.saturating_sub(data.len());
    let n = bytes.len().min(room);
    data.splice(at..at, bytes[..n].iter().copied());
}

/// A stack of 1 to 16 mutations (few more often than many).
pub fn mutate(data: &mut Vec<u8>, r: &mut Rng, m: &Material<'_>) {
    let n = 1 + r.skewed(15);
    for _ in 0..n {
        mutate_once(data, r, m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_input_and_respects_max_len() {
        let corpus = vec![b"<domain><name>a</name></domain>".to_vec()];
        let m = Material {
            dict: &[b"<vcpu>", b"</os>"],
            corpus: &corpus,
            max_len: 256,
        };
        for it in 0..2000 {
            let (mut a, mut b) = (corpus[0].clone(), corpus[0].clone());
            mutate(&mut a, &mut iteration_rng(9, it), &m);
            mutate(&mut b, &mut iteration_rng(9, it), &m);
            assert_eq!(a, b, "iteration {it}");
            assert!(a.len() <= 256, "iteration {it}: {} bytes", a.len());
        }
    }
}
