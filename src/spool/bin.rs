//! The primitives of the spool's binary layouts ([`super::header`], [`super::wal`]): integers
//! little-endian, and each text as a `u32` length and its UTF-8. Decoding never panics: a
//! layout cut short or damaged reads as `None`.

/// A flags byte: the `bit` of each `(set, bit)` that is set.
pub(super) fn flags(bits: &[(bool, u8)]) -> u8 {
    bits.iter()
        .filter(|(set, _)| *set)
        .fold(0, |flags, (_, bit)| flags | bit)
}

/// Append `s` as a length and its bytes.
pub(super) fn put_text(out: &mut Vec<u8>, s: &str) {
    // Texts come from one frame or one delivery, bounded far below 4 GiB by the frame limit.
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Append name-value pairs (headers, a query) as their count and each name and value.
pub(super) fn put_pairs(out: &mut Vec<u8>, pairs: &[(String, String)]) {
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (name, value) in pairs {
        put_text(out, name);
        put_text(out, value);
    }
}

/// What is left of a layout being decoded.
pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    pub(super) fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    pub(super) fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    pub(super) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    pub(super) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    /// A u64 that is there only if `present` (a flag read before it): `Some(None)` if not.
    pub(super) fn u64_if(&mut self, present: bool) -> Option<Option<u64>> {
        present
            .then(|| self.u64())
            .map_or(Some(None), |v| v.map(Some))
    }

    /// A text that is there only if `present`, as [`Reader::u64_if`].
    pub(super) fn text_if(&mut self, present: bool) -> Option<Option<String>> {
        present
            .then(|| self.text())
            .map_or(Some(None), |v| v.map(Some))
    }

    pub(super) fn text(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        Some(std::str::from_utf8(self.take(len)?).ok()?.to_string())
    }

    /// A count of items that each take at least `least` bytes, bounded by what is left: a
    /// damaged count cannot make its reader reserve more than the layout holds.
    pub(super) fn count(&mut self, least: usize) -> Option<usize> {
        let n = self.u32()? as usize;
        (n <= self.0.len() / least.max(1)).then_some(n)
    }

    pub(super) fn pairs(&mut self) -> Option<Vec<(String, String)>> {
        let n = self.count(8)?;
        let mut pairs = Vec::with_capacity(n);
        for _ in 0..n {
            pairs.push((self.text()?, self.text()?));
        }
        Some(pairs)
    }
}
