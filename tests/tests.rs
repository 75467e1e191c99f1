//! Integration tests: one binary, modules by area (see ARCHITECTURE.md).

mod chaos;
mod classes;
mod cli;
mod common;
mod daemon;
mod detection;
mod evaluation;
mod gpu;
mod harness;
mod layering;
mod line;
mod llm;
mod plc;
mod ui;
mod zones;
