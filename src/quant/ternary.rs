//! Sub-1-bit ternary experts, after QMoE: dictionary-coded runs of ternary pairs.
//!
//! # Stream format
//! - Each row r of `W [N, Kd]` (Kd even) takes three values: 0, `lo[r]` or `hi[r]`, stored as
//!   `lohi [N, 2]` f16. A weight's ternary t is 0 (zero), 1 (lo) or 2 (hi).
//! - Columns pair up: symbol i of a row is `t[2i] + 3 t[2i+1]`, in 0..9. A row is Kd/2 symbols.
//! - A [`Dictionary`] (at most 65536 entries, shared by every expert of a layer) maps a codeword
//!   to a run of 1..=14 symbols. Entry bits: 0..4 the run length L, then symbol j in bits
//!   `4 + 4j .. 8 + 4j`; the bits past the run are zero. The compressor's dictionaries start
//!   with the nine one-symbol runs, so every row can be coded.
//! - Each row is a sequence of u16 codewords whose runs, concatenated, are exactly its Kd/2
//!   symbols; the rows' codewords are stored back to back in `codes`, row r in
//!   `codes[row_offsets[r] .. row_offsets[r+1]]`, `row_offsets [N+1]` u32.
//!
//! Bits per weight: `(16 · codewords + 32 · (N + 1) + 32 · N) / (N · Kd)`, plus the dictionary's
//! `64 · entries` bits once per layer.
//!
//! QMoE's own kernel decodes one token at a time for a few fixed shapes; the kernels here take
//! any N, any even Kd (a multiple of 8 in a layer) and any number of rows.

use std::collections::HashMap;
use std::sync::Arc;

use half::f16;

use crate::error::{Error, Result};

/// The longest run of symbols one codeword stands for.
pub const MAX_RUN: usize = 14;
/// The most entries a dictionary holds (16-bit codewords).
pub const MAX_ENTRIES: usize = 1 << 16;
/// Distinct symbols: 3 × 3 ternary pairs.
pub const SYMBOLS: u8 = 9;

/// The dictionary entry of a run of symbols (see the module doc).
fn entry_of(run: &[u8]) -> u64 {
    run.iter().enumerate().fold(run.len() as u64, |e, (j, &s)| {
        e | u64::from(s) << (4 + 4 * j)
    })
}

/// Codeword → run of symbols.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dictionary {
    entries: Vec<u64>,
}

impl Dictionary {
    /// Validates raw entries: 1..=65536 of them, run lengths 1..=14, symbols below 9, unused
    /// bits zero.
    pub fn new(entries: Vec<u64>) -> Result<Self> {
        const OP: &str = "Dictionary::new";
        if entries.is_empty() || entries.len() > MAX_ENTRIES {
            return Err(Error::shape(
                OP,
                "entries",
                format!("1..={MAX_ENTRIES} entries"),
                format!("{}", entries.len()),
            ));
        }
        for (c, &e) in entries.iter().enumerate() {
            let len = (e & 0xf) as usize;
            let syms: Vec<u8> = (0..len.min(MAX_RUN))
                .map(|j| ((e >> (4 + 4 * j)) & 0xf) as u8)
                .collect();
            if len == 0
                || len > MAX_RUN
                || syms.iter().any(|&s| s >= SYMBOLS)
                || entry_of(&syms) != e
            {
                return Err(Error::shape(
                    OP,
                    "entries",
                    "runs of 1..=14 symbols below 9, unused bits zero",
                    format!("entry {c} = {e:#x}"),
                ));
            }
        }
        Ok(Dictionary { entries })
    }

