//! The commands beside `run`: [`eval`] (with [`measures`]: AUROC, PRO, F1-max, accuracy), [`bench`]
//! and [`e2e`] (speed and memory), and [`chat`].

pub mod bench;
pub mod chat;
pub mod e2e;
pub mod eval;
pub mod measures;
