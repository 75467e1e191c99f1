//! Integration tests: one binary, modules by area (see ARCHITECTURE.md).

mod cli;
mod common;
mod detection;
mod evaluation;
