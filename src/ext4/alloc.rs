//! Block allocation: a cursor that only moves forward (data is appended where it will stay),
//! a best-fit list of freed ranges (so whiteouts do not leave the image larger than its
//! content), and a bitmap of every block handed out below the cursor.
//!
//! The cursor steps over the superblock copies and descriptor blocks at group starts
//! ([`layout::reserved_at_group_start`]), marking them used, so runs never overlap them.

use std::collections::{BTreeMap, BTreeSet};

use super::layout::{self, BLOCKS_PER_GROUP};

/// A range of consecutive physical blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub start: u64,
    pub len: u64,
}

impl Run {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// A growable bit set over block numbers.
#[derive(Debug, Default, Clone)]
pub(crate) struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    pub fn set_range(&mut self, start: u64, len: u64, value: bool) {
        let end = start + len;
        let needed = end.div_ceil(64) as usize;
        if value && self.words.len() < needed {
            self.words.resize(needed, 0);
        }
        let mut bit = start;
        while bit < end {
            let word = (bit / 64) as usize;
            if word >= self.words.len() {
                break; // clearing past the end: already clear
            }
            let offset = bit % 64;
            let count = (64 - offset).min(end - bit);
            let mask = if count == 64 {
                u64::MAX
            } else {
                ((1u64 << count) - 1) << offset
            };
            if value {
                self.words[word] |= mask;
            } else {
                self.words[word] &= !mask;
            }
            bit += count;
        }
    }

    #[cfg(test)]
    pub fn get(&self, bit: u64) -> bool {
        self.words
            .get((bit / 64) as usize)
            .is_some_and(|w| w & (1 << (bit % 64)) != 0)
    }

