#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| anomalyd::fuzzing::command(data));
