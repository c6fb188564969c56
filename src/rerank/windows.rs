//! Which document each pair of a chunk-max session scores, and each document's best window so far.

/// The pair → document mapping of a session whose documents are split into windows.
#[derive(Default)]
pub(super) struct Windows {
    /// By pair serial: (document index, window of the document).
    pair: Vec<(u32, u32)>,
    /// By document: windows not yet scored, and the best window so far.
    left: Vec<u32>,
    best_window: Vec<u32>,
}

impl Windows {
    /// Records the next documents, starting at `first_index`, with `windows[i]` windows each.
    pub(super) fn add(&mut self, first_index: usize, windows: impl Iterator<Item = usize>) {
        for (i, count) in windows.enumerate() {
            let index = (first_index + i) as u32;
            self.pair
                .extend((0..count as u32).map(|window| (index, window)));
            self.left.push(count as u32);
            self.best_window.push(0);
        }
    }

    /// Records a window's score into its document's score (`scores`, NaN until its first window is scored);
    /// returns the document (index, best score, best window) once all its windows are scored.
    pub(super) fn scored(
        &mut self,
        pair: u32,
        score: f32,
        scores: &mut [f32],
    ) -> Option<(u32, f32, u32)> {
        let &(index, window) = self.pair.get(pair as usize)?;
        let i = index as usize;
        let (slot, left) = (scores.get_mut(i)?, self.left.get_mut(i)?);
        // Any score beats NaN (not yet scored); on a tie the earlier window wins, whatever order the
        // batches finished in.
        if slot.is_nan() || score > *slot || (score == *slot && window < self.best_window[i]) {
            *slot = score;
            self.best_window[i] = window;
        }
        *left -= 1;
        (*left == 0).then(|| (index, *slot, self.best_window[i]))
    }

    /// The best window of a document.
    pub(super) fn best(&self, index: u32) -> Option<u32> {
        self.best_window.get(index as usize).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_is_complete_when_all_its_windows_are_scored_and_takes_the_best() {
        let mut windows = Windows::default();
        windows.add(0, [3, 1].into_iter());
        let mut scores = vec![f32::NAN; 2];
        assert_eq!(windows.scored(0, 0.2, &mut scores), None);
        assert_eq!(windows.scored(3, 0.9, &mut scores), Some((1, 0.9, 0)));
        assert_eq!(windows.scored(2, 0.7, &mut scores), None);
        assert_eq!(
            windows.scored(1, 0.7, &mut scores),
            Some((0, 0.7, 1)),
            "the earlier window wins ties"
        );
        assert_eq!(windows.best(0), Some(1));
    }
}