    /// Copies bits `[start, start + out.len() * 8)` into `out`, least significant bit first
    /// (the on-disk bitmap order).
    pub fn copy_bytes(&self, start: u64, out: &mut [u8]) {
        debug_assert_eq!(start % 64, 0);
        let first_word = (start / 64) as usize;
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            let word = self.words.get(first_word + i).copied().unwrap_or(0);
            chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Raised when the cursor would pass a fixed size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LimitReached {
    /// Blocks the allocation needed (cursor after it).
    pub needed: u64,
}

#[derive(Debug)]
pub(crate) struct BlockAllocator {
    /// First block never handed out by [`BlockAllocator::append`].
    cursor: u64,
    /// Highest the cursor ever was: blocks in `[cursor, high_water)` may hold stale bytes.
    high_water: u64,
    used: Bitmap,
    free_by_start: BTreeMap<u64, u64>,
    free_by_size: BTreeSet<(u64, u64)>,
    limit: Option<u64>,
}

impl BlockAllocator {
    pub fn new(limit: Option<u64>) -> BlockAllocator {
        BlockAllocator {
            cursor: 0,
            high_water: 0,
            used: Bitmap::default(),
            free_by_start: BTreeMap::new(),
            free_by_size: BTreeSet::new(),
            limit,
        }
    }

    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    pub fn high_water(&self) -> u64 {
        self.high_water
    }

    pub fn used(&self) -> &Bitmap {
        &self.used
    }

    /// Freed ranges below the cursor, in block order.
    pub fn free_runs(&self) -> impl Iterator<Item = Run> + '_ {
        self.free_by_start
            .iter()
            .map(|(&start, &len)| Run { start, len })
    }

    /// Moves the cursor past reserved blocks at a group start, marking them used.
    fn skip_reserved(&mut self) {
        let group = self.cursor / BLOCKS_PER_GROUP;
        let reserved_end = group * BLOCKS_PER_GROUP + layout::reserved_at_group_start(group);
        if self.cursor < reserved_end {
            self.used
                .set_range(self.cursor, reserved_end - self.cursor, true);
            self.cursor = reserved_end;
        }
    }

    /// Hands out up to `max` blocks at the cursor. Runs stop at group ends, so they never
    /// cover the next group's reserved blocks.
    pub fn append(&mut self, max: u64) -> Result<Run, LimitReached> {
        debug_assert!(max > 0);
        self.skip_reserved();
        let to_group_end = BLOCKS_PER_GROUP - self.cursor % BLOCKS_PER_GROUP;
        let run = Run {
            start: self.cursor,
            len: max.min(to_group_end),
        };
        if let Some(limit) = self.limit
            && run.end() > limit
        {
            return Err(LimitReached { needed: run.end() });
        }
        self.used.set_range(run.start, run.len, true);
        self.cursor = run.end();
        self.high_water = self.high_water.max(self.cursor);
        Ok(run)
    }

    /// Hands out exactly `len` consecutive blocks at (or after) the cursor, skipping to the
    /// next group when they would not fit before it. `len` must be at most a group's free part.
    pub fn append_contiguous(&mut self, len: u64) -> Result<Run, LimitReached> {
        self.skip_reserved();
        let to_group_end = BLOCKS_PER_GROUP - self.cursor % BLOCKS_PER_GROUP;
        if to_group_end < len {
            self.cursor += to_group_end;
            self.skip_reserved();
        }
        let run = self.append(len)?;
        debug_assert_eq!(run.len, len);
        Ok(run)
    }

    /// Hands out `len` blocks as few runs as the reserved blocks allow.
    pub fn append_runs(&mut self, mut len: u64) -> Result<Vec<Run>, LimitReached> {
        let mut runs: Vec<Run> = Vec::new();
        while len > 0 {
            let run = self.append(len)?;
            len -= run.len;
            match runs.last_mut() {
                Some(last) if last.end() == run.start => last.len += run.len,
                _ => runs.push(run),
            }
        }
        Ok(runs)
    }

    /// Takes the smallest freed range holding `len` blocks (lowest address on ties) and
    /// returns its start. Blocks are marked used only as the caller writes them
    /// ([`BlockAllocator::mark_used`]); the caller returns what it did not use.
    pub fn take_free(&mut self, len: u64) -> Option<u64> {
        let &(size, start) = self.free_by_size.range((len, 0)..).next()?;
        self.free_by_size.remove(&(size, start));
        self.free_by_start.remove(&start);
        if size > len {
            self.insert_free(start + len, size - len);
        }
        Some(start)
    }

    pub fn mark_used(&mut self, run: Run) {
        self.used.set_range(run.start, run.len, true);
    }

    /// Gives blocks back: they join the freed ranges, or move the cursor back when they end
    /// at it (so a file removed right after it was written costs nothing).
    pub fn release(&mut self, run: Run) {
        if run.len == 0 {
            return;
        }
        self.used.set_range(run.start, run.len, false);
        let mut start = run.start;
        let mut end = run.end();
        if let Some((&prev_start, &prev_len)) = self.free_by_start.range(..start).next_back()
            && prev_start + prev_len == start
        {
            self.remove_free(prev_start, prev_len);
            start = prev_start;
        }
        if let Some(&next_len) = self.free_by_start.get(&end) {
            self.remove_free(end, next_len);
            end += next_len;
        }
        if end == self.cursor {
            self.cursor = start;
        } else {
            self.insert_free(start, end - start);
        }
    }

    fn insert_free(&mut self, start: u64, len: u64) {
        self.free_by_start.insert(start, len);
        self.free_by_size.insert((len, start));
    }

    fn remove_free(&mut self, start: u64, len: u64) {
        self.free_by_start.remove(&start);
        self.free_by_size.remove(&(len, start));
    }

    /// Blocks in use below the cursor (data, reserved blocks already passed).
    pub fn used_below_cursor(&self) -> u64 {
        let freed: u64 = self.free_by_start.values().sum();
        self.cursor - freed
    }

    /// Snapshot of the cursor state, to plan the metadata region more than once.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            cursor: self.cursor,
            high_water: self.high_water,
        }
    }

    /// Undoes appends made since `checkpoint` (nothing else may have happened since).
    pub fn rewind(&mut self, checkpoint: Checkpoint) {
        if self.cursor > checkpoint.cursor {
            self.used
                .set_range(checkpoint.cursor, self.cursor - checkpoint.cursor, false);
        }
        self.cursor = checkpoint.cursor;
        self.high_water = checkpoint.high_water;
    }

    pub fn set_limit(&mut self, limit: Option<u64>) {
        self.limit = limit;
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Checkpoint {
    cursor: u64,
    high_water: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_skip_reserved_blocks() {
        let mut alloc = BlockAllocator::new(None);
        let run = alloc.append(10).unwrap();
        assert_eq!(run, Run { start: 2, len: 10 }); // superblock + descriptors first
        let run = alloc.append(BLOCKS_PER_GROUP).unwrap();
        assert_eq!(run.end(), BLOCKS_PER_GROUP); // stops at the group end
        let run = alloc.append(5).unwrap();
        assert_eq!(run.start, BLOCKS_PER_GROUP + 2); // group 1 has a superblock copy
        assert!(alloc.used().get(BLOCKS_PER_GROUP));
        assert!(alloc.used().get(0));
    }

    #[test]
    fn release_coalesces_and_rolls_back() {
        let mut alloc = BlockAllocator::new(None);
        let a = alloc.append(4).unwrap();
        let b = alloc.append(4).unwrap();
        let c = alloc.append(4).unwrap();
        alloc.release(a);
        alloc.release(b);
        assert_eq!(
            alloc.free_runs().collect::<Vec<_>>(),
            [Run { start: 2, len: 8 }]
        );
        alloc.release(c);
        assert_eq!(alloc.cursor(), 2);
        assert_eq!(alloc.free_runs().count(), 0);
        assert_eq!(alloc.high_water(), 14);
    }

    #[test]
    fn take_free_is_best_fit() {
        let mut alloc = BlockAllocator::new(None);
        let runs: Vec<Run> = (0..6).map(|i| alloc.append(2 + i).unwrap()).collect();
        alloc.release(runs[1]); // 3 blocks
        alloc.release(runs[3]); // 5 blocks
        assert_eq!(alloc.take_free(4), Some(runs[3].start));
        assert_eq!(alloc.take_free(1), Some(runs[3].start + 4));
        assert_eq!(alloc.take_free(3), Some(runs[1].start));
        assert_eq!(alloc.take_free(1), None);
    }

    #[test]
    fn limit_is_enforced() {
        let mut alloc = BlockAllocator::new(Some(10));
        alloc.append(8).unwrap();
        assert_eq!(alloc.append(1), Err(LimitReached { needed: 11 }));
    }

    #[test]
    fn bitmap_bytes() {
        let mut bits = Bitmap::default();
        bits.set_range(0, 3, true);
        bits.set_range(70, 130, true);
        bits.set_range(100, 10, false);
        assert!(bits.get(71) && !bits.get(105) && bits.get(199) && !bits.get(200));
        let mut bytes = [0u8; 16];
        bits.copy_bytes(0, &mut bytes);
        assert_eq!(bytes[0], 0b111);
        assert_eq!(bytes[8], 0b1100_0000);
    }
}
