//! Integration tests: one binary, modules by area (see ARCHITECTURE.md).

mod cli;
mod common;
mod daemon;
mod detection;
mod evaluation;
mod gpu;
mod layering;
mod line;
mod llm;