    /// A dictionary of at most `capacity` (9..=65536) entries for the symbol rows of `sample`:
    /// the nine one-symbol runs, then the runs of 2..=14 symbols with the highest
    /// `count × (length − 1)` (symbols saved per use, times uses) over every position of the
    /// sample, ties to the smaller entry. A heuristic: it counts overlapping occurrences, which
    /// the greedy longest-match coder does not all use.
    pub fn build(sample: &[Vec<u8>], capacity: usize) -> Result<Self> {
        const OP: &str = "Dictionary::build";
        if !(usize::from(SYMBOLS)..=MAX_ENTRIES).contains(&capacity) {
            return Err(Error::shape(
                OP,
                "capacity",
                format!("9..={MAX_ENTRIES}"),
                format!("{capacity}"),
            ));
        }
        if let Some(bad) = sample.iter().flatten().find(|&&s| s >= SYMBOLS) {
            return Err(Error::shape(
                OP,
                "sample",
                "symbols below 9",
                format!("{bad}"),
            ));
        }
        let mut counts: HashMap<u64, u64> = HashMap::new();
        for row in sample {
            for p in 0..row.len() {
                for len in 2..=MAX_RUN.min(row.len() - p) {
                    *counts.entry(entry_of(&row[p..p + len])).or_default() += 1;
                }
            }
        }
        let mut ranked: Vec<(u64, u64)> = counts
            .into_iter()
            .map(|(e, c)| (c * ((e & 0xf) - 1), e))
            .collect();
        ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut entries: Vec<u64> = (0..SYMBOLS).map(|s| entry_of(&[s])).collect();
        entries.extend(
            ranked
                .iter()
                .take(capacity - entries.len())
                .map(|&(_, e)| e),
        );
        Dictionary::new(entries)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn entries(&self) -> &[u64] {
        &self.entries
    }

    /// The run of codeword c: its length and its symbols (first `len` valid).
    pub fn run(&self, c: u16) -> Option<(usize, [u8; MAX_RUN])> {
        let e = *self.entries.get(usize::from(c))?;
        let mut syms = [0u8; MAX_RUN];
        let len = (e & 0xf) as usize;
        for (j, s) in syms.iter_mut().enumerate().take(len) {
            *s = ((e >> (4 + 4 * j)) & 0xf) as u8;
        }
        Some((len, syms))
    }
}

/// A weight after ternarisation, before coding: `t [N, Kd]` in {0, 1, 2} and `lohi [N, 2]`.
#[derive(Clone, Debug)]
pub struct Ternarized {
    pub n: usize,
    pub kdim: usize,
    pub t: Vec<u8>,
    pub lohi: Vec<f16>,
}

impl Ternarized {
    /// Row r as symbols `t[2i] + 3 t[2i+1]`.
    pub fn symbols(&self, r: usize) -> Vec<u8> {
        self.t[r * self.kdim..(r + 1) * self.kdim]
            .chunks(2)
            .map(|p| p[0] + 3 * p[1])
            .collect()
    }
}

/// Ternarises `w [N, Kd]` (finite, Kd even) row by row: weights below the row's
/// `zero_fraction`-quantile of |w| become 0, the others `hi` (positive) or `lo` (negative),
/// each the mean of the weights it replaces (the least-squares choice for that assignment),
/// rounded to f16.
pub fn ternarize(w: &[f32], n: usize, kdim: usize, zero_fraction: f64) -> Result<Ternarized> {
    const OP: &str = "ternarize";
    super::check_len(OP, "w", w.len(), n, kdim, 1, 2)?;
    if kdim == 0 {
        return Err(Error::shape(OP, "kdim", "Kd > 0", "0"));
    }
    if !(0.0..1.0).contains(&zero_fraction) {
        return Err(Error::shape(
            OP,
            "zero_fraction",
            "in [0, 1)",
            format!("{zero_fraction}"),
        ));
    }
    if let Some(bad) = w.iter().find(|v| !v.is_finite()) {
        return Err(Error::shape(OP, "w", "finite weights", format!("{bad}")));
    }
    let mut t = Vec::with_capacity(n * kdim);
    let mut lohi = Vec::with_capacity(2 * n);
    for row in w.chunks(kdim.max(1)).take(n) {
        let mut mags: Vec<f32> = row.iter().map(|x| x.abs()).collect();
        mags.sort_unstable_by(f32::total_cmp);
        let thr = mags[((zero_fraction * kdim as f64) as usize).min(kdim - 1)];
        let (mut lo, mut nlo, mut hi, mut nhi) = (0f64, 0usize, 0f64, 0usize);
        for &x in row {
            if x == 0.0 || x.abs() < thr {
                t.push(0);
            } else if x < 0.0 {
                t.push(1);
                lo += f64::from(x);
                nlo += 1;
            } else {
                t.push(2);
                hi += f64::from(x);
                nhi += 1;
            }
        }
        lohi.push(f16::from_f64(if nlo > 0 { lo / nlo as f64 } else { 0.0 }));
        lohi.push(f16::from_f64(if nhi > 0 { hi / nhi as f64 } else { 0.0 }));
    }
    Ok(Ternarized { n, kdim, t, lohi })
}

/// `W [N, Kd]` coded as in the module doc.
#[derive(Clone, Debug)]
pub struct TernaryMatrix {
    n: usize,
    kdim: usize,
    lohi: Vec<f16>,
    row_offsets: Vec<u32>,
    codes: Vec<u16>,
    dict: Arc<Dictionary>,
}

impl TernaryMatrix {
    /// Validates the parts: `lohi [N, 2]`, `row_offsets [N+1]` from 0, non-decreasing, ending at
    /// `codes.len()`; every codeword inside the dictionary; every row's runs adding up to
    /// exactly Kd/2 symbols.
    pub fn new(
        n: usize,
        kdim: usize,
        lohi: Vec<f16>,
        row_offsets: Vec<u32>,
        codes: Vec<u16>,
        dict: Arc<Dictionary>,
    ) -> Result<Self> {
        const OP: &str = "TernaryMatrix::new";
        if !kdim.is_multiple_of(2) {
            return Err(Error::shape(OP, "kdim", "an even Kd", format!("{kdim}")));
        }
        super::check_len(OP, "lohi", lohi.len(), n, 2, 1, 1)?;
        let last = u32::try_from(codes.len()).map_err(|_| {
            Error::shape(
                OP,
                "codes",
                "below 2^32 codewords",
                format!("{}", codes.len()),
            )
        })?;
        let ends_ok = row_offsets.first() == Some(&0) && row_offsets.last() == Some(&last);
        if row_offsets.len() != n + 1 || !ends_ok || row_offsets.windows(2).any(|w| w[0] > w[1]) {
            return Err(Error::shape(
                OP,
                "row_offsets",
                format!("[N+1] = [{}] non-decreasing from 0 to {last}", n + 1),
                format!(
                    "{} offsets, first {:?}, last {:?}",
                    row_offsets.len(),
                    row_offsets.first(),
                    row_offsets.last()
                ),
            ));
        }
        for r in 0..n {
            let mut symbols = 0usize;
            for &c in &codes[row_offsets[r] as usize..row_offsets[r + 1] as usize] {
                let (len, _) = dict.run(c).ok_or_else(|| {
                    Error::shape(
                        OP,
                        "codes",
                        format!("codewords below the dictionary's {} entries", dict.len()),
                        format!("codeword {c} in row {r}"),
                    )
                })?;
                symbols += len;
            }
            if symbols != kdim / 2 {
                return Err(Error::shape(
                    OP,
                    "codes",
                    format!("rows of Kd/2 = {} symbols", kdim / 2),
                    format!("{symbols} symbols in row {r}"),
                ));
            }
        }
        Ok(TernaryMatrix {
            n,
            kdim,
            lohi,
            row_offsets,
            codes,
            dict,
        })
    }

