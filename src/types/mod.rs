//! The values every stage passes on: a captured [`frame`], the [`findings`] of an inspection (regions,
//! 3 x 3 cells, the one answer text) and the [`verdict`] message that leaves the box.

pub mod findings;
pub mod frame;
pub mod verdict;
