//! The values every stage passes on: a captured [`frame`], the [`findings`] of an inspection (regions,
//! 3 x 3 cells, the one answer text), the [`verdict`] message that leaves the box, and the [`command`]s
//! that come in, with the bounds they are checked against.

pub mod command;
pub mod findings;
pub mod frame;
pub mod verdict;