    /// Codes every row of `t` with `dict`, greedily: at each position the longest run (up to
    /// 14 symbols) the dictionary holds.
    pub fn compress(t: &Ternarized, dict: Arc<Dictionary>) -> Result<Self> {
        const OP: &str = "TernaryMatrix::compress";
        super::check_len(OP, "t", t.t.len(), t.n, t.kdim, 1, 2)?;
        if let Some(bad) = t.t.iter().find(|&&v| v > 2) {
            return Err(Error::shape(
                OP,
                "t",
                "ternaries 0, 1 or 2",
                format!("{bad}"),
            ));
        }
        let index: HashMap<u64, u16> = dict
            .entries()
            .iter()
            .enumerate()
            .map(|(c, &e)| (e, c as u16))
            .collect();
        let mut codes = Vec::new();
        let mut row_offsets = vec![0u32];
        for r in 0..t.n {
            let syms = t.symbols(r);
            let mut p = 0;
            while p < syms.len() {
                let found = (1..=MAX_RUN.min(syms.len() - p))
                    .rev()
                    .find_map(|len| index.get(&entry_of(&syms[p..p + len])).map(|&c| (c, len)));
                let (c, len) = found.ok_or_else(|| {
                    Error::shape(
                        OP,
                        "dict",
                        "a dictionary holding every one-symbol run",
                        format!("no entry for symbol {} (row {r})", syms[p]),
                    )
                })?;
                codes.push(c);
                p += len;
            }
            row_offsets.push(
                u32::try_from(codes.len()).map_err(|_| {
                    Error::shape(OP, "t", "below 2^32 codewords", format!("row {r}"))
                })?,
            );
        }
        TernaryMatrix::new(t.n, t.kdim, t.lohi.clone(), row_offsets, codes, dict)
    }

    pub fn n(&self) -> usize {
        self.n
    }
    pub fn kdim(&self) -> usize {
        self.kdim
    }
    pub fn lohi(&self) -> &[f16] {
        &self.lohi
    }
    pub fn row_offsets(&self) -> &[u32] {
        &self.row_offsets
    }
    pub fn codes(&self) -> &[u16] {
        &self.codes
    }
    pub fn dict(&self) -> &Arc<Dictionary> {
        &self.dict
    }

    /// Bytes of codewords, row offsets and lo/hi (not the shared dictionary).
    pub fn bytes(&self) -> usize {
        2 * self.codes.len() + 4 * self.row_offsets.len() + 2 * self.lohi.len()
    }

    /// Stored bits per weight, the dictionary left out (it is shared by the layer).
    pub fn bits_per_weight(&self) -> f64 {
        (8 * self.bytes()) as f64 / (self.n * self.kdim) as f64
    }

    /// The reference decoder: `[N, Kd]` in f32.
    pub fn decode(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n * self.kdim);
        for r in 0..self.n {
            let vals = [
                0.0,
                self.lohi[2 * r].to_f32(),
                self.lohi[2 * r + 1].to_f32(),
            ];
            let codes = &self.codes[self.row_offsets[r] as usize..self.row_offsets[r + 1] as usize];
            for &c in codes {
                let (len, syms) = self.dict.run(c).expect("validated by new");
                for &s in &syms[..len] {
                    out.push(vals[usize::from(s % 3)]);
                    out.push(vals[usize::from(s / 3)]);
                }
            }
        }
        out
    }
}
